"""When may a submit go past an account that is full? When some of its jobs have likely left unseen.

An account at its cap of jobs in flight frees a slot when a job ends at
RunComfy, but this run refills it only once a poll sees the end: the slot
sits idle for the notice delay (about 8% of a job's time on a 10-30 s mix,
so about 93% of the cap used). A probe is one waiting submit sent anyway:
taken, it fills a slot some unseen job freed; refused with 429 (certain:
nothing accepted, nothing paid), it says that no slot was free then.

`Probe` sends one when the jobs held are expected to have freed
`PROBE_AT` slots unseen since the account last said it was full. Each
held job's chance of having ended since then comes from its age and the
durations this run has learned (`batcher.runcomfy.polling.DurationModel`):
jobs younger than the fastest seen count nothing, so a run whose jobs all
started together does not probe until they can end. Probes never go before
the last 429's Retry-After, one at a time, and after several refused in a
row each next waits 1.5x longer (up to `most_quiet`): an account full of
jobs this run cannot see (another machine's) is asked less and less often.
"""

from __future__ import annotations

import bisect
import math
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .polling import DurationModel

__all__ = ["PROBE_AT", "Probe"]

PROBE_AT = 0.25
"""Slots expected freed unseen before a probe goes: about two probes in five are then taken (1 - e^-0.5)."""
_FREE_REFUSALS = 4
"""Probes refused in a row before the next ones wait longer: most probes at a busy cap are refused."""
_SEARCH_STEPS = 16


class Probe:
    """One account's probes past its cap; the clock is wall time (`time.time`), as the journal's."""

    def __init__(self, *, most_quiet: float = 60.0) -> None:
        self.most_quiet = most_quiet
        self.out = False
        """A probe is on its way: no second one until it is answered."""
        self.sent = 0
        self.refused = 0
        """Probes sent this run, and how many of them RunComfy refused."""
        self._started: list[float] = []
        """When each held job was accepted, sorted (an adopted one: when the earlier run saw it accepted)."""
        self._full_at = -math.inf
        """The last moment every held job was known in flight: a 429 (or a taken probe) then."""
        self._not_before = -math.inf
        self._in_a_row = 0
        self._due: tuple[int, float] | None = None
        self._version = 0

    def held(self, at: float | None = None) -> None:
        """A job is held at the account, accepted at `at` (now when None)."""
        bisect.insort(self._started, time.time() if at is None else at)
        self._version += 1

    def left(self, at: float | None = None) -> None:
        """A held job was seen to leave (accepted at `at`; the oldest when not known)."""
        started = self._started
        if not started:
            return
        i = 0 if at is None else bisect.bisect_left(started, at)
        if i == len(started) or (i > 0 and at is not None and at - started[i - 1] <= started[i] - at):
            i -= 1
        del started[i]
        self._version += 1

    def full(self, retry_after: float | None) -> None:
        """A submit met the cap (429): every held job is in flight now; none before Retry-After."""
        now = time.time()
        self._full_at = now
        if retry_after is not None and retry_after > 0:
            self._not_before = now + min(retry_after, self.most_quiet)
        if self.out:
            self.out = False
            self.refused += 1
            self._in_a_row = min(self._in_a_row + 1, 64)
        self._version += 1

    def went(self) -> None:
        """A probe is sent."""
        self.out = True
        self.sent += 1
        self._version += 1

    def taken(self) -> None:
        """The probe was accepted: one unseen slot is used up, the rest count from now."""
        self.out = False
        self._in_a_row = 0
        self._full_at = time.time()
        self._version += 1

    def gone(self) -> None:
        """The probe got no answer that counts (unsent, uncertain): none is out."""
        if self.out:
            self.out = False
            self._version += 1

    def due(self, durations: DurationModel | None) -> float | None:
        """When (time.time) the next probe may go; None with no 429 yet, too little learned, or one out."""
        if self.out or self._full_at == -math.inf or not self._started or durations is None:
            return None
        if len(durations) < durations.min_samples:
            return None
        key = (self._version << 20) + len(durations)
        if self._due is not None and self._due[0] == key:
            return self._due[1]
        found = self._search(durations.sorted_durations())
        wait = (found - self._full_at) * 1.5 ** max(0, self._in_a_row - _FREE_REFUSALS)
        due = max(self._not_before, self._full_at + min(wait, self.most_quiet))
        self._due = (key, due)
        return due

    def _search(self, durations: list[float]) -> float:
        """The first moment the held jobs are expected to have freed PROBE_AT slots since `_full_at`
        (bisection: the expectation only grows), or the horizon of the longest job seen."""
        since, mean = self._full_at, sum(durations) / len(durations)
        low, high = since, since + durations[-1] + 1.0
        if self._unseen(durations, mean, high) < PROBE_AT:
            return high
        for _ in range(_SEARCH_STEPS):
            middle = (low + high) / 2
            if self._unseen(durations, mean, middle) >= PROBE_AT:
                high = middle
            else:
                low = middle
        return high

    def _unseen(self, durations: list[float], mean: float, at: float) -> float:
        """Held jobs expected to have ended between `_full_at` and at: for each, the chance a job of its
        age then ends by its age at `at`, from the durations learned. A job older than every duration
        learned counts at the rate of the mean duration."""
        count = len(durations)
        since, expected = self._full_at, 0.0
        for started in self._started:
            known = max(0.0, since - started)
            alive = 1.0 - bisect.bisect_right(durations, known) / count
            if alive <= 0.0:
                expected += min(1.0, (at - max(since, started)) / mean)
                continue
            ended = bisect.bisect_right(durations, at - started) / count - (1.0 - alive)
            expected += max(0.0, ended) / alive
        return expected
