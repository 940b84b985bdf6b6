"""Running a manifest: submit, poll, download, with the journal as the only truth.

`run_manifest` folds the journal, decides each job's next step, and feeds
the work through a fixed pool of workers (an anyio task group reading one
memory object stream), so memory and task count stay flat however many jobs
there are. Jobs already paid for (submitted, completed) go first; new
submits follow in manifest order.

Journal appends are synchronous ``os.write`` calls of one line each (see
`batcher.state`): a worker must not go on until its request_id is recorded,
and a small blocking write is cheaper and simpler than a round trip through
a writer task. The one slow part, ``fsync``, runs in groups on a thread.
"""

from __future__ import annotations

import fnmatch
import hashlib
import heapq
import json
import logging
import math
import os
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc
import httpx

from . import __version__
from .backpressure import AccountCap, Outage
from .client import (
    DEFAULT_MAX_ANSWER_BYTES,
    RateLimiter,
    RequestResult,
    RetryPolicy,
    RunComfyClient,
    api_base_from_env,
    token_from_env,
)
from .confined import open_journalled, write_atomically
from .cost import estimate
from .dataset import METADATA_NAME, write_metadata
from .download import DEFAULT_MAX_BYTES, Downloader, extension_for, safe_child
from .errors import (
    ApiError,
    AuthError,
    BalanceError,
    DownloadError,
    JournalError,
    OutputFolderError,
    RateLimitedError,
    RequestGoneError,
    TransientApiError,
    UncertainSubmitError,
    UnreachableError,
    UsageError,
)
from .folders import (
    SANDBOX_API,
    api_identity,
    check_journal_api,
    check_ledger,
    check_no_overlap,
    default_output_dir,
    is_rehearsal,
    parse_shard,
    refuse_linked_default,
    remember_folder,
    shard_folders,
)
from .manifest import Job, Manifest, shard_of
from .netpolicy import loopback_origin
from .polling import DurationModel
from .printable import printable
from .sandbox import Sandbox, SandboxConfig
from .state import JOURNAL_NAME, Category, FileRecord, JobRecord, Journal, category

__all__ = [
    "CancelSummary",
    "JobStatus",
    "RunOptions",
    "RunPlan",
    "RunProgress",
    "RunSummary",
    "cancel_manifest",
    "default_output_dir",
    "parse_shard",
    "run_manifest",
    "select_jobs",
    "shard_folders",
]

log = logging.getLogger("batcher")

JobStatus = Literal[
    "waiting", "submitting", "queued", "running", "downloading", "done", "failed", "uncertain", "lost", "held"
]
Action = Literal["submit", "poll", "download", "hold", "done"]
StopKind = Literal["interrupted", "terminated", "budget", "balance", "outage", "auth", "timeout"]

SANDBOX_TOKEN = "sandbox-token"
_INITIAL_STATUS: dict[Action, JobStatus] = {
    "submit": "waiting",
    "poll": "queued",
    "download": "downloading",
    "hold": "held",
    "done": "done",
}
_HELD_STATUS: dict[Category, JobStatus] = {"failed": "failed", "uncertain": "uncertain", "lost": "lost"}


def select_jobs(manifest: Manifest, options: RunOptions) -> list[Job]:
    """The jobs a run works on. Trial runs (--only, --limit) take a share; job identity does not
    depend on the share, so the full run that follows never pays twice for what the trial did."""
    jobs = manifest.jobs
    if options.shard is not None:
        part, shards = options.shard
        jobs = [job for job in jobs if shard_of(job.key, shards) == part]
    if options.only is not None:
        jobs = [job for job in jobs if fnmatch.fnmatchcase(job.name, options.only)]
        if not jobs:
            msg = f"--only {options.only!r} matches no job id of {manifest.path}"
            raise UsageError(msg)
    if options.limit is not None:
        jobs = jobs[: options.limit]
    return jobs


