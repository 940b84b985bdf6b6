"""How is a paid job waited on until RunComfy ends it, and what stops the wait?

A job RunComfy accepted is polled, through the account that submitted it,
until it completes, fails or is cancelled: its ``/status`` (a small answer)
is waited on, and its ``/result`` (outputs, cost, the error text) fetched once
it has ended, as RunComfy's docs and every RunComfy client do. Every answer that does not end it
keeps the wait going: a request RunComfy does not know yet (within
``--lost-after`` of its submit), retries that ran out, an unknown state word.
The wait ends without an end of the job only for a refused token (the run
halts), an outage past its patience, an answer about another model, a
``--job-timeout``, or a request RunComfy lost; each is journalled, and the
next run polls the job again (or holds it).
"""

from __future__ import annotations

import logging
import time
from typing import Final

import anyio

from ..errors import ApiError, AuthError, RequestGoneError, TransientApiError, UnreachableError
from ..journal.failures import classify, failure_sentence
from ..lifecycle import JobState, running_status
from ..manifest.loader import Job
from ..printable import printable
from ..runcomfy.client import RequestResult
from .cancel import cancel_request
from .finish import finish
from .lanes import Lane
from .shared import RunShared

__all__ = ["poll"]

log = logging.getLogger(__name__)

_ENDED: Final = frozenset({"completed", "failed", "cancelled"})
"""States after which a job's ``/result`` is fetched (once)."""
_AGAIN: Final = "again"
"""`_Poll.ask`'s word for "no answer this time; ask again"."""


async def poll(run: RunShared, job: Job, lane: Lane, first_wait: float = 0.0) -> None:
    """Wait on job (submitted through lane) until RunComfy ends it or the wait must stop."""
    waiting = _Poll(run, job, lane)
    await anyio.sleep(waiting.next_wait(first_wait, first=True) if first_wait else 0.0)
    while True:
        result = await waiting.ask()
        if isinstance(result, str):  # _AGAIN
            continue
        if result is None:
            return
        if waiting.ended(result) or await waiting.gave_up(result.state):
            return


