"""Which account does each call go to? One lane per token: its own client, pacer and in-flight cap.

A RunComfy account has its own limits (requests a second, jobs in flight),
so each token gets a `Lane`: a `RunComfyClient` with its own adaptive
`RateLimiter` and an `AccountCap` learned from that account's 429s alone.
A submit goes to the account with the most room (`AccountPool.acquire`);
every later call about the job — poll, result, cancel — goes to the
account that submitted it, found by the fingerprint the journal recorded
(RunComfy answers 403001 to any other account). A job whose account has no
token in this run has no lane (`AccountPool.lane_for` is None): it is held,
never sent again. One exception keeps a rotated key working: a folder whose
journal names one account at most, run with one token, takes that token to
be the same account's (`AccountPool.recorded`); if it is not, RunComfy's
403001 stops the run with a message, as it always did.

An account whose token RunComfy refuses stops alone (`AccountPool.refuse`):
no more submits go to it and its jobs in flight are held for the next run,
while the other accounts go on; only when every account is refused does the
run halt.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from ..errors import AuthError
from ..runcomfy.account import Account, read_balances
from ..runcomfy.backpressure import AccountCap
from ..runcomfy.client import RateLimiter, RunComfyClient
from ..runcomfy.refusals import TOKEN_ENV
from ..runcomfy.tokens import fingerprint

if TYPE_CHECKING:
    from ..runcomfy.polling import DurationModel
    from .endpoint import Endpoint
    from .options import RunOptions

__all__ = ["AccountPool", "Lane", "balances_of", "open_pool"]


@dataclass(slots=True, eq=False)
class Lane:
    """One account as a run uses it."""

    account: str
    """The token's fingerprint (`batcher.runcomfy.tokens.fingerprint`): what the journal records."""
    client: RunComfyClient
    cap: AccountCap
    submitted: int = 0
    """Submits this run sent through this account and RunComfy took."""
    refused: AuthError | None = None
    """RunComfy refused this account's token this run: nothing more is sent or asked through it."""

    @property
    def throttled(self) -> int:
        """429s this run met on this account: on submits (its cap) and on any call (its pace)."""
        return self.cap.refusals + self.client.rate_limiter.refusals


