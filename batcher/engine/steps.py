"""What one job goes through: submit, poll, cancel, download, sidecar.

`JobSteps` holds what the steps share during a run (the journal, the
accounts, the downloader, the live progress, the outage state, the reasons
to stop) and is fully built in its constructor. A submit goes through the
account with room (`batcher.engine.lanes`); every later call about the job
goes through the account the journal says submitted it. Its
`process` takes one job one step further, as far as it can go in this run;
`runner` feeds it jobs from a pool of workers.

Stopping comes in two strengths. `stop` sends no more submits (the budget
is reached, Ctrl-C, the balance ran out). `halt` also ends every poll and
download at once (a refused token, SIGTERM, an outage past its patience)
while submits in flight still get their answers recorded, so a halt never
leaves a job uncertain. A refused token is kept as `halt_error`, for the
loop to raise once the workers are done.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ..errors import (
    ApiError,
    AuthError,
    BalanceError,
    DownloadError,
    JournalError,
    LocalImageError,
    ManifestChangedError,
    OutputFolderError,
    RateLimitedError,
    RequestGoneError,
    TransientApiError,
    UncertainSubmitError,
    UnreachableError,
)
from ..journal.failures import classify, failure_of, failure_sentence
from ..journal.store import FileRecord, JobRecord, Journal
from ..journal.table import RecordTable
from ..lifecycle import Action, EventKind, FailureClass, JobStatus, StopKind, running_status
from ..manifest.cost import estimate
from ..manifest.loader import Job, Manifest
from ..manifest.payload import payload_for
from ..output.download import Downloader
from ..output.jobfiles import file_matches, output_path, write_sidecar
from ..printable import printable
from ..runcomfy.backpressure import Outage
from ..runcomfy.client import RequestResult
from ..runcomfy.polling import DurationModel, remote_duration
from .lanes import AccountPool, Lane
from .progress import RunProgress

if TYPE_CHECKING:
    from .options import JobSelection, RunOptions

__all__ = ["JobSteps", "price_of"]

log = logging.getLogger(__name__)


class JobSteps:
    """What one run's workers share, and the steps they take each job through."""

    def __init__(
        self,
        manifest: Manifest,
        jobs: JobSelection,
        options: RunOptions,
        output_dir: Path,
        journal: Journal,
        accounts: AccountPool,
        downloader: Downloader,
    ) -> None:
        self.manifest = manifest
        self.jobs = jobs
        """The jobs this run works on: all of the manifest's, or a trial's share."""
        self.options = options
        self.output_dir = output_dir
        self.journal = journal
        self.accounts = accounts
        self.client = accounts.primary.client
        """The first account's client: for calls about no job in particular (the outage probe)."""
        self.downloader = downloader
        self.records: RecordTable = journal.folded.records
        accounts.recorded({r.account for r in self.records.values() if r.account})
        self.price_dirs: tuple[Path, ...] = tuple(manifest.schema_dirs)
        """Where prices are looked up: the live tables a run fetched first (see `batcher.runcomfy.account`)."""
        self.sidecars: list[tuple[Job, JobRecord]] = []
        """Sidecars waiting to be written, by `flush_sidecars`."""
        self.durations = DurationModel()
        """How long this manifest's jobs take, to time polls."""
        self.progress = RunProgress(total=len(self.jobs))
        self.stop_submitting: str | None = None
        self.stop_kind: StopKind | None = None
        self.halted: str | None = None
        """Set when every wait must end now (a refused token, SIGTERM, an outage past its patience)."""
        self.halt_error: AuthError | None = None
        self.changed: ManifestChangedError | None = None
        """Set when the jobs read again were not the jobs loaded (see `JobSelection.checked`)."""
        self.waits: set[anyio.CancelScope] = set()
        """Polls and downloads in progress: a halt cancels them (submits in flight get their answers)."""
        self.committed = 0.0
        """Estimated cost of every submit journalled for this manifest's jobs, for --max-cost."""
        self.interrupted = False
        self.fatal: BaseException | None = None
        self.outage = Outage(options.outage_timeout)
        self.retry_skipped: Counter[FailureClass] = Counter()
        """Failed jobs --retry-failed leaves alone this run, by class (see `action_for`)."""
        self.retry_skipped_cost = 0.0
        """What resubmitting those would have been estimated at: money not spent."""
        self.without_token: dict[str, list[str]] = {}
        self.durable: Callable[[], Awaitable[None]] = _written
        """Returns once the journal's lines so far are durable where the run's journal lives (a remote
        output's bucket: see `batcher.output.remote`); awaited between a submit's intent and its POST."""
        self.stored: Callable[[FileRecord], bool] = _nowhere
        """True for a journalled file held elsewhere already (a remote output's bucket): not fetched again."""
        """Jobs in flight held because this run has no token for the account that submitted them, by account."""

    # -- journal helpers -----------------------------------------------------------

    def record(self, job: Job, kind: EventKind, **fields: Any) -> JobRecord:
        """Journal an event for job and fold it into the in-memory record."""
        record = self.journal.append(kind, job.key, **fields)
        assert record is not None  # an event with a job always has a record
        record.name = record.name or job.name
        return record

    # -- stopping ----------------------------------------------------------------------

    def stop(self, kind: StopKind, reason: str) -> None:
        """Send no more submits this run (the first reason given is the one reported)."""
        if self.stop_submitting is None:
            self.stop_submitting, self.stop_kind = reason, kind

    def halt(self, kind: StopKind, reason: str, error: AuthError | None = None) -> None:
        """Stop submitting and end every poll and download now; submits in flight still get their
        answers recorded, so none is left uncertain by the halt itself."""
        self.stop(kind, reason)
        if self.halted is None:
            self.halted, self.halt_error = reason, error
            self.progress.stopping = reason
        for scope in list(self.waits):
            scope.cancel()

    @contextmanager
    def wait_scope(self) -> Iterator[anyio.CancelScope]:
        """A poll or download that a halt may cut short (its job resumes next run)."""
        with anyio.CancelScope() as scope:
            if self.halted:
                scope.cancel()
            self.waits.add(scope)
            try:
                yield scope
            finally:
                self.waits.discard(scope)

    # -- planning -------------------------------------------------------------------

    def action_for(self, job: Job, record: JobRecord | None = None) -> Action:
        """What this run does with job; record: its record, when the caller has just read it."""
        record = record or self.records.get(job.key)
        options = self.options
        if record is None or record.phase == "pending":
            return "submit"
        if record.phase == "submitting":
            # The last run died between sending a submit and recording its answer.
            self.record(job, "uncertain", reason="the run stopped between sending the submit and recording its answer")
            return "submit" if options.resubmit_uncertain else "hold"
        if record.phase in ("uncertain", "lost"):
            return "submit" if options.resubmit_uncertain else "hold"
        if record.phase == "submitted":
            if self.accounts.lane_for(record.account) is None:
                # Only that account may ask about it (another gets 403001), and resubmitting pays twice.
                self.without_token.setdefault(record.account or "", []).append(job.name)
                return "hold"
            return "poll"
        if record.phase == "completed":
            return "download"
        # failed or cancelled
        if not options.retry_failed:
            return "hold"
        kind = failure_of(record) or "unknown"
        if kind in options.retry_classes:
            return "submit"
        self.retry_skipped[kind] += 1
        self.retry_skipped_cost += price_of(job, self.price_dirs)
        return "hold"

    # -- the steps ---------------------------------------------------------------------

    async def process(self, job: Job, action: Action) -> None:
        progress = self.progress
        if self.halted:
            return
        lane: Lane | None = None
        if action == "submit":
            if not self.still_to_submit(job):
                log.warning("%s: not sent: the journal says it is %s", job.name, self.records[job.key].phase)
                return
            if self.stop_submitting or not self.within_budget(job):
                progress.set(job.key, "pending")
                return
            lane = await self.submit(job)
            if lane is None:
                return
        elif action == "poll":
            lane = self.accounts.lane_for(self.records[job.key].account)
            assert lane is not None  # action_for holds a job whose account has no token
            self.accounts.adopt(lane)
        try:
            record = self.records[job.key]
            if record.phase == "submitted" and lane is not None:
                # Just submitted: nothing can be done yet, so the first look waits one interval.
                with self.wait_scope():
                    await self.poll(job, lane, first_wait=self.options.poll_interval if action == "submit" else 0.0)
        finally:
            if lane is not None:
                self.accounts.release(lane)
        if self.records[job.key].phase == "completed":
            with self.wait_scope():
                await self.download(job)

    def still_to_submit(self, job: Job) -> bool:
        """Whether the journal still says job is to be sent, checked at the last moment: a plan's word
        is never enough to pay for a job twice."""
        record = self.records.get(job.key)
        if record is None or record.phase == "pending":
            return True
        if record.phase in ("uncertain", "lost"):
            return self.options.resubmit_uncertain
        if record.phase in ("failed", "cancelled"):
            return self.options.retry_failed
        return False  # submitting, submitted, completed: sent already

    def within_budget(self, job: Job) -> bool:
        """Count job's estimated price against --max-cost; False (and stop submitting) past the cap."""
        price = price_of(job, self.price_dirs)
        cap = self.options.max_cost
        if cap is not None and self.committed + price > cap + 1e-9:
            spent = sum(r.spent for r in self.records.values())
            self.stop(
                "budget",
                f"--max-cost ${cap:,.2f} reached: this manifest's submits are estimated at ${self.committed:,.2f} "
                f"(RunComfy reported ${spent:,.2f} spent so far) and the next job would take it to "
                f"${self.committed + price:,.2f}",
            )
            self.progress.stopping = "cost cap reached: no more submits this run"
            return False
        self.committed += price
        return True

    async def submit(self, job: Job) -> Lane | None:
        """Send job until RunComfy takes it, refuses it for good, or the run stops; the lane of the account
        that took it (its room counted there), or None.

        Only a submit certainly not accepted is sent again, and never before
        the journal says so (``deferred``) and holds a fresh intent: a kill
        while the job waits leaves it pending, never uncertain. A 429 waits
        the server's Retry-After (else a growing backoff) and goes again,
        through whichever account has room once its account cap came down;
        no connection goes again up to the retry policy's attempts and then
        waits out the outage. Any answer of unknown fate (a 5xx, 500001 and
        503 included: docs/submit-answers.md) is held as uncertain; every
        other answer is final for this run.
        """
        progress = self.progress
        price = price_of(job, self.price_dirs)
        retry = self.options.retry
        refusals = 0  # 429s in a row: "not now", tried for as long as the run lasts
        faults = 0  # the rest in a row: tried up to the policy's attempts, then an outage
        while True:
            lane = await self.accounts.acquire()
            if self.stop_submitting:
                # Stopped while waiting for room: this job was never sent.
                self.accounts.unsent(lane)
                self.committed -= price
                progress.set(job.key, "pending")
                return None
            progress.set(job.key, "submitting")
            # Intent first: if we die while the POST is out, the next run knows it may have been paid, and by whom.
            self.record(job, "submitting", name=job.name, model=job.model, input=job.input, account=lane.account)
            try:
                await self.durable()
            except BaseException:
                # The intent is not where the run's journal lives (the bucket failed, or the run was cancelled
                # while it waited): no POST leaves, and the working copy says so, or a resume here would hold
                # the job as uncertain.
                self.record(job, "deferred", reason="not sent: the intent could not be made durable")
                self.accounts.unsent(lane)
                self.committed -= price
                progress.set(job.key, "pending")
                raise
            try:
                # Local images inline, only here.
                submission = await lane.client.submit(job.model, payload_for(job), job=job.name)
            except UncertainSubmitError as exc:
                self.record(job, "uncertain", reason=str(exc))
                self.accounts.unsent(lane)
                progress.set(job.key, "uncertain")
                progress.error(job.name, "submit uncertain, held (see --resubmit-uncertain)")
                return None
            except RateLimitedError as exc:
                # "Not now": an account at its cap of jobs in flight answers 429; fewer in flight there, then again.
                self.deferred(job, lane, exc)
                delay = retry.backoff(refusals, exc.retry_after)
                refusals += 1
            except TransientApiError as exc:
                # Nothing got through (no connection): again, then pause for an outage.
                self.deferred(job, lane, exc)
                faults += 1
                if faults >= retry.attempts:
                    await self.durable()
                    # Its estimate stays committed while it waits: the job is sent when RunComfy is back, and
                    # another submit must not pass --max-cost on the room it seemed to leave.
                    if not await self.sit_out_outage(job, exc):
                        self.committed -= price
                        return None
                    faults = 0
                    continue
                delay = retry.backoff(faults - 1, exc.retry_after)
            except AuthError as exc:
                # Certain: nothing was accepted. The job stays pending; the whole run stops.
                self.not_accepted(job, lane, "deferred", exc, "pending")
                self.halt("auth", str(exc), exc)
                return None
            except (ApiError, LocalImageError) as exc:
                # Refused for certain (validation, bad model, balance, a local image that cannot be sent as it
                # was checked): nothing was charged.
                self.not_accepted(job, lane, "refused", exc, "refused")
                if isinstance(exc, BalanceError):
                    progress.error(job.name, "insufficient balance")
                    self.stop("balance", str(exc))
                    progress.stopping = "insufficient balance: no more submits this run"
                else:
                    progress.error(job.name, str(exc))
                return None
            else:
                break
            # The refusal is in the bucket too before the wait (a remote journal): a kill now holds nothing.
            await self.durable()
            with self.wait_scope():  # a halt ends the wait; the job is pending for the next run
                await anyio.sleep(delay)
        self.outage.reached()
        self.accounts.accepted(lane)
        lane.submitted += 1
        try:
            url = lane.client.own_url(submission.raw.get("result_url"))
            extra: dict[str, Any] = {"result_url": url} if url else {}
            self.record(job, "submitted", request_id=submission.request_id, **extra)
        except JournalError as exc:
            # The one thing that must not be lost: say it where the user will see it.
            msg = f"{exc}. Job {job.name} WAS submitted as request {submission.request_id}: keep this id"
            log.error("%s", msg)
            raise JournalError(msg) from exc
        progress.set(job.key, "queued")
        return lane

    def deferred(self, job: Job, lane: Lane, exc: TransientApiError) -> None:
        """A submit certainly not accepted, to be sent again: journalled as such (a 429 counted against
        its account, whose cap comes down), its room given back while it waits."""
        if isinstance(exc, RateLimitedError) and exc.throttled:
            self.record(job, "deferred", reason=str(exc), account=lane.account, throttled=exc.throttled)
            self.accounts.refused(lane)
        else:
            self.record(job, "deferred", reason=str(exc), account=lane.account)
            self.accounts.unsent(lane)
        self.progress.set(job.key, "pending")

    def not_accepted(
        self, job: Job, lane: Lane, kind: EventKind, exc: ApiError | LocalImageError, status: JobStatus
    ) -> None:
        """A submit RunComfy certainly did not take: journalled as such, its room and estimate given back."""
        self.record(job, kind, reason=str(exc))
        self.accounts.unsent(lane)
        self.committed -= price_of(job, self.price_dirs)
        self.progress.set(job.key, status)

    async def sit_out_outage(self, job: Job, exc: ApiError) -> bool:
        """After a call that could not get through: wait for RunComfy to answer again.

        False when the run must stop (the patience ran out, or something else halted it).
        """
        self.outage.failed()
        self.progress.stopping = f"RunComfy cannot be reached; waiting (up to {self.options.outage_timeout:g}s)"
        self.progress.error(job.name, str(exc))
        up = False
        with self.wait_scope():  # a halt (a refused token elsewhere, SIGTERM) ends the wait too
            up = await self.outage.wait(lambda: self.client.reachable(job.model))
        if self.halted:
            return False
        if not up:
            self.halt(
                "outage",
                f"RunComfy could not be reached for {self.options.outage_timeout:g}s (--outage-timeout); "
                f"last error: {exc}",
            )
            return False
        if self.progress.stopping and self.progress.stopping.startswith("RunComfy cannot be reached"):
            self.progress.stopping = None
        return not self.halted

    async def poll(self, job: Job, lane: Lane, first_wait: float = 0.0) -> None:
        options = self.options
        progress = self.progress
        record = self.records[job.key]
        assert record.request_id is not None
        request_id = record.request_id
        delay = options.poll_interval
        last_state = record.remote_state
        last_word: str | None = None
        last_error: str | None = None
        queued_since = running_since = time.monotonic()
        submitted_at = record.submitted_at or time.time()
        reported_unknown = False
        cancel_asked = False
        await anyio.sleep(self.next_wait(submitted_at, first_wait, first=True) if first_wait else 0.0)
        while True:
            try:
                result = await lane.client.result(request_id, url=record.result_url)
            except RequestGoneError as exc:
                if time.time() - submitted_at < options.lost_after:
                    # Just submitted: a replica that has not seen the request yet answers so.
                    progress.error(job.name, f"RunComfy does not know the request yet; asking again ({exc})")
                    await anyio.sleep(delay)
                    delay = min(delay * options.poll_growth, options.poll_max)
                    continue
                reason = (
                    f"{exc} It was accepted {options.lost_after:g}s+ ago and may have been charged; "
                    "submit it again only with --resubmit-uncertain"
                )
                self.record(job, "lost", reason=reason)
                progress.set(job.key, "lost")
                progress.error(job.name, "RunComfy lost the request (held; see --resubmit-uncertain)")
                return
            except AuthError as exc:
                self.halt("auth", str(exc), exc)
                return
            except TransientApiError as exc:
                if isinstance(exc, UnreachableError):
                    if not await self.sit_out_outage(job, exc):
                        return
                    continue
                # Retries ran out on a poll: the job is still paid for, so keep waiting.
                progress.error(job.name, f"poll trouble, still waiting: {exc}")
                await anyio.sleep(delay)
                delay = min(delay * options.poll_growth, options.poll_max)
                continue
            except ApiError as exc:
                # An answer that asking again will not change (a redirect, a malformed id): hold the job.
                self.record(job, "note", reason=f"polling stopped: {exc}")
                progress.set(job.key, "held")
                progress.error(job.name, str(exc))
                return
            self.outage.reached()
            said_model = result.raw.get("model_id")
            # job.model is "" only for a superseded job journalled before records kept the model.
            if isinstance(said_model, str) and said_model and job.model and said_model != job.model:
                # As RunComfy's nodes check: an answer about another model is not this job's.
                reason = f"polling stopped: RunComfy says request {request_id} is for {printable(said_model, 120)}"
                self.record(job, "note", reason=f"{reason}, not {job.model}")
                progress.set(job.key, "held")
                progress.error(job.name, reason)
                return
            state = result.state
            if state != last_state or result.raw_status != last_word or result.error != last_error:
                # The service's own word is kept too (succeeded, waiting, processing…): what it said. So is an
                # error text beside a state that is not failed: shown to a person, never read as a failure.
                said_error: dict[str, str] = {"error": result.error} if result.error else {}
                self.record(
                    job,
                    "state",
                    state=state if state != "unknown" else result.raw_status,
                    word=result.raw_status,
                    **said_error,
                )
                if said_error and state not in ("failed", "cancelled"):
                    progress.error(job.name, f"RunComfy says {state} with an error text, still polling: {result.error}")
                if state == "in_progress" and last_state != "in_progress":
                    running_since = time.monotonic()
                last_state, last_word, last_error = state, result.raw_status, result.error
            if state == "completed":
                self.finish(job, result)
                return
            if state == "failed":
                reason = result.error or "RunComfy reported the job failed without a reason"
                kind = classify(result.error)
                self.record(job, "failed", reason=reason, failure=kind)
                progress.set(job.key, "failed")
                progress.error(job.name, failure_sentence(result.error, kind))
                return
            if state == "cancelled":
                self.record(job, "cancelled")
                progress.set(job.key, "cancelled")
                return
            if state == "unknown" and not reported_unknown:
                reported_unknown = True
                log.warning(
                    "job %s: unknown state %r; still polling. Body: %s",
                    job.name,
                    result.raw_status,
                    result.for_journal(),
                )
            # Still RunComfy's (a word it has not ended the job with): an unknown one shows as running.
            progress.set(job.key, running_status(state) or "running")

            now = time.monotonic()
            if state == "in_queue":
                wants_cancel = self.interrupted and options.cancel_on_interrupt
                timed_out = options.queue_timeout is not None and now - queued_since > options.queue_timeout
                if (wants_cancel or timed_out) and not cancel_asked:
                    cancel_asked = True
                    why = (
                        "interrupted (--cancel-on-interrupt)"
                        if wants_cancel
                        else f"queued over {options.queue_timeout:g}s"
                    )
                    await self.cancel(job, lane, request_id, why)
                    delay = options.poll_interval
                    continue
            elif options.job_timeout is not None and now - running_since > options.job_timeout:
                reason = f"still running after {options.job_timeout:g}s (--job-timeout); the next run keeps polling it"
                self.record(job, "note", reason=reason)
                progress.set(job.key, "held")
                progress.error(job.name, reason)
                return
            await anyio.sleep(self.next_wait(submitted_at, delay))
            delay = min(delay * options.poll_growth, options.poll_max)

    def next_wait(self, submitted_at: float, backoff: float, *, first: bool = False) -> float:
        """The wait before the next poll of a job submitted at submitted_at (see `DurationModel.wait`)."""
        age = time.time() - submitted_at
        return self.durations.wait(age, backoff, self.options.poll_interval, self.options.poll_max, first=first)

    async def cancel(self, job: Job, lane: Lane, request_id: str, why: str) -> None:
        try:
            outcome = await lane.client.cancel(request_id)
        except ApiError as exc:
            self.progress.error(job.name, f"cancel failed: {exc}")
            return
        if outcome.outcome == "cancelled" or outcome.state == "cancelled":
            self.record(job, "note", reason=f"cancel asked: {why}")
        else:
            self.progress.error(job.name, f"not cancellable ({outcome.state or outcome.outcome}); waiting for it")

    def finish(self, job: Job, result: RequestResult) -> None:
        if not result.outputs:
            reason = "RunComfy reported the job completed but returned no output files"
            self.record(job, "failed", reason=reason, failure="model_error")
            self.progress.set(job.key, "failed")
            self.progress.error(job.name, reason)
            return
        # The answer is kept up to a bound (fields unknown today may matter tomorrow; a hostile
        # 200 MB answer must not live in the journal for ever), with RunComfy's own duration read
        # here, so that the journal's fold depends on no parsing of answers.
        record = self.record(
            job,
            "completed",
            outputs=result.outputs,
            cost=result.cost,
            duration=remote_duration(result.raw),
            result=result.for_journal(),
        )
        if record.duration is not None:
            self.durations.add(record.duration)

    async def download(self, job: Job) -> None:
        progress = self.progress
        record = self.records[job.key]
        refreshed = False
        index = 0
        while index < len(record.outputs):
            url = record.outputs[index]
            target = self.target_path(job, index, url)
            known = record.files.get(index)
            if known is not None and (
                self.stored(known) or await anyio.to_thread.run_sync(file_matches, self.output_dir, known)
            ):
                index += 1
                continue
            progress.set(job.key, "downloading")
            try:
                got = await self.downloader.fetch(url, target)
            except DownloadError as exc:
                # Signed URLs expire, and hosts move: ask RunComfy for fresh URLs once.
                if refreshed or record.request_id is None or exc.permanent:
                    self.download_failed(job, index, str(exc))
                    return
                refreshed = True
                lane = self.accounts.lane_for(record.account)
                if lane is None:
                    reason = f"{exc}; no token for account {record.account} in this run to ask for fresh URLs"
                    self.download_failed(job, index, reason)
                    return
                try:
                    fresh = await lane.client.result(record.request_id)
                except ApiError as api_exc:
                    self.download_failed(job, index, f"{exc}; refreshing the URL failed: {api_exc}")
                    return
                if not fresh.outputs:
                    self.download_failed(job, index, f"{exc}; RunComfy no longer lists outputs")
                    return
                record = self.record(job, "urls", outputs=fresh.outputs)
                continue
            relative = got.path.relative_to(self.output_dir).as_posix()
            record = self.record(job, "downloaded", index=index, path=relative, bytes=got.bytes, sha256=got.sha256)
            index += 1
        # Written in batches (see flush_sidecars): they are derived from the journal, and
        # a resumed run writes them again, so a kill can delay them but not lose them.
        self.sidecars.append((job, record))
        progress.set(job.key, "done")

    def download_failed(self, job: Job, index: int, reason: str) -> None:
        self.record(job, "download_failed", index=index, reason=reason)
        self.progress.set(job.key, "failed")
        self.progress.error(job.name, reason)

    def target_path(self, job: Job, index: int, url: str) -> Path:
        return output_path(self.output_dir, job, index, url)

    async def flush_sidecars(self) -> None:
        """Write the waiting sidecars, here on the event loop.

        A sidecar is a small JSON file with no fsync (derived from the journal, written again by a
        resume): a few page-cache writes each. On a worker thread, each of its system calls handed the
        GIL to the event loop and back; measured in one process, four pairs of 1,500 jobs at
        concurrency 64, writing them here cost 5.2 against 5.7 ms of CPU a job.
        """
        waiting, self.sidecars = self.sidecars, []
        for done, (job, record) in enumerate(waiting):
            try:
                self.write_sidecar(job, record)
            except OSError as exc:
                self.sidecars = waiting[done:] + self.sidecars  # the final flush tries them again, or says why
                msg = f"cannot write the sidecar of {job.name}: {exc.strerror or exc}"
                raise OutputFolderError(msg) from exc
            except BaseException:
                self.sidecars = waiting[done:] + self.sidecars
                raise
        await anyio.lowlevel.checkpoint()

    def write_sidecar(self, job: Job, record: JobRecord) -> None:
        write_sidecar(self.output_dir, self.manifest, job, record)


def price_of(job: Job, directories: Sequence[Path]) -> float:
    """The job's price; 0 where no table says (the cap then cannot count it)."""
    return estimate(job, directories) or 0.0


async def _written() -> None:
    """A local journal's line is durable enough once written (see `batcher.journal.store`)."""


def _nowhere(_known: FileRecord) -> bool:
    return False