@dataclass(slots=True)
class RunOptions:
    """Everything `run_manifest` can be told; the CLI's flags map onto these."""

    output_dir: Path | None = None
    concurrency: int = 8
    api_base: str | None = None
    token: str | None = None
    """Defaults to RUNCOMFY_API_TOKEN; never needed with a sandbox."""
    sandbox: SandboxConfig | None = None
    """Run against an in-process sandbox with this configuration."""
    retry_failed: bool = False
    resubmit_uncertain: bool = False
    """Submit again the jobs whose submit may have been accepted (uncertain) or that RunComfy lost."""
    new_output: bool = False
    """Submit even the jobs another output folder already submitted (noted in the ledger): pays again."""
    lost_after: float = 300.0
    """A request RunComfy does not know (404001) this long after its submit is *lost*; before, it is
    asked again (a replica may not have seen it yet)."""
    outage_timeout: float = 900.0
    """How long to wait for RunComfy to answer again once no call gets through, before the run ends."""
    cancel_on_interrupt: bool = False
    poll_min: float = 1.0
    poll_max: float = 10.0
    poll_growth: float = 1.5
    queue_timeout: float | None = None
    """Give up waiting on a job that stays queued this long (it is cancelled)."""
    job_timeout: float | None = None
    """Give up waiting on a job that runs this long (it stays resumable)."""
    run_timeout: float | None = None
    rate: float | None = None
    """Requests a second across every API call, or None for no limit."""
    limit: int | None = None
    """A trial run: only the first N jobs (after `only`), in manifest order."""
    shard: tuple[int, int] | None = None
    """``(K, N)``: only the K-th of N slices of the jobs, by identity; its own output folder."""
    only: str | None = None
    """A trial run: only jobs whose name matches this shell pattern (``london-*``)."""
    max_cost: float | None = None
    """Never submit a job that would take the estimated cost of every submit the journal
    records for this manifest (earlier runs included) past this many dollars."""
    max_download_bytes: int = DEFAULT_MAX_BYTES
    max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES
    """The largest API answer read; past it a submit is uncertain and a poll is retried."""
    download_deadline: float | None = None
    """Seconds one output file may take in all (tries, redirects, backoff); None: 300 s, or longer
    for a larger --max-download-bytes (see `download.deadline_for`)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    download_backoff: float = 0.5
    fsync_interval: float = 0.2
    handle_signals: bool = False
    """Install SIGINT/SIGTERM handlers (the CLI does; library callers usually should not)."""
    api_transport: httpx.AsyncBaseTransport | None = None
    download_transport: httpx.AsyncBaseTransport | None = None
    submit_timeout: httpx.Timeout | None = None
    poll_timeout: httpx.Timeout | None = None

    def __post_init__(self) -> None:
        if self.lost_after < 0 or self.outage_timeout < 0:
            msg = "--lost-after and --outage-timeout must be 0 or more"
            raise UsageError(msg)
        if self.concurrency < 1:
            msg = "--concurrency must be at least 1"
            raise UsageError(msg)
        if self.limit is not None and self.limit < 1:
            msg = "--limit must be at least 1"
            raise UsageError(msg)
        if self.max_cost is not None and self.max_cost < 0:
            msg = "--max-cost must be 0 or more"
            raise UsageError(msg)
        if self.rate is not None and self.rate <= 0:
            msg = "--rate must be above 0"
            raise UsageError(msg)


@dataclass(slots=True)
class RunProgress:
    """Live counts for a progress display; read it from another task at any time."""

    total: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    finished_this_run: int = 0
    recent_errors: list[str] = field(default_factory=list)
    stopping: str | None = None
    status_of: dict[str, JobStatus] = field(default_factory=dict)

    def set(self, key: str, status: JobStatus) -> None:
        old = self.status_of.get(key)
        if old == status:
            return
        if old is not None:
            self.statuses[old] -= 1
        self.statuses[status] += 1
        self.status_of[key] = status
        if status in ("done", "failed", "lost") and old not in (None, "done", "failed", "lost", "held"):
            self.finished_this_run += 1

    def error(self, name: str, message: str) -> None:
        # Shown on a live terminal: whatever a server put in it is made printable first.
        self.recent_errors = [*self.recent_errors[-4:], printable(f"{name}: {message}", 300)]

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def eta(self) -> float | None:
        left = sum(self.statuses[s] for s in ("waiting", "submitting", "queued", "running", "downloading"))
        if not self.finished_this_run or not left:
            return None
        return self.elapsed / self.finished_this_run * left


@dataclass(slots=True)
class JobOutcome:
    """One job's standing at the end of a run, for the summary."""

    key: str
    name: str
    phase: str
    request_id: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class RunPlan:
    """What a run is about to do, before the first request: for a line (and a confirmation) at the start."""

    to_submit: int
    estimate: float
    """Estimated cost of to_submit, in dollars."""
    unpriced: int
    """Of to_submit, jobs no price table covers (not in the estimate)."""
    to_finish: int
    """Jobs already submitted or completed: polled or downloaded, at no new cost."""
    held: int
    done: int
    sandbox: bool


