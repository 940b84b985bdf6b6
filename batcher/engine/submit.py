"""How is one job sent, and what does the journal say of each answer?

Only a submit certainly not accepted is sent again, and never before the
journal says so (``deferred``) and holds a fresh intent: a kill while the job
waits leaves it pending, never uncertain. A 429 waits the server's
Retry-After (else a growing backoff) and goes again, through whichever
account has room once its account cap came down; no connection goes again up
to the retry policy's attempts and then waits out the outage. Any answer of
unknown fate (a 5xx, 500001 and 503 included: docs/submit-answers.md) is held
as uncertain; every other answer is final for this run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import anyio.lowlevel

from ..errors import (
    ApiError,
    AuthError,
    BalanceError,
    JournalError,
    LocalImageError,
    RateLimitedError,
    TransientApiError,
    UncertainSubmitError,
)
from ..lifecycle import EventKind, JobStatus
from ..manifest.loader import Job
from ..manifest.payload import payload_for
from ..runcomfy.results import Submission
from .lanes import Lane
from .shared import RunShared

__all__ = ["submit"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Tries:
    """Answers in a row that say "again": 429s (tried for as long as the run lasts) and the rest
    (tried up to the policy's attempts, then an outage)."""

    refusals: int = 0
    faults: int = 0


async def submit(run: RunShared, job: Job) -> Lane | None:
    """Send job until RunComfy takes it, refuses it for good, or the run stops; the lane of the account
    that took it (its room counted there), or None."""
    price = run.price(job)
    payload = await _payload(run, job, price)
    if payload is None:
        return None
    tries = _Tries()
    while True:
        lane = await run.accounts.acquire(job.key)
        if run.stopping.reason:
            # Stopped while waiting for room: this job was never sent.
            run.accounts.unsent(lane, job.key)
            run.committed -= price
            run.progress.set(job.key, "pending")
            return None
        await _intent(run, job, lane, price)
        try:
            submission = await lane.client.submit(job.model, payload, job=job.name)
        except (ApiError, LocalImageError) as exc:
            delay = await _not_taken(run, job, lane, exc, tries, price)
        else:
            return _accepted(run, job, lane, submission)
        if delay is None:
            return None
        # The refusal is in the bucket too before the wait (a remote journal): a kill now holds nothing.
        await run.durable()
        with run.stopping.wait_scope():  # a halt ends the wait; the job is pending for the next run
            await anyio.sleep(delay)


async def _payload(run: RunShared, job: Job, price: float) -> dict[str, Any] | None:
    """What to send for job, its local images read and inlined (only here) before anything is journalled:
    a file that cannot be sent is a certain refusal (nothing left), never an uncertain submit. None when
    the job is not sent this run (refused, journalled so; or the run stopped meanwhile: still pending)."""
    if job.local is None:
        return job.input
    payload: dict[str, Any] | None = None
    try:
        # Off the event loop: a file may be slow, huge, or a FIFO that never opens; the run's signals and
        # other jobs go on, and any stop abandons the read (its thread dies with the process).
        with run.stopping.preparing_scope():
            payload = await _off_loop(partial(payload_for, job))
    except LocalImageError as exc:
        run.record(job, "refused", reason=str(exc))
        run.committed -= price
        run.progress.set(job.key, "refused")
        run.progress.error(job.name, str(exc))
        return None
    if payload is None:
        run.committed -= price
        run.progress.set(job.key, "pending")
    return payload


async def _off_loop(read: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """read() in a daemon thread of its own; a cancel abandons it. Not anyio's worker threads: those are
    joined when the interpreter exits, and a read stuck in open() would keep the process alive."""
    token = anyio.lowlevel.current_token()
    done = anyio.Event()
    outcome: list[dict[str, Any]] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(read())
        except BaseException as exc:  # handed to the waiting task, which re-raises it
            failure.append(exc)
        with suppress(Exception):  # the run ended meanwhile: nobody is waiting
            anyio.from_thread.run_sync(done.set, token=token)

    threading.Thread(target=target, name=f"batcher payload {threading.active_count()}", daemon=True).start()
    await done.wait()
    if failure:
        raise failure[0]
    return outcome[0]


async def _intent(run: RunShared, job: Job, lane: Lane, price: float) -> None:
    """Journal the intent, durably: if we die while the POST is out, the next run knows it may have been
    paid, and by whom."""
    run.progress.set(job.key, "submitting")
    run.record(job, "submitting", name=job.name, model=job.model, input=job.input, account=lane.account)
    try:
        await run.durable()
    except BaseException:
        # The intent is not where the run's journal lives (the bucket failed, or the run was cancelled
        # while it waited): no POST leaves, and the working copy says so, or a resume here would hold
        # the job as uncertain.
        run.record(job, "deferred", reason="not sent: the intent could not be made durable")
        run.accounts.unsent(lane, job.key)
        run.committed -= price
        run.progress.set(job.key, "pending")
        raise


async def _not_taken(
    run: RunShared, job: Job, lane: Lane, exc: ApiError | LocalImageError, tries: _Tries, price: float
) -> float | None:
    """Journal an answer that is not an acceptance; the wait before sending again (0: now), or None
    when this run sends the job no more."""
    progress = run.progress
    retry = run.options.retry
    if isinstance(exc, UncertainSubmitError):
        run.record(job, "uncertain", reason=str(exc))
        run.accounts.unsent(lane, job.key)
        progress.set(job.key, "uncertain")
        progress.error(job.name, "submit uncertain, held (see --resubmit-uncertain)")
        return None
    if isinstance(exc, RateLimitedError):
        # "Not now": an account at its cap of jobs in flight answers 429; fewer in flight there, then again.
        if _deferred(run, job, lane, exc):
            return 0.0  # the probe at the cap: the account's room, not this job's streak, says when
        tries.refusals += 1
        return retry.backoff(tries.refusals - 1, exc.retry_after)
    if isinstance(exc, TransientApiError):
        # Nothing got through (no connection): again, then pause for an outage.
        _deferred(run, job, lane, exc)
        tries.faults += 1
        if tries.faults < retry.attempts:
            return retry.backoff(tries.faults - 1, exc.retry_after)
        await run.durable()
        # Its estimate stays committed while it waits: the job is sent when RunComfy is back, and
        # another submit must not pass --max-cost on the room it seemed to leave.
        if not await run.sit_out_outage(job, exc):
            run.committed -= price
            return None
        tries.faults = 0
        return 0.0
    if isinstance(exc, AuthError):
        # Certain: nothing was accepted. The job stays pending; that account stops, and the job goes
        # through another (the run halts when none is left).
        _refused(run, job, lane, "deferred", exc, "pending")
        run.token_refused(lane, exc)
        if run.stopping.halted:
            return None
        run.committed += price  # still to be sent, through another account
        return 0.0
    # Refused for certain (validation, bad model, balance, a local image that cannot be sent as it
    # was checked): nothing was charged.
    _refused(run, job, lane, "refused", exc, "refused")
    if isinstance(exc, BalanceError):
        progress.error(job.name, "insufficient balance")
        run.stopping.stop("balance", str(exc))
        progress.stopping = "insufficient balance: no more submits this run"
    else:
        progress.error(job.name, str(exc))
    return None


def _accepted(run: RunShared, job: Job, lane: Lane, submission: Submission) -> Lane:
    run.outage.reached()
    run.accounts.accepted(lane, job.key)
    lane.submitted += 1
    try:
        url = lane.client.own_url(submission.raw.get("result_url"))
        extra: dict[str, Any] = {"result_url": url} if url else {}
        run.record(job, "submitted", request_id=submission.request_id, **extra)
    except JournalError as exc:
        # The one thing that must not be lost: say it where the user will see it.
        msg = f"{exc}. Job {job.name} WAS submitted as request {submission.request_id}: keep this id"
        log.error("%s", msg)
        raise JournalError(msg) from exc
    run.progress.set(job.key, "queued")
    return lane


def _deferred(run: RunShared, job: Job, lane: Lane, exc: TransientApiError) -> bool:
    """A submit certainly not accepted, to be sent again: journalled as such (a 429 counted against
    its account, whose cap comes down), its room given back while it waits. True when it was the
    account's probe at its cap."""
    probe = False
    if isinstance(exc, RateLimitedError) and exc.throttled:
        run.record(job, "deferred", reason=str(exc), account=lane.account, throttled=exc.throttled)
        probe = run.accounts.refused(lane, job.key, exc.retry_after)
    else:
        run.record(job, "deferred", reason=str(exc), account=lane.account)
        run.accounts.unsent(lane, job.key)
    run.progress.set(job.key, "pending")
    return probe


def _refused(
    run: RunShared, job: Job, lane: Lane, kind: EventKind, exc: ApiError | LocalImageError, status: JobStatus
) -> None:
    """A submit RunComfy certainly did not take: journalled as such, its room and estimate given back."""
    run.record(job, kind, reason=str(exc))
    run.accounts.unsent(lane, job.key)
    run.committed -= run.price(job)
    run.progress.set(job.key, status)
