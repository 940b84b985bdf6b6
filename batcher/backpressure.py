"""When may the next submit go? An account's cap on jobs in flight, and outages.

Two answers from RunComfy mean "not now", never "not this run":

- **429 on a submit.** Besides a request rate, an account has a cap on jobs
  in flight (undocumented; it answers 429 past it). `AccountCap` learns it:
  a submit refused with 429 lowers the number of jobs this run keeps in
  flight to what RunComfy holds now, and every job that leaves RunComfy
  after a quiet spell raises it by one, up to --concurrency, so the run
  finds the cap again if it was lifted.
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

import anyio

__all__ = ["AccountCap", "Outage"]


class AccountCap:
    """Jobs this run keeps in flight at RunComfy (submitted, not yet finished)."""

    def __init__(self, ceiling: int, *, recover_after: float = 5.0) -> None:
        self.ceiling = ceiling
        self.limit = ceiling
        self.in_flight = 0
        self.refusals = 0
        self.recover_after = recover_after
        self._refused_at = -math.inf
        self._changed = anyio.Event()

    async def acquire(self) -> None:
        """Wait until one more job may be in flight, then count it."""
        while self.in_flight >= self.limit:
            changed = self._changed
            await changed.wait()
        self.in_flight += 1

    def adopt(self) -> None:
        """Count a job an earlier run submitted (it is in flight whatever the limit says)."""
        self.in_flight += 1

    def release(self) -> None:
        """A counted job left RunComfy (or was never accepted)."""
        self.in_flight = max(0, self.in_flight - 1)
        if self.limit < self.ceiling and time.monotonic() - self._refused_at >= self.recover_after:
            self.limit += 1
        self._notify()

    def refused(self) -> None:
        """A counted submit was answered 429: hold no more jobs in flight than RunComfy has now."""
        self.refusals += 1
        self._refused_at = time.monotonic()
        self.limit = max(1, min(self.limit, self.in_flight - 1))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()


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
