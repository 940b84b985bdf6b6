"""When is a failed call tried again, and after how long?

One loop for every call batcher repeats (API polls and cancels, output
downloads), in the spirit of hynek/stamina: capped exponential backoff with
full jitter, a server's ``Retry-After`` honoured up to
`RetryPolicy.max_retry_after`. What is worth another try is the caller's
rule, a predicate on the exception an attempt raised: it answers `TryAgain`
(carrying the server's Retry-After, when there was one) or None (raise it
now). When the tries run out, the last exception is raised as it is.

Submits cost money, so they do not go through that loop: the client sends
each once, and `batcher.engine.steps` sends again only what certainly was not
accepted, waiting `RetryPolicy.backoff` after journalling the refusal, so
that a kill during the wait leaves nothing that looks unanswered.

`retrying_blocking` is the same loop for a call made on a worker thread
(object-storage uploads, `batcher.output.remote`): it sleeps the thread instead of
the task.

`set_testing(True)` makes every wait zero (retries and the rate limiter's
pauses), so that tests never really sleep; it is off unless a test turns it on.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import anyio

from ..flags import flagged

__all__ = [
    "RetryPolicy",
    "TryAgain",
    "is_testing",
    "parse_retry_after",
    "retrying",
    "retrying_blocking",
    "set_testing",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_testing = False


def set_testing(testing: bool) -> None:
    """Turn waiting off (True) or back on (False): with it off, every retry and every rate-limit pause is instant."""
    global _testing
    _testing = testing


def is_testing() -> bool:
    """True while `set_testing` has turned waiting off."""
    return _testing


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter; `Retry-After` wins when the server sends one."""

    attempts: int = flagged(
        6,
        "--retries",
        minimum=1,
        maximum=20,
        help="Attempts per API call on 429, 5xx and connection faults (backoff with jitter between them).",
    )
    base: float = 0.5
    cap: float = 30.0
    max_retry_after: float = 120.0

    def delays(self) -> Iterator[float]:
        """Upper bounds of each wait between attempts (attempts - 1 of them)."""
        for attempt in range(self.attempts - 1):
            yield min(self.cap, self.base * 2**attempt)

    def backoff(self, tried: int, retry_after: float | None = None) -> float:
        """The wait after the tried-th failure (from 0) of a wait-and-try-again loop of the caller's own:
        the same growth and jitter as `retrying`, and zero under `set_testing`.

        Such a loop has no end of its own (a submit refused "not now" is tried for as long as the run
        lasts), so a server's Retry-After may lengthen the wait but never shorten it: ``Retry-After: 0``
        would have it send, and journal, as fast as the server answers.
        """
        if _testing:
            return 0.0
        jittered = random.uniform(0, min(self.cap, self.base * 2 ** min(tried, 30)))
        return jittered if retry_after is None else max(jittered, min(retry_after, self.max_retry_after))

    def wait(self, bound: float, retry_after: float | None) -> float:
        """The wait before the next attempt: the server's Retry-After (at most max_retry_after), else 0 to bound."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        return random.uniform(0, bound)


@dataclass(frozen=True, slots=True)
class TryAgain:
    """A predicate's answer: worth another try, after ``retry_after`` seconds when the server named them."""

    retry_after: float | None = None


def parse_retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds; None when absent or an HTTP date (rare: our own backoff then)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


async def retrying(
    attempt: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    retry_on: Callable[[Exception], TryAgain | None],
    name: str,
) -> T:
    """``await attempt()`` until it returns, raises what retry_on answers None for, or has had policy.attempts tries.

    The exception that ends it is raised as it is; name says in the debug log which call is retried.
    """
    bounds = [*policy.delays(), None]
    for tried, bound in enumerate(bounds, start=1):
        try:
            return await attempt()
        except Exception as exc:
            delay = _after(exc, policy, retry_on, name, bound, tried, len(bounds))
        # Outside the except block: the error just handled must not become the context of a later one.
        await anyio.sleep(delay)
    msg = "unreachable: the last try returns or raises"
    raise AssertionError(msg)


def retrying_blocking(
    attempt: Callable[[], T],
    *,
    policy: RetryPolicy,
    retry_on: Callable[[Exception], TryAgain | None],
    name: str,
) -> T:
    """`retrying` for a blocking call on a worker thread: the same decisions, the thread sleeps between tries."""
    bounds = [*policy.delays(), None]
    for tried, bound in enumerate(bounds, start=1):
        try:
            return attempt()
        except Exception as exc:
            delay = _after(exc, policy, retry_on, name, bound, tried, len(bounds))
        time.sleep(delay)
    msg = "unreachable: the last try returns or raises"
    raise AssertionError(msg)


def _after(
    exc: Exception,
    policy: RetryPolicy,
    retry_on: Callable[[Exception], TryAgain | None],
    name: str,
    bound: float | None,
    tried: int,
    tries: int,
) -> float:
    """The wait before the next try after exc; re-raises exc (from inside its except block) when there is none."""
    verdict = retry_on(exc)
    if verdict is None or bound is None:
        raise exc
    delay = 0.0 if _testing else policy.wait(bound, verdict.retry_after)
    log.debug("%s: %s; try %d of %d in %.2f s", name, str(exc) or type(exc).__name__, tried + 1, tries, delay)
    return delay
