"""When to poll a job next: learned from how long this run's jobs take.

Every poll counts against the account's rate limit, and a job finished but
not yet noticed wastes the user's time. With no knowledge, polling backs off
geometrically (1 s growing to 10 s). Once a few jobs have finished, their
durations say far more: nothing finishes before the fastest of them, so the
first poll waits until then; after that the wait grows with the job's age
and with how much longer the jobs still running tend to take (their mean
residual time), as ``c * sqrt(age * residual)``. That spacing minimises polls
for a given mean notice delay relative to job duration (dense where many
jobs finish, sparse where few do); c = 0.25 aims at a delay under 10% of a
job's duration.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from datetime import datetime
from typing import Any

__all__ = ["DurationModel", "remote_duration"]

_SPACING = 0.25
_MIN_SAMPLES = 5
_KEEP = 256


class DurationModel:
    """Durations (submit to finish) of recently finished jobs, and the poll waits they suggest."""

    def __init__(self, *, keep: int = _KEEP, min_samples: int = _MIN_SAMPLES) -> None:
        self._recent: deque[float] = deque(maxlen=keep)
        self._sorted: list[float] = []
        self.min_samples = min_samples

    def __len__(self) -> int:
        return len(self._recent)

    def add(self, seconds: float) -> None:
        """Learn one finished job's duration (the oldest is forgotten past `keep`: queues change)."""
        if not math.isfinite(seconds) or seconds <= 0:
            return
        if len(self._recent) == self._recent.maxlen:
            self._sorted.pop(bisect.bisect_left(self._sorted, self._recent[0]))
        self._recent.append(seconds)
        bisect.insort(self._sorted, seconds)

    @property
    def earliest(self) -> float:
        """Before this age (the fastest jobs seen, less a margin) no job is expected to finish; 0 while unknown."""
        durations = self._sorted
        if len(durations) < self.min_samples:
            return 0.0
        return durations[max(0, len(durations) // 50 - 1)] * 0.95

    def wait(self, age: float, backoff: float, shortest: float, longest: float) -> float:
        """The wait before polling a job of this age: learned, or backoff while too little is known.

        Kept between shortest and longest (--poll-interval, --poll-max), except that a
        job younger than any finished one waits until then: no poll before it can help.
        """
        learned = self.next_wait(age)
        if learned is None:
            return min(max(backoff, shortest), longest)
        if age < self.earliest:
            return max(learned, shortest)
        return min(max(learned, shortest), longest)

    def next_wait(self, age: float) -> float | None:
        """Seconds until the next poll of a job submitted age seconds ago; None while too little is known."""
        durations = self._sorted
        if len(durations) < self.min_samples:
            return None
        earliest = self.earliest
        if age < earliest:
            return earliest - age
        longer = durations[bisect.bisect_right(durations, age) :]
        if not longer:
            # Older than every job seen: the model knows nothing more; grow by a fifth of the age.
            return 0.2 * age
        residual = sum(longer) / len(longer) - age
        return _SPACING * math.sqrt(age * residual)


def remote_duration(result: dict[str, Any]) -> float | None:
    """finished_at - created_at from a result body, as epoch seconds or ISO 8601; None when absent."""
    created, finished = _instant(result.get("created_at")), _instant(result.get("finished_at"))
    if created is None or finished is None or finished <= created:
        return None
    return finished - created


def _instant(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) / 1000 if value > 1e11 else float(value)  # milliseconds are common too
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None
