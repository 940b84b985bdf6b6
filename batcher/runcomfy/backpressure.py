"""When may the next submit go? An account's cap on jobs in flight, and outages.

Two answers from RunComfy mean "not now", never "not this run":

- **429 on a submit.** Besides a request rate, an account has a cap on jobs
  in flight (undocumented; it answers 429 past it). `AccountCap` learns it:
  a submit refused with 429 lowers the number of jobs this run keeps in
  flight to what RunComfy holds now (accepted, not finished: never the
  submits still on their way), and every job that leaves RunComfy after a
  quiet spell raises it by one, up to --concurrency, so the run finds the
  cap again if it was lifted. Such a 429 is the account's cap speaking, not
  its request rate: it does not slow the run's other calls (see
  `batcher.runcomfy.pacing`).
- **A probe at the cap.** While the account is full at a cap it met, one
  waiting submit may go anyway, when its jobs have likely left unseen
  (`batcher.runcomfy.probing`): a slot is refilled before a poll sees it free.
- **No connection at all.** `Outage` pauses every call while RunComfy
  cannot be reached: one task probes it with capped, jittered backoff, the
  others wait; past the patience the run ends (exit 1), and every job never
  accepted stays pending for the next plain run.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from .probing import Probe

if TYPE_CHECKING:
    from .polling import DurationModel

__all__ = ["AccountCap", "Outage"]


class AccountCap:
    """Jobs this run keeps in flight at one account: held by RunComfy (accepted, not finished) or being sent.

    Bookkeeping only: `batcher.engine.lanes.AccountPool` waits for room and hands it out.
    """

    def __init__(self, ceiling: int, *, recover_after: float = 5.0, most_quiet: float = 60.0) -> None:
        self.ceiling = ceiling
        self.limit = ceiling
        self.held = 0
        """Jobs RunComfy took and this run has not seen finish (adopted ones from earlier runs too)."""
        self.sending = 0
        """Submits sent, or about to be, whose answer is not in yet."""
        self.refusals = 0
        self.recover_after = recover_after
        self.most_quiet = most_quiet
        self.quiet = recover_after
        """Seconds without a 429 before the limit is raised again: doubled by each raise RunComfy refuses
        (up to most_quiet), so an account run at its cap is asked past it less and less often."""
        self._refused_at = -math.inf
        self._raised = False
        self.probe = Probe(most_quiet=most_quiet)
        """Submits sent past the cap while it is full (see `batcher.runcomfy.probing`)."""

    @property
    def in_flight(self) -> int:
        return self.held + self.sending

    @property
    def room(self) -> int:
        """How many more submits may go now (0 or less: none)."""
        return self.limit - self.in_flight

    @property
    def cooling(self) -> bool:
        """True within the quiet spell after a 429: the account is full, perhaps with jobs this run cannot
        see (another machine's), whatever its room says."""
        return time.monotonic() - self._refused_at < self.quiet

    def take(self, probe_for: str | None = None) -> None:
        """Count one more submit about to be sent (probe_for: the job whose submit goes past a full cap
        as its probe, see `probe_at`)."""
        self.sending += 1
        if probe_for is not None:
            self.probe.went(probe_for)

    def probe_at(self, durations: DurationModel | None) -> float | None:
        """When (time.time) a waiting submit may go past this account as a probe; None while it has met
        no cap or is not full, while too little is learned of how long jobs take, or while one is out."""
        if self.refusals == 0 or self.in_flight < self.limit:
            return None
        return self.probe.due(durations)

    def adopt(self, at: float | None = None) -> None:
        """Count a job an earlier run submitted (at: when it was accepted) (in flight whatever the limit says)."""
        self.held += 1
        self.probe.held(at)

    def accepted(self, key: str | None = None) -> None:
        """The counted submit of job `key` was taken. RunComfy holds this many at once, so its cap is at
        least that: an acceptance whose answer crossed a 429's lifts a limit that 429 set too low."""
        self.sending = max(0, self.sending - 1)
        self.held += 1
        self.probe.held()
        if self.probe.is_for(key):
            if self.held > self.limit:
                # The probe was taken: a job this run still counts as held has left RunComfy unseen.
                # The cap is what it was; the next poll of that job gives its slot back to the count.
                self.probe.taken()
                return
            self.probe.answered()  # into a slot seen free meanwhile: an acceptance as any other
        if self.held >= self.limit and self._raised:
            self._raised, self.quiet = False, self.recover_after  # the raised limit is reached: RunComfy allows it
        self.limit = min(self.ceiling, max(self.limit, self.held))

    def unsent(self, key: str | None = None) -> None:
        """The counted submit of job `key` was not accepted (or its fate is unknown and this run will
        not poll it)."""
        self.sending = max(0, self.sending - 1)
        if self.probe.is_for(key):
            self.probe.gone()

    def refused(self, key: str | None = None, retry_after: float | None = None) -> bool:
        """The counted submit of job `key` was answered 429 (retry_after: the seconds it asked for):
        keep no more in flight than RunComfy holds now. True when it was the probe: its job waits for
        the account's room (or the next probe) again, not a backoff of its own.

        The jobs it holds are what this run counts as held: submits still
        being sent are not, else the burst that met the cap would set it.
        """
        self.sending = max(0, self.sending - 1)
        self.refusals += 1
        self._refused_at = time.monotonic()
        if self._raised:
            self._raised, self.quiet = False, min(self.most_quiet, self.quiet * 2)
        self.limit = max(1, min(self.limit, self.held))
        probe = self.probe.is_for(key)
        self.probe.full(retry_after, probe=probe)
        return probe

    def release(self, at: float | None = None) -> None:
        """A held job left RunComfy. When the account was full at its limit and no 429 came for a quiet
        spell, the limit goes up by one (up to the ceiling), one step at a time: the next step waits until
        RunComfy took a job at this one. So the run finds the cap again if it was lifted, and meets a
        cap that stays with one 429 a spell. at: when the job was accepted (None: not known)."""
        full = self.held >= self.limit
        self.held = max(0, self.held - 1)
        self.probe.left(at)
        quiet = time.monotonic() - self._refused_at >= self.quiet
        if full and quiet and self.limit < self.ceiling and not self._raised:
            self.limit += 1
            self._raised = True


class Outage:
    """Whether RunComfy can be reached; calls wait here while it cannot, for at most `patience` seconds.

    Patience counts from the last call that got a real answer: a probe that
    gets through only lets the waiting calls try again, so a service that
    answers probes but fails every real call still ends the run in time.
    """

    def __init__(self, patience: float, *, first_wait: float = 1.0, cap: float = 30.0) -> None:
        self.patience = patience
        self.first_wait = first_wait
        self.cap = cap
        self.down_since: float | None = None
        self.gave_up = False
        self._bound = first_wait
        self._probing = False
        self._changed = anyio.Event()

    @property
    def down_for(self) -> float:
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

    def failed(self) -> None:
        """A call could not get through (after the client's own retries)."""
        if self.down_since is None:
            self.down_since = time.monotonic()

    def reached(self) -> None:
        """A call got a real answer: the outage, if any, is over."""
        self.down_since = None
        self._bound = self.first_wait

    async def wait(self, probe: Callable[[], Awaitable[bool]]) -> bool:
        """Wait until a probe gets through, then True; False once the patience has run out.

        The first caller probes (probe returns True when RunComfy answered);
        the others wait for its verdict, so a thousand stalled jobs make one
        probe, not a thousand.
        """
        if self.gave_up or self.down_since is None:
            return not self.gave_up
        if self._probing:
            changed = self._changed
            await changed.wait()
            return not self.gave_up
        self._probing = True
        try:
            while self.down_since is not None:
                left = self.patience - self.down_for
                if left <= 0:
                    self.gave_up = True
                    break
                await anyio.sleep(min(left, random.uniform(self._bound / 2, self._bound)))
                self._bound = min(self.cap, self._bound * 2)
                if await probe():
                    break
        finally:
            self._probing = False
            self._changed.set()
            self._changed = anyio.Event()
        return not self.gave_up