class AccountPool:
    """The lanes of a run, first token first; submits spread over them by room."""

    def __init__(self, lanes: Sequence[Lane]) -> None:
        if not lanes:
            msg = "an account pool needs at least one lane"
            raise ValueError(msg)
        self.lanes = tuple(lanes)
        self.primary = self.lanes[0]
        """The first token's lane: for calls about no job (prices, the outage probe) and journals that name
        no account (written before accounts were recorded, always with one token)."""
        self._by_account = {lane.account: lane for lane in self.lanes}
        self._changed = anyio.Event()
        self._stand_in = len(self.lanes) == 1
        self.durations: DurationModel | None = None
        """How long the run's jobs take (the run's poll timing shares it): when a full account's jobs
        have likely left unseen, for its probe."""

    def recorded(self, accounts: set[str]) -> None:
        """Tell the pool which accounts the journal names. With one token and a journal naming one account
        (or none), that token stands in for it: the same account with a new key, most likely."""
        self._stand_in = len(self.lanes) == 1 and len(accounts) <= 1

    def lane_for(self, account: str | None) -> Lane | None:
        """The lane of the account that submitted a job; None when this run holds no token for it."""
        if account is None:
            return self.primary
        found = self._by_account.get(account)
        if found is None and self._stand_in:
            return self.primary
        return found

    async def acquire(self, key: str | None = None) -> Lane:
        """Wait until some account has room for one more job in flight, count it there, and return its lane.

        The lane with the most room left (relative to its learned cap) wins, the first token on a tie,
        so a fresh run fills accounts evenly and an account that is 429ing gets fewer. An account that
        answered 429 within its quiet spell comes after every other with room: full with jobs this run
        does not hold (another machine's), its room says 1 of 1, and a retried submit would go back to
        it on every try. When every account is full at a cap it met, the submit of job `key` may go
        as an account's probe (`AccountCap.probe_at`), one at a time. The caller then says what became
        of the submit, with the same key: `accepted`, `refused` (a 429) or `unsent`.
        """
        while True:
            usable = [lane for lane in self.lanes if lane.refused is None]
            if not usable:
                # Every token refused: the run halts (see `refuse`); the caller finds it stopped.
                self.primary.cap.take()
                return self.primary
            free = [lane for lane in usable if lane.cap.room > 0]
            if free:
                lane = max(free, key=lambda ln: (not ln.cap.cooling, ln.cap.room / ln.cap.limit))
                lane.cap.take()
                return lane
            # Every account is full: the first whose probe is due takes this submit past its cap
            # (`batcher.runcomfy.backpressure`); else wait for room or the next probe.
            probes = [(at, i) for i, lane in enumerate(usable) if (at := lane.cap.probe_at(self.durations)) is not None]
            due, first = min(probes, default=(math.inf, 0))
            if key is not None and due <= time.time():
                lane = usable[first]
                lane.cap.take(probe_for=key)
                return lane
            changed = self._changed
            with anyio.move_on_after(due - time.time()):
                await changed.wait()

    @property
    def revoked(self) -> list[Lane]:
        """The lanes whose token RunComfy refused this run, first token first."""
        return [lane for lane in self.lanes if lane.refused is not None]

    def refuse(self, lane: Lane, error: AuthError) -> bool:
        """RunComfy refused lane's token: no submit goes there again this run. True when no account is
        left to send through (the caller halts the run); submits waiting for room look again."""
        if lane.refused is None:
            lane.refused = error
        self._notify()
        return all(other.refused is not None for other in self.lanes)

    def adopt(self, lane: Lane, at: float | None = None) -> None:
        """Count a job an earlier run submitted through lane, accepted at `at` (in flight whatever its limit says)."""
        lane.cap.adopt(at)

    def accepted(self, lane: Lane, key: str | None = None) -> None:
        """RunComfy took the submit of job `key` counted on lane: held there until `release`."""
        lane.cap.accepted(key)
        self._notify()

    def refused(self, lane: Lane, key: str | None = None, retry_after: float | None = None) -> bool:
        """The submit counted on lane was answered 429: that account's cap comes down to what it holds.
        True when it was the account's probe (`acquire`): its job waits in `acquire` again, no backoff."""
        probe = lane.cap.refused(key, retry_after)
        self._notify()
        return probe

    def unsent(self, lane: Lane, key: str | None = None) -> None:
        """The submit of job `key` counted on lane was not accepted (or is held uncertain): its room is
        free again."""
        lane.cap.unsent(key)
        self._notify()

    def release(self, lane: Lane, at: float | None = None) -> None:
        """A job held on lane (accepted at `at`) left RunComfy: room for another, anywhere."""
        lane.cap.release(at)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()


@asynccontextmanager
async def open_pool(
    tokens: Sequence[str], base_url: str, options: RunOptions, *, token_env: str = TOKEN_ENV
) -> AsyncIterator[AccountPool]:
    """A lane per token, each with its own client (so its own connection pool and pacer), closed on exit;
    token_env: where the tokens came from, for the message when RunComfy refuses one."""
    async with AsyncExitStack() as stack:
        lanes = []
        for token in tokens:
            client = await stack.enter_async_context(
                RunComfyClient(
                    token,
                    base_url,
                    retry=options.retry,
                    rate_limiter=RateLimiter(options.rate),
                    transport=options.api_transport,
                    submit_timeout=options.submit_timeout,
                    poll_timeout=options.poll_timeout,
                    max_connections=options.concurrency,
                    max_answer_bytes=options.max_answer_bytes,
                    token_env=token_env,
                )
            )
            lanes.append(Lane(fingerprint(token), client, AccountCap(options.concurrency)))
        yield AccountPool(lanes)


async def balances_of(endpoint: Endpoint, options: RunOptions, first: Account) -> list[tuple[str, float | None]]:
    """Each account's fingerprint and balance (None: not known), first token first; first is what
    `batcher.runcomfy.account.look_up` already read for the first token. With several accounts whose balances are
    all known, first.balance becomes their sum: the run's estimate is checked against what they hold together."""
    found: list[tuple[str, float | None]] = [(fingerprint(endpoint.token), first.balance)]
    if len(endpoint.tokens) < 2:
        return found
    others = endpoint.tokens[1:]
    read: Sequence[float | None] = [None] * len(others)
    if options.live_prices:
        read = await read_balances(
            endpoint.base_url, others, transport=options.api_transport, balance=endpoint.balance_base
        )
    found += [(fingerprint(token), balance) for token, balance in zip(others, read, strict=True)]
    known = [balance for _, balance in found if balance is not None]
    first.balance = sum(known) if len(known) == len(found) else None
    return found