class _Poll:
    """One job's wait: what was last heard of it, and since when."""

    def __init__(self, run: RunShared, job: Job, lane: Lane) -> None:
        self.run, self.job, self.lane = run, job, lane
        self.record = record = run.records[job.key]
        assert record.request_id is not None
        self.request_id: str = record.request_id
        self.delay = run.options.poll_interval
        self.last_state: JobState | str | None = record.remote_state
        self.last_word: str | None = None
        self.last_error: str | None = None
        self.queued_since = self.running_since = time.monotonic()
        self.submitted_at = record.submitted_at or time.time()
        self.reported_unknown = False
        self.cancel_asked = False

    def next_wait(self, backoff: float, *, first: bool = False) -> float:
        """The wait before the next poll (see `DurationModel.wait`)."""
        options = self.run.options
        age = time.time() - self.submitted_at
        return self.run.durations.wait(age, backoff, options.poll_interval, options.poll_max, first=first)

    async def backoff(self) -> None:
        options = self.run.options
        await anyio.sleep(self.delay)
        self.delay = min(self.delay * options.poll_growth, options.poll_max)

    async def ask(self) -> RequestResult | str | None:
        """One poll: its answer, `_AGAIN`, or None when the wait ends here (journalled)."""
        run, job, options, progress = self.run, self.job, self.run.options, self.run.progress
        try:
            result = await self.lane.client.status(self.request_id, result_url=self.record.result_url)
            if result.state in _ENDED:
                # Once, as RunComfy's docs and clients do: the outputs and cost, or the error text.
                result = await self.lane.client.result(self.request_id, url=self.record.result_url)
        except RequestGoneError as exc:
            if time.time() - self.submitted_at < options.lost_after:
                # Just submitted: a replica that has not seen the request yet answers so.
                progress.error(job.name, f"RunComfy does not know the request yet; asking again ({exc})")
                await self.backoff()
                return _AGAIN
            reason = (
                f"{exc} It was accepted {options.lost_after:g}s+ ago and may have been charged; "
                "submit it again only with --resubmit-uncertain"
            )
            run.record(job, "lost", reason=reason)
            progress.set(job.key, "lost")
            progress.error(job.name, "RunComfy lost the request (held; see --resubmit-uncertain)")
            return None
        except AuthError as exc:
            run.token_refused(self.lane, exc)
            return None
        except UnreachableError as exc:
            return _AGAIN if await run.sit_out_outage(job, exc) else None
        except TransientApiError as exc:
            # Retries ran out on a poll: the job is still paid for, so keep waiting.
            progress.error(job.name, f"poll trouble, still waiting: {exc}")
            await self.backoff()
            return _AGAIN
        except ApiError as exc:
            # An answer that asking again will not change (a redirect, a malformed id): hold the job.
            self.hold(f"polling stopped: {exc}", str(exc))
            return None
        run.outage.reached()
        said_model = result.raw.get("model_id")
        # job.model is "" only for a superseded job journalled before records kept the model.
        if isinstance(said_model, str) and said_model and job.model and said_model != job.model:
            # As RunComfy's nodes check: an answer about another model is not this job's.
            reason = f"polling stopped: RunComfy says request {self.request_id} is for {printable(said_model, 120)}"
            self.hold(f"{reason}, not {job.model}", reason)
            return None
        return result

    def hold(self, note: str, shown: str) -> None:
        """End the wait without an end of the job: journalled as a note, shown as held."""
        self.run.record(self.job, "note", reason=note)
        self.run.progress.set(self.job.key, "held")
        self.run.progress.error(self.job.name, shown)

    def ended(self, result: RequestResult) -> bool:
        """Journal what changed in the answer; True when RunComfy ended the job (journalled so)."""
        run, job, progress = self.run, self.job, self.run.progress
        state = result.state
        if state != self.last_state or result.raw_status != self.last_word or result.error != self.last_error:
            # The service's own word is kept too (succeeded, waiting, processing…): what it said. So is an
            # error text beside a state that is not failed: shown to a person, never read as a failure.
            said_error: dict[str, str] = {"error": result.error} if result.error else {}
            run.record(
                job,
                "state",
                state=state if state != "unknown" else result.raw_status,
                word=result.raw_status,
                **said_error,
            )
            if said_error and state not in ("failed", "cancelled"):
                progress.error(job.name, f"RunComfy says {state} with an error text, still polling: {result.error}")
            if state == "in_progress" and self.last_state != "in_progress":
                self.running_since = time.monotonic()
            self.last_state, self.last_word, self.last_error = state, result.raw_status, result.error
        if state == "completed":
            finish(run, job, result)
            return True
        if state == "failed":
            reason = result.error or "RunComfy reported the job failed without a reason"
            kind = classify(result.error)
            run.record(job, "failed", reason=reason, failure=kind)
            progress.set(job.key, "failed")
            progress.error(job.name, failure_sentence(result.error, kind))
            return True
        if state == "cancelled":
            run.record(job, "cancelled")
            progress.set(job.key, "cancelled")
            return True
        if state == "unknown" and not self.reported_unknown:
            self.reported_unknown = True
            log.warning(
                "job %s: unknown state %r; still polling. Body: %s", job.name, result.raw_status, result.for_journal()
            )
        # Still RunComfy's (a word it has not ended the job with): an unknown one shows as running.
        progress.set(job.key, running_status(state) or "running")
        return False

    async def gave_up(self, state: JobState) -> bool:
        """For a job RunComfy has not ended: cancel it when asked to (Ctrl-C with --cancel-on-interrupt,
        --queue-timeout) or stop waiting past --job-timeout (True); otherwise wait for the next poll."""
        run, options = self.run, self.run.options
        now = time.monotonic()
        if state == "in_queue":
            wants_cancel = run.stopping.interrupted and options.cancel_on_interrupt
            timed_out = options.queue_timeout is not None and now - self.queued_since > options.queue_timeout
            if (wants_cancel or timed_out) and not self.cancel_asked:
                self.cancel_asked = True
                why = (
                    "interrupted (--cancel-on-interrupt)" if wants_cancel else f"queued over {options.queue_timeout:g}s"
                )
                await cancel_request(run, self.job, self.lane, self.request_id, why)
                self.delay = options.poll_interval
                return False
        elif options.job_timeout is not None and now - self.running_since > options.job_timeout:
            reason = f"still running after {options.job_timeout:g}s (--job-timeout); the next run keeps polling it"
            self.hold(reason, reason)
            return True
        await anyio.sleep(self.next_wait(self.delay))
        self.delay = min(self.delay * options.poll_growth, options.poll_max)
        return False