@dataclass(slots=True)
class RunSummary:
    """What a run did and what is left; `exit_code` follows the CLI's contract."""

    output_dir: Path
    journal: Path
    total: int
    done: int
    failed: list[JobOutcome]
    uncertain: list[JobOutcome]
    unfinished: list[JobOutcome]
    orphans: list[str]
    interrupted: bool
    stop_reason: str | None
    possible_extra_cost: float
    spent: float
    warnings: list[str]

    lost: list[JobOutcome] = field(default_factory=list)
    stop_kind: StopKind | None = None
    spent_superseded: float = 0.0
    """Of `spent`, what jobs no longer in the manifest cost (an edited prompt's earlier version)."""
    sandbox: bool = False
    """The figures are a rehearsal's: nothing was charged."""
    committed: float = 0.0
    """Estimated cost of every submit journalled for the jobs of this run (what --max-cost counts)."""
    left_to_submit: float = 0.0
    """Estimated cost of the jobs never submitted."""

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.failed or self.uncertain or self.unfinished or self.lost:
            return 1
        return 0


class _Run:
    """State of one run; its methods are the workers' steps."""

    def __init__(
        self, manifest: Manifest, jobs: list[Job], options: RunOptions, output_dir: Path, journal: Journal
    ) -> None:
        self.manifest = manifest
        self.jobs = jobs
        """The jobs this run works on: all of the manifest's, or a trial's share."""
        self.options = options
        self.output_dir = output_dir
        self.journal = journal
        self.records: dict[str, JobRecord] = {}
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
        self.waits: set[anyio.CancelScope] = set()
        """Polls and downloads in progress: a halt cancels them (submits in flight get their answers)."""
        self.committed = 0.0
        """Estimated cost of every submit journalled for this manifest's jobs, for --max-cost."""
        self.interrupted = False
        self.fatal: BaseException | None = None
        self.cap = AccountCap(options.concurrency)
        self.outage = Outage(options.outage_timeout)
        self.client: RunComfyClient
        self.downloader: Downloader

    # -- journal helpers -----------------------------------------------------------

    def record(self, job: Job, kind: str, **fields: Any) -> JobRecord:
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

    def action_for(self, job: Job) -> Action:
        record = self.records.get(job.key)
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
            return "poll"
        if record.phase == "completed":
            return "download"
        # failed or cancelled
        return "submit" if options.retry_failed else "hold"

    # -- the steps ---------------------------------------------------------------------

    async def process(self, job: Job, action: Action) -> None:
        progress = self.progress
        if self.halted:
            return
        if action == "submit":
            if self.stop_submitting or not self.within_budget(job):
                progress.set(job.key, "waiting")
                return
            if not await self.submit(job):
                return
        elif action == "poll":
            self.cap.adopt()
        try:
            record = self.records[job.key]
            if record.phase == "submitted":
                # Just submitted: nothing can be done yet, so the first look waits one interval.
                with self.wait_scope():
                    await self.poll(job, first_wait=self.options.poll_min if action == "submit" else 0.0)
        finally:
            if action in ("submit", "poll"):
                self.cap.release()
        if self.records[job.key].phase == "completed":
            with self.wait_scope():
                await self.download(job)

    def within_budget(self, job: Job) -> bool:
        """Count job's estimated price against --max-cost; False (and stop submitting) past the cap."""
        price = _estimate(job, self.manifest.schema_dirs)
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

    async def submit(self, job: Job) -> bool:
        """Send job until RunComfy takes it, refuses it for good, or the run stops; True once accepted.

        Only a submit certainly not accepted is sent again: 429 (after the
        account cap comes down) and an outage (after RunComfy answers again)
        within this run; every other answer is final for this run.
        """
        progress = self.progress
        price = _estimate(job, self.manifest.schema_dirs)
        backoff = self.options.retry.base
        while True:
            await self.cap.acquire()
            if self.stop_submitting:
                # Stopped while waiting for room: this job was never sent.
                self.cap.release()
                self.committed -= price
                progress.set(job.key, "waiting")
                return False
            progress.set(job.key, "submitting")
            # Intent first: if we die while the POST is out, the next run knows it may have been paid.
            self.record(job, "submitting", name=job.name, model=job.model, input=job.input)
            try:
                submission = await self.client.submit(job.model, job.input)
            except UncertainSubmitError as exc:
                self.record(job, "uncertain", reason=str(exc))
                self.cap.release()
                progress.set(job.key, "uncertain")
                progress.error(job.name, "submit uncertain, held (see --resubmit-uncertain)")
                return False
            except RateLimitedError as exc:
                # "Not now": an account at its cap of jobs in flight answers so. Fewer in flight, then again.
                self.record(job, "deferred", reason=str(exc))
                self.cap.refused()
                self.cap.release()
                progress.set(job.key, "waiting")
                await anyio.sleep(random.uniform(backoff / 2, backoff))
                backoff = min(backoff * 2, self.options.retry.cap)
                continue
            except TransientApiError as exc:
                # Nothing got through (an outage, or RunComfy's own 500001 past the retries): pause, then again.
                self.record(job, "deferred", reason=str(exc))
                self.cap.release()
                progress.set(job.key, "waiting")
                if await self.sit_out_outage(job, exc):
                    continue
                self.committed -= price
                return False
            except AuthError as exc:
                # Certain: nothing was accepted. The job stays pending; the whole run stops.
                self.record(job, "deferred", reason=str(exc))
                self.cap.release()
                self.committed -= price
                progress.set(job.key, "waiting")
                self.halt("auth", str(exc), exc)
                return False
            except ApiError as exc:
                # Refused for certain (validation, bad model, balance): nothing was charged.
                self.record(job, "refused", reason=str(exc))
                self.cap.release()
                self.committed -= price
                progress.set(job.key, "failed")
                if isinstance(exc, BalanceError):
                    progress.error(job.name, "insufficient balance")
                    self.stop("balance", str(exc))
                    progress.stopping = "insufficient balance: no more submits this run"
                else:
                    progress.error(job.name, str(exc))
                return False
            self.outage.reached()
            try:
                self.record(job, "submitted", request_id=submission.request_id)
            except JournalError as exc:
                # The one thing that must not be lost: say it where the user will see it.
                msg = f"{exc}. Job {job.name} WAS submitted as request {submission.request_id}: keep this id"
                log.error("%s", msg)
                raise JournalError(msg) from exc
            progress.set(job.key, "queued")
            return True

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

    async def poll(self, job: Job, first_wait: float = 0.0) -> None:
        options = self.options
        progress = self.progress
        record = self.records[job.key]
        assert record.request_id is not None
        request_id = record.request_id
        delay = options.poll_min
        last_state = record.remote_state
        queued_since = running_since = time.monotonic()
        submitted_at = record.submitted_at or time.time()
        reported_unknown = False
        cancel_asked = False
        await anyio.sleep(self.next_wait(submitted_at, first_wait, first=True) if first_wait else 0.0)
        while True:
            try:
                result = await self.client.result(request_id)
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
            state = result.state
            if state != last_state:
                self.record(job, "state", state=state if state != "unknown" else result.raw_status)
                last_state = state
                if state == "in_progress":
                    running_since = time.monotonic()
            if state == "completed":
                self.finish(job, result)
                return
            if state == "failed":
                reason = result.error or "RunComfy reported the job failed without a reason"
                self.record(job, "failed", reason=reason)
                progress.set(job.key, "failed")
                progress.error(job.name, reason)
                return
            if state == "cancelled":
                self.record(job, "cancelled")
                progress.set(job.key, "failed")
                return
            if state == "unknown" and not reported_unknown:
                reported_unknown = True
                log.warning(
                    "job %s: unknown state %r; still polling. Body: %s",
                    job.name,
                    result.raw_status,
                    result.for_journal(),
                )
            progress.set(job.key, "queued" if state == "in_queue" else "running")

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
                    await self.cancel(job, request_id, why)
                    delay = options.poll_min
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
        return self.durations.wait(age, backoff, self.options.poll_min, self.options.poll_max, first=first)

    async def cancel(self, job: Job, request_id: str, why: str) -> None:
        try:
            outcome = await self.client.cancel(request_id)
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
            self.record(job, "failed", reason=reason)
            self.progress.set(job.key, "failed")
            self.progress.error(job.name, reason)
            return
        # The whole answer is kept: fields we do not know today may matter to someone tomorrow.
        # What the fold needs, and the rest of the answer up to a bound: a hostile 200 MB answer
        # must not live in the journal for ever.
        record = self.record(job, "completed", outputs=result.outputs, cost=result.cost, result=result.for_journal())
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
            if known is not None and await anyio.to_thread.run_sync(_file_matches, self.output_dir, known):
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
                try:
                    fresh = await self.client.result(record.request_id)
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
        fallback = "." + str(job.input.get("output_format", "png")).replace("jpeg", "jpg")
        return safe_child(self.output_dir, job.name, f"{job.key[:8]}-{index}{extension_for(url, fallback)}")

    async def flush_sidecars(self) -> None:
        """Write the waiting sidecars in one thread hop (one per job cost a millisecond of CPU each)."""
        waiting, self.sidecars = self.sidecars, []
        if not waiting:
            return

        def write_all() -> None:
            for job, record in waiting:
                try:
                    self.write_sidecar(job, record)
                except OSError as exc:
                    msg = f"cannot write the sidecar of {job.name}: {exc.strerror or exc}"
                    raise OutputFolderError(msg) from exc

        await anyio.to_thread.run_sync(write_all)

    def write_sidecar(self, job: Job, record: JobRecord) -> None:
        """``<job>/<key>.json``: what was asked and what came back, beside the images."""
        sidecar = safe_child(self.output_dir, job.name, f"{job.key[:8]}.json")
        content = {
            "job": job.key,
            "name": job.name,
            "model": job.model,
            "repeat_index": job.repeat_index,
            "input": job.input,
            "request_id": record.request_id,
            "cost": record.cost,
            "outputs": record.outputs,
            "files": [f.path for _, f in sorted(record.files.items())],
            "manifest": str(self.manifest.path),
            "manifest_line": job.line,
            "source": job.source,
        }
        data = (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode()
        # Never through a link: a job folder or .part committed as one must not send this elsewhere.
        write_atomically(self.output_dir, sidecar.relative_to(self.output_dir).as_posix(), data, create_dirs=True)


def _estimate(job: Job, directories: Sequence[Path]) -> float:
    """The job's price; 0 where no table says (the cap then cannot count it)."""
    return estimate(job, directories) or 0.0


def _file_matches(root: Path, known: FileRecord) -> bool:
    """True when the journalled file is in place with its recorded size and hash.

    The journal's path is checked again first: one that is absolute, climbs
    out with ``..``, crosses a link or names no regular file is never opened,
    and the file counts as not downloaded (a tampered journal must not make
    the run read, or vouch for, a file outside the folder).
    """
    fd = open_journalled(root, known.path)
    if fd is None:
        return False
    try:
        with open(fd, "rb") as handle:
            if os.fstat(handle.fileno()).st_size != known.bytes:
                return False
            digest = hashlib.sha256()
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return False
    return digest.hexdigest() == known.sha256


@asynccontextmanager
async def _api_endpoint(options: RunOptions) -> AsyncIterator[tuple[str, str]]:
    """(base URL, token): the in-process sandbox's, or the real API's from flags and environment."""
    if options.sandbox is not None:
        async with Sandbox(options.sandbox).running() as url:
            yield url, SANDBOX_TOKEN
        return
    token = options.token or token_from_env()
    yield api_base_from_env(options.api_base), token


async def run_manifest(
    manifest: Manifest,
    options: RunOptions | None = None,
    *,
    on_start: Callable[[RunProgress], None] | None = None,
    on_plan: Callable[[RunPlan], None] | None = None,
) -> RunSummary:
    """Run (or resume) every job of manifest; the journal makes calling it again safe.

    on_plan receives what the run is about to do before its first request
    (raise from it to stop there: nothing is sent); on_start the live
    `RunProgress` once the plan is made, for a display.
    Raises UsageError before anything is sent when the token or API base is
    wrong, the folder's journal belongs to another API, or another folder
    already submitted these jobs; JournalLockedError when another run holds
    the output folder; AuthError when RunComfy refused the token (nothing in
    flight is left uncertain by it); JournalError when the run had to stop.
    """
    options = options or RunOptions()
    output_dir = _output_dir(manifest, options)
    # A bad --only, or jobs another sharding already submitted, fail here, before anything is opened.
    jobs = select_jobs(manifest, options)
    check_no_overlap(output_dir, (job.key for job in jobs))
    async with AsyncExitStack() as stack:
        base_url, token = await stack.enter_async_context(_api_endpoint(options))
        identity = SANDBOX_API if options.sandbox is not None else api_identity(base_url)
        if not options.new_output:
            # Before the folder is even created: a refused run leaves nothing behind.
            check_ledger(manifest, (job.key for job in jobs), output_dir, identity)
        journal = Journal(output_dir)
        folded = journal.open()
        stack.callback(journal.close)
        check_journal_api(folded.headers, identity, output_dir)
        remember_folder(manifest, output_dir, identity)
        for warning in folded.warnings:
            log.warning("%s", warning)
        run = _Run(manifest, jobs, options, output_dir, journal)
        run.records = folded.records
        finished = (r for r in folded.records.values() if r.duration is not None)
        for record in heapq.nsmallest(256, finished, key=lambda r: -(r.finished_at or 0.0))[::-1]:
            run.durations.add(record.duration or 0.0)  # the last run's jobs say how long this run's take
        limiter = RateLimiter(options.rate)
        run.client = await stack.enter_async_context(
            RunComfyClient(
                token,
                base_url,
                retry=options.retry,
                rate_limiter=limiter,
                transport=options.api_transport,
                submit_timeout=options.submit_timeout,
                poll_timeout=options.poll_timeout,
                max_connections=options.concurrency,
                max_answer_bytes=options.max_answer_bytes,
            )
        )
        run.downloader = await stack.enter_async_context(
            Downloader(
                max_bytes=options.max_download_bytes,
                transport=options.download_transport,
                backoff=options.download_backoff,
                max_connections=options.concurrency,
                folder=output_dir,
                # Loopback only at a loopback API base's own origin (the sandbox's): never another local port.
                loopback_origin=loopback_origin(base_url),
                deadline=options.download_deadline,
            )
        )
        journal.append(
            "run",
            manifest=str(manifest.path),
            manifest_sha256=manifest.sha256,
            version=__version__,
            api_base=base_url if options.sandbox is None else SANDBOX_API,
            jobs=len(manifest.jobs),
        )
        await _execute(run, on_start, on_plan)
        try:
            await anyio.to_thread.run_sync(write_metadata, manifest, output_dir, run.records)
        except OSError as exc:
            log.warning("could not write %s: %s", METADATA_NAME, exc.strerror or exc)
        return _summarize(run, folded.warnings)
    raise AssertionError("unreachable")  # pragma: no cover


async def _execute(
    run: _Run, on_start: Callable[[RunProgress], None] | None, on_plan: Callable[[RunPlan], None] | None
) -> None:
    options = run.options
    plan: list[tuple[Job, Action]] = []
    estimate_left = 0.0
    unpriced = 0
    for job in run.jobs:
        record = run.records.get(job.key)
        price = estimate(job, run.manifest.schema_dirs)
        if record is not None:
            run.committed += record.submits * (price or 0.0)
        action = run.action_for(job)
        plan.append((job, action))
        if action == "submit":
            estimate_left += price or 0.0
            unpriced += price is None
        status = _INITIAL_STATUS[action]
        record = run.records.get(job.key)
        if action == "hold":
            # Live counters start from the journal's: a resumed run shows the failures it holds.
            status = _HELD_STATUS.get(category(record), "held")
        elif record is not None and record.downloaded:
            status = "done"  # re-verified by a worker; only a missing or wrong file is fetched again
        run.progress.set(job.key, status)
    # Paid-for work first; new submits after, in manifest order.
    plan.sort(key=lambda item: item[1] == "submit")
    counts = Counter(action for _, action in plan)
    if on_plan is not None:
        on_plan(
            RunPlan(
                to_submit=counts["submit"],
                estimate=estimate_left,
                unpriced=unpriced,
                to_finish=counts["poll"] + counts["download"],
                held=counts["hold"],
                done=counts["done"],
                sandbox=options.sandbox is not None,
            )
        )
    if on_start is not None:
        on_start(run.progress)

    send, receive = anyio.create_memory_object_stream[tuple[Job, Action]](0)

    async def feed() -> None:
        async with send:
            for job, action in plan:
                if action == "hold":
                    continue
                if run.halted or (action == "submit" and run.stop_submitting):
                    break
                await send.send((job, action))

    async def worker(jobs: anyio.abc.ObjectReceiveStream[tuple[Job, Action]]) -> None:
        async with jobs:
            async for job, action in jobs:
                try:
                    await run.process(job, action)
                except (JournalError, OutputFolderError) as exc:
                    run.fatal = exc
                    group.cancel_scope.cancel()

    async def fsync_loop() -> None:
        while True:
            await anyio.sleep(options.fsync_interval)
            await anyio.to_thread.run_sync(run.journal.sync)
            try:
                await run.flush_sidecars()
            except OutputFolderError as exc:
                run.fatal = exc
                outer.cancel_scope.cancel()

    async def watch_signals(scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if run.interrupted:
                    scope.cancel()
                    continue
                run.interrupted = True
                if signum == signal.SIGTERM:
                    # A service manager's "stop": end every wait now, but let submits in flight get
                    # their answers recorded (cutting one short would leave it uncertain).
                    run.halt("terminated", "terminated (SIGTERM): stopping now; the same command resumes")
                else:
                    run.stop("interrupted", "interrupted")
                    run.progress.stopping = "interrupted: finishing paid-for jobs; press Ctrl-C again to stop now"

    deadline = math.inf if options.run_timeout is None else options.run_timeout
    with anyio.move_on_after(deadline) as run_scope:
        async with anyio.create_task_group() as outer:
            outer.start_soon(fsync_loop)
            if options.handle_signals:
                outer.start_soon(watch_signals, run_scope)
            async with anyio.create_task_group() as group:
                group.start_soon(feed)
                for _ in range(min(options.concurrency, max(1, len(plan)))):
                    group.start_soon(worker, receive.clone())
                receive.close()
            outer.cancel_scope.cancel()
    if run_scope.cancelled_caught and not run.interrupted:
        run.stop("timeout", f"the run timeout of {options.run_timeout:g}s passed")
    if run.fatal is None:
        with anyio.CancelScope(shield=True):
            await run.flush_sidecars()
    if run.fatal is not None:
        raise run.fatal
    if run.halt_error is not None:
        raise run.halt_error


def _summarize(run: _Run, warnings: list[str]) -> RunSummary:
    failed: list[JobOutcome] = []
    uncertain: list[JobOutcome] = []
    lost: list[JobOutcome] = []
    unfinished: list[JobOutcome] = []
    done = 0
    extra = 0.0
    left = 0.0
    for job in run.jobs:
        record = run.records.get(job.key)
        found = category(record)
        if found == "done":
            done += 1
            continue
        outcome = JobOutcome(
            job.key,
            job.name,
            record.phase if record else "pending",
            record.request_id if record else None,
            record.error if record else None,
        )
        if found in ("uncertain", "lost"):
            (uncertain if found == "uncertain" else lost).append(outcome)
            extra += _estimate(job, run.manifest.schema_dirs)
        elif found == "failed":
            failed.append(outcome)
        else:
            unfinished.append(outcome)
            if found == "pending":
                left += _estimate(job, run.manifest.schema_dirs)
    manifest_keys = {job.key for job in run.manifest.jobs}
    orphans = sorted(r.name or r.key for k, r in run.records.items() if k not in manifest_keys)
    # Every completed submit the journal knows was paid for, whether or not its job is still wanted.
    spent = sum(r.spent for r in run.records.values())
    superseded = sum(r.spent for k, r in run.records.items() if k not in manifest_keys)
    return RunSummary(
        output_dir=run.output_dir,
        journal=run.output_dir / JOURNAL_NAME,
        total=len(run.jobs),
        done=done,
        failed=failed,
        uncertain=uncertain,
        unfinished=unfinished,
        orphans=orphans,
        interrupted=run.interrupted,
        stop_reason=run.stop_submitting,
        possible_extra_cost=money(extra),
        spent=money(spent),
        warnings=warnings,
        lost=lost,
        stop_kind=run.stop_kind,
        spent_superseded=money(superseded),
        sandbox=run.options.sandbox is not None or is_rehearsal(api_identity(run.client.base_url)),
        committed=money(run.committed),
        left_to_submit=money(left),
    )


def money(value: float) -> float:
    """Dollars rounded to a millionth: sums of floats must not show as 0.6510000000000001."""
    return round(value, 6) + 0.0


def _output_dir(manifest: Manifest, options: RunOptions) -> Path:
    if options.output_dir is not None:
        return options.output_dir.resolve()
    folder = default_output_dir(manifest, options.shard, sandbox=options.sandbox is not None)
    refuse_linked_default(folder, manifest)
    return folder.resolve()


@dataclass(slots=True)
class CancelSummary:
    """What `cancel_manifest` did, job by job."""

    cancelled: list[str] = field(default_factory=list)
    not_cancellable: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    not_submitted: int = 0


async def cancel_manifest(manifest: Manifest, options: RunOptions | None = None) -> CancelSummary:
    """Ask RunComfy to cancel every job of manifest that is submitted and not finished.

    Takes the output folder's lock: stop a running `batcher run` first (its
    first Ctrl-C with --cancel-on-interrupt does the same from inside).
    RunComfy cancels only queued jobs; running ones are listed as not cancellable.
    """
    options = options or RunOptions()
    output_dir = _output_dir(manifest, options)
    summary = CancelSummary()
    async with AsyncExitStack() as stack:
        base_url, token = await stack.enter_async_context(_api_endpoint(options))
        journal = Journal(output_dir)
        folded = journal.open()
        stack.callback(journal.close)
        check_journal_api(folded.headers, SANDBOX_API if options.sandbox else api_identity(base_url), output_dir)
        client = await stack.enter_async_context(
            RunComfyClient(
                token,
                base_url,
                retry=options.retry,
                transport=options.api_transport,
                max_answer_bytes=options.max_answer_bytes,
            )
        )
        for job in select_jobs(manifest, options):
            record = folded.records.get(job.key)
            if record is None or record.phase in ("pending", "uncertain", "submitting"):
                summary.not_submitted += 1
                continue
            if record.phase != "submitted" or record.request_id is None:
                continue
            try:
                outcome = await client.cancel(record.request_id)
            except AuthError:
                raise  # the token is refused: every other cancel would be refused alike
            except ApiError as exc:
                summary.errors.append((job.name, str(exc)))
                continue
            if outcome.outcome == "cancelled" or outcome.state == "cancelled":
                journal.append("cancelled", job.key, name=job.name)
                summary.cancelled.append(job.name)
            else:
                summary.not_cancellable.append((job.name, outcome.state))
    return summary
