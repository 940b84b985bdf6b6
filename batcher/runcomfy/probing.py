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
        self.out_for: str | None = None
        """The job whose submit is the probe on its way (none goes until it is answered)."""
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

    @property
    def out(self) -> bool:
        return self.out_for is not None

    def is_for(self, key: str | None) -> bool:
        """Whether the submit of job `key` is the probe on its way."""
        return key is not None and key == self.out_for

    def full(self, retry_after: float | None, *, probe: bool) -> None:
        """A submit met the cap (429; probe: it was the probe): every held job is in flight now; none
        goes before the Retry-After."""
        now = time.time()
        self._full_at = now
        if retry_after is not None and retry_after > 0:
            self._not_before = now + min(retry_after, self.most_quiet)
        if probe:
            self.out_for = None
            self.refused += 1
            self._in_a_row = min(self._in_a_row + 1, 64)
        self._version += 1

    def went(self, key: str) -> None:
        """The submit of job `key` goes as the probe."""
        self.out_for = key
        self.sent += 1
        self._version += 1

    def taken(self) -> None:
        """The probe was accepted past the cap: one unseen slot is used up, the rest count from now."""
        self.out_for = None
        self._in_a_row = 0
        self._full_at = time.time()
        self._version += 1

    def answered(self) -> None:
        """The probe was accepted into a slot this run saw free meanwhile: an acceptance as any other."""
        self.out_for = None
        self._version += 1

    def gone(self) -> None:
        """The probe got no answer that says anything of the cap (not sent, or uncertain: no answer
        at all): the next waits as after a refusal, so a failing service is not probed at line rate."""
        self.out_for = None
        self._full_at = time.time()
        self._in_a_row = min(self._in_a_row + 1, 64)
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
        slower = 1.5 ** max(0, self._in_a_row - _FREE_REFUSALS) - 1.0
        due = max(self._not_before, found + min((found - self._full_at) * slower, self.most_quiet))
        self._due = (key, due)
        return due

    def _search(self, durations: list[float]) -> float:
        """The first moment the held jobs are expected to have freed PROBE_AT slots since `_full_at`
        (bisection: the expectation only grows), or once the youngest held job is older than any seen."""
        since, mean = self._full_at, sum(durations) / len(durations)
        # From the youngest: an account refilled long after its last 429 holds young jobs that cannot
        # have ended yet, however long ago that 429 was.
        low, high = since, max(since, self._started[-1]) + durations[-1] + 1.0
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
