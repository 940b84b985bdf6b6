"""How fast may a run call RunComfy? One pace for every call, lowered on 429 and regained slowly (AIMD)."""

from __future__ import annotations

import math
import time
from collections import deque

import anyio

from ..net.retrying import is_testing

__all__ = ["RateLimiter"]


class RateLimiter:
    """Paces every call of a run; slows down when refused, then recovers (AIMD).

    ``rate`` is the ceiling in requests a second (None: no limit until the
    service objects). A 429 halves the pace (from the rate actually observed
    when there was no limit), at most once a second, so that the burst of
    429s from requests already in flight counts as one signal; every second
    without one, the pace grows by `recovery` until it is back at the
    ceiling, or, with no ceiling, at twice the pace that was refused, where
    the limit is lifted again. It grows only while it actually holds calls
    back, so an idle spell does not build up a pace the service would refuse.
    """

    def __init__(self, rate: float | None = None, *, floor: float = 0.2, recovery: float = 1.05) -> None:
        self.ceiling = rate
        self.rate = rate
        self.floor = floor
        self.recovery = recovery
        self.refusals = 0
        self._next = 0.0
        self._cut_at = -math.inf
        self._tick_at = 0.0
        self._lift_at: float | None = None
        self._held_back = False
        self._recent: deque[float] = deque(maxlen=4096)

    async def wait(self) -> None:
        now = time.monotonic()
        self._recent.append(now)
        if self.rate is None:
            return
        self._recover(now)
        if self.rate is None:
            return
        slot = max(now, self._next)
        self._next = slot + 1.0 / self.rate
        if slot > now:
            self._held_back = True
            if not is_testing():
                await anyio.sleep(slot - now)

    def refused(self) -> None:
        """Count a 429 against the pace."""
        now = time.monotonic()
        self.refusals += 1
        if now - self._cut_at < 1.0:
            return
        observed = sum(1 for t in self._recent if now - t <= 1.0)
        current = self.rate if self.rate is not None else float(max(observed, 1))
        if self.ceiling is None:
            self._lift_at = 2 * current
        self.rate = max(self.floor, current / 2)
        # Two clocks: sharing one with the recovery tick below let that tick, every
        # second, hide the 429s that followed it, so the pace never came down.
        self._cut_at = self._tick_at = now

    def _recover(self, now: float) -> None:
        assert self.rate is not None
        elapsed = now - self._tick_at
        if elapsed < 1.0:
            return
        if self._held_back:
            # Grow only while the pace is what holds calls back: a pace far above the
            # real demand would let the next burst through unchecked.
            self.rate *= self.recovery ** int(elapsed)
        self._held_back = False
        self._tick_at = now
        if self.ceiling is not None:
            self.rate = min(self.rate, self.ceiling)
        elif self._lift_at is not None and self.rate >= self._lift_at:
            self.rate = None
