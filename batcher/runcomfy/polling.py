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

What is learned is bounded: timestamps a server sends are taken only when
plausible (after 2020, at most a day ahead), durations only up to a day, and
every wait after a job's first is at most --poll-max.
"""

from __future__ import annotations

import bisect
import math
import re
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

__all__ = ["MAX_DURATION", "DurationModel", "remote_duration"]

_SPACING = 0.25
_MIN_SAMPLES = 5
_KEEP = 256
MAX_DURATION = 86_400.0
"""The longest duration learned: a longer one is a clock or a server gone wrong, not a job."""
_FIRST_WAIT_FACTOR = 10
_EPOCH_FLOOR = 1_577_836_800.0  # 2020-01-01: no RunComfy job started before (0 is the usual default)
_FUTURE_SLACK = 86_400.0


class DurationModel:
    """Durations (submit to finish) of recently finished jobs, and the poll waits they suggest."""

    def __init__(self, *, keep: int = _KEEP, min_samples: int = _MIN_SAMPLES) -> None:
        self._recent: deque[float] = deque(maxlen=keep)
        self._sorted: list[float] = []
        self.min_samples = min_samples

    def __len__(self) -> int:
        return len(self._recent)

    def add(self, seconds: float) -> None:
        """Learn one finished job's duration (the oldest is forgotten past `keep`: queues change).

        Nonsense (not positive, not finite, over MAX_DURATION) is ignored.
        """
        if not math.isfinite(seconds) or not 0 < seconds <= MAX_DURATION:
            return
        if len(self._recent) == self._recent.maxlen:
            self._sorted.pop(bisect.bisect_left(self._sorted, self._recent[0]))
        self._recent.append(seconds)
        bisect.insort(self._sorted, seconds)

    def sorted_durations(self) -> list[float]:
        """The durations kept, shortest first (the model's own list: read it, do not change it)."""
        return self._sorted

    @property
    def earliest(self) -> float:
        """Before this age (the fastest jobs seen, less a margin) no job is expected to finish; 0 while unknown."""
        durations = self._sorted
        if len(durations) < self.min_samples:
            return 0.0
        return durations[max(0, len(durations) // 50 - 1)] * 0.95

    def wait(self, age: float, backoff: float, shortest: float, longest: float, *, first: bool = False) -> float:
        """The wait before polling a job of this age: learned, or backoff while too little is known.

        Kept between shortest and longest (--poll-interval, --poll-max). The
        ``first`` wait after a submit is the exception: a job younger than any
        finished one waits until then (no poll before it can help), but no
        longer than 10 x longest, in case what was learned is wrong.
        """
        learned = self.next_wait(age)
        if learned is None:
            return min(max(backoff, shortest), longest)
        if first and age < self.earliest:
            return min(max(learned, shortest), _FIRST_WAIT_FACTOR * longest)
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


def remote_duration(result: dict[str, Any], *, now: float | None = None) -> float | None:
    """finished_at - created_at from a result body (each read by `_instant`).

    None when either is absent or implausible (before 2020, more than a day
    after ``now``), or the duration is not positive or over MAX_DURATION: a
    server's nonsense must not teach the poll timing, run after run.
    """
    now = time.time() if now is None else now
    created, finished = _instant(result.get("created_at"), now), _instant(result.get("finished_at"), now)
    if created is None or finished is None or not 0 < finished - created <= MAX_DURATION:
        return None
    return finished - created


_MILLISECONDS_ABOVE = 1e11
"""An epoch number above this is read as milliseconds (1e11 seconds is the year 5138; 1e11 ms is 1973)."""
_MAX_STAMP_CHARS = 64
_NUMERIC = re.compile(r"[+-]?\d+(?:\.\d*)?")
"""Epoch seconds or milliseconds written as a string: no exponent, so never infinity."""


def _instant(value: object, now: float) -> float | None:
    """value as epoch seconds when it is a plausible moment of a job's life, else None.

    RunComfy sends ``created_at`` / ``finished_at`` as strings (its CLI declares
    them ``Option<String>``) in a format no client pins down, so every usual one
    is read: ISO 8601 with ``Z`` or an offset, any fraction of a second, ``T``
    or a space between date and time, and without a zone (read as UTC, which is
    what a server means; the local zone would shift every duration by hours
    when only one end has a zone); epoch seconds or milliseconds, as a number
    or a numeric string.
    """
    seconds = _epoch_seconds(value)
    if seconds is None or not math.isfinite(seconds) or not _EPOCH_FLOOR <= seconds <= now + _FUTURE_SLACK:
        return None
    return seconds


def _epoch_seconds(value: object) -> float | None:
    """value as epoch seconds, unchecked; None when it is no timestamp batcher reads."""
    if isinstance(value, bool):
        return None  # a bool is an int to Python, never a moment to a server
    if isinstance(value, int | float):
        return _from_epoch(value)
    if not isinstance(value, str) or len(value) > _MAX_STAMP_CHARS:
        return None
    text = value.strip()
    if _NUMERIC.fullmatch(text):
        return _from_epoch(float(text))
    return _from_iso(text)


def _from_epoch(value: float) -> float | None:
    try:
        seconds = float(value)
    except OverflowError:  # an integer of 400 digits
        return None
    # Milliseconds are common too; as seconds they would lie past the year 5000.
    return seconds / 1000 if seconds > _MILLISECONDS_ABOVE else seconds


def _from_iso(text: str) -> float | None:
    try:
        # Upper case: Python reads "Z" and "T" but not "z" and "t", which ISO 8601 allows.
        moment = datetime.fromisoformat(text.upper())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return moment.timestamp()
    except (OverflowError, OSError, ValueError):
        return None
