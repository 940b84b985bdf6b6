"""The one retry loop: what its predicate decides, how long it waits, and the testing switch."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from batcher.net.retrying import (
    RetryPolicy,
    TryAgain,
    is_testing,
    parse_retry_after,
    retrying,
    retrying_blocking,
    set_testing,
)


class Flaky(Exception):
    pass


class Broken(Exception):
    pass


def _script(*outcomes: Exception | str) -> tuple[list[int], Callable[[], Awaitable[str]]]:
    """An attempt that raises or returns each outcome in turn, and the list counting its calls."""
    calls: list[int] = []

    async def attempt() -> str:
        calls.append(len(calls))
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return calls, attempt


def _flaky_only(exc: Exception) -> TryAgain | None:
    return TryAgain() if isinstance(exc, Flaky) else None


@pytest.fixture
def testing() -> Iterator[None]:
    set_testing(True)
    yield
    set_testing(False)


@pytest.mark.usefixtures("testing")
async def test_what_the_predicate_refuses_is_raised_at_once_and_the_rest_until_the_budget() -> None:
    policy = RetryPolicy(attempts=3, base=60.0)  # a real wait would be a minute: the switch makes it none
    calls, attempt = _script(Flaky("1"), Flaky("2"), "done")
    assert await retrying(attempt, policy=policy, retry_on=_flaky_only, name="t") == "done"
    assert len(calls) == 3

    calls, attempt = _script(Flaky("1"), Broken("final"), "never")
    with pytest.raises(Broken, match="final"):
        await retrying(attempt, policy=policy, retry_on=_flaky_only, name="t")
    assert len(calls) == 2

    calls, attempt = _script(Flaky("1"), Flaky("2"), Flaky("last"), "never")
    with pytest.raises(Flaky, match="last") as caught:
        await retrying(attempt, policy=policy, retry_on=_flaky_only, name="t")
    assert len(calls) == 3
    assert caught.value.__context__ is None, "an earlier try's error is not chained to the last one"


@pytest.mark.usefixtures("testing")
def test_the_blocking_loop_decides_as_the_async_one() -> None:
    """retrying_blocking (uploads on worker threads): the same predicate, budget and unchained last error."""
    policy = RetryPolicy(attempts=3, base=60.0)
    outcomes: list[Exception | str] = [Flaky("1"), Flaky("2"), "done"]
    calls: list[int] = []

    def attempt() -> str:
        calls.append(1)
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert retrying_blocking(attempt, policy=policy, retry_on=_flaky_only, name="t") == "done"
    assert len(calls) == 3
    calls.clear()
    outcomes[:] = [Flaky("1"), Broken("final"), "never"]
    with pytest.raises(Broken, match="final"):
        retrying_blocking(attempt, policy=policy, retry_on=_flaky_only, name="t")
    assert len(calls) == 2
    calls.clear()
    outcomes[:] = [Flaky("1"), Flaky("2"), Flaky("last"), "never"]
    with pytest.raises(Flaky, match="last") as caught:
        retrying_blocking(attempt, policy=policy, retry_on=_flaky_only, name="t")
    assert len(calls) == 3
    assert caught.value.__context__ is None


async def test_waits_are_jittered_below_the_capped_bound_and_retry_after_wins_up_to_its_cap() -> None:
    policy = RetryPolicy(attempts=6, base=0.5, cap=3.0, max_retry_after=10.0)
    assert list(policy.delays()) == [0.5, 1.0, 2.0, 3.0, 3.0]
    waits = [policy.wait(2.0, None) for _ in range(200)]
    assert all(0 <= w <= 2.0 for w in waits) and len(set(waits)) > 100  # full jitter: anywhere in [0, bound]
    assert policy.wait(2.0, 7.0) == 7.0
    assert policy.wait(2.0, 3600.0) == 10.0
    assert [parse_retry_after(v) for v in (None, "3", "-1", "1.5", "Wed, 21 Oct 2015 07:28:00 GMT")] == [
        None,
        3.0,
        0.0,
        1.5,
        None,
    ]


async def test_the_loop_really_waits_unless_testing() -> None:
    assert not is_testing(), "waiting is on unless a test turns it off"
    policy = RetryPolicy(attempts=2, base=0.001, max_retry_after=1.0)

    def told(exc: Exception) -> TryAgain:
        return TryAgain(retry_after=1.0)

    _, attempt = _script(Flaky("1"), "done")
    started = time.monotonic()
    await retrying(attempt, policy=policy, retry_on=told, name="t")
    assert time.monotonic() - started >= 0.99

    set_testing(True)
    try:
        _, attempt = _script(Flaky("1"), "done")
        started = time.monotonic()
        await retrying(attempt, policy=policy, retry_on=told, name="t")
        assert time.monotonic() - started < 0.5  # the told second not slept (generous for a loaded machine)
    finally:
        set_testing(False)


def test_a_loop_of_the_callers_own_waits_as_retrying_would_and_honours_retry_after() -> None:
    # steps.submit's: it journals each refusal before this wait, so it cannot go through `retrying`.
    policy = RetryPolicy(attempts=6, base=0.5, cap=3.0, max_retry_after=10.0)
    assert all(0 <= policy.backoff(tried) <= min(3.0, 0.5 * 2**tried) for tried in range(8) for _ in range(20))
    assert policy.backoff(0, retry_after=7.0) == 7.0
    assert policy.backoff(5, retry_after=60.0) == 10.0  # a server's wish, capped
    assert policy.backoff(10**6) <= 3.0
    # Never shorter than its own backoff (found by review: Retry-After: 0 made a refused submit a hot loop).
    waits = [policy.backoff(4, retry_after=0.0) for _ in range(400)]
    assert all(0 <= w <= 3.0 for w in waits) and 1.2 < sum(waits) / len(waits) < 1.8
