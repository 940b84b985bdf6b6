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
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc
import httpx

from . import __version__
from .client import (
    RateLimiter,
    RequestResult,
    RetryPolicy,
    RunComfyClient,
    api_base_from_env,
    token_from_env,
)
from .cost import estimate
from .dataset import METADATA_NAME, write_metadata
from .download import DEFAULT_MAX_BYTES, Downloader, extension_for, safe_child
from .errors import (
    ApiError,
    AuthError,
    BalanceError,
    BatcherError,
    DownloadError,
    JournalError,
    OutputFolderError,
    RequestGoneError,
    UncertainSubmitError,
    UsageError,
)
from .manifest import Job, Manifest, shard_of
from .polling import DurationModel
from .sandbox import Sandbox, SandboxConfig
from .state import JOURNAL_NAME, FileRecord, JobRecord, Journal, category, read_journal

__all__ = [
    "CancelSummary",
    "JobStatus",
    "RunOptions",
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

JobStatus = Literal["waiting", "submitting", "queued", "running", "downloading", "done", "failed", "uncertain", "held"]
Action = Literal["submit", "poll", "download", "hold", "done"]

SANDBOX_TOKEN = "sandbox-token"
_SHARD_FOLDER = re.compile(r"shard-(\d+)-of-(\d+)")
_INITIAL_STATUS: dict[Action, JobStatus] = {
    "submit": "waiting",
    "poll": "queued",
    "download": "downloading",
    "hold": "held",
    "done": "done",
}


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


def default_output_dir(manifest: Manifest, shard: tuple[int, int] | None = None) -> Path:
    """``output/<manifest name>/`` under the current folder; a shard's is ``shard-K-of-N/`` inside it."""
    folder = Path("output") / manifest.name
    return folder / shard_folder_name(*shard) if shard else folder


def shard_folder_name(part: int, shards: int) -> str:
    return f"shard-{part}-of-{shards}"


def shard_folders(output_dir: Path) -> list[Path]:
    """The shard folders inside output_dir, in order."""
    found = [p for p in output_dir.glob("shard-*-of-*") if _SHARD_FOLDER.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: tuple(int(n) for n in _SHARD_FOLDER.findall(p.name)[0][::-1]))


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` → ``(2, 4)``; raises UsageError for anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        msg = f"--shard takes K/N with 1 <= K <= N, like 2/4; got {text!r}"
        raise UsageError(msg)
    return int(match[1]), int(match[2])


def _check_no_overlap(output_dir: Path, jobs: list[Job]) -> None:
    """Refuse a run whose jobs another layout of the same output (sharded or not) already submitted.

    A shard's journal knows only its own slice: running 1/2 after 1/4, or
    unsharded after shards, would submit again what the other journal holds.
    """
    if _SHARD_FOLDER.fullmatch(output_dir.name):
        others = [output_dir.parent, *shard_folders(output_dir.parent)]
    else:
        others = shard_folders(output_dir)
    mine = {job.key for job in jobs}
    for other in others:
        if other == output_dir or not (other / JOURNAL_NAME).is_file():
            continue
        overlap = [k for k, r in read_journal(other / JOURNAL_NAME).records.items() if k in mine and r.submits]
        if overlap:
            msg = (
                f"{len(overlap)} of these jobs were already submitted by the run journalled in {other}; "
                "running them here would pay twice. Run with that run's --shard (or without --shard, "
                "if it had none), or give --output a folder of its own"
            )
            raise UsageError(msg)


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
        if status in ("done", "failed") and old not in (None, "done", "failed", "held"):
            self.finished_this_run += 1

    def error(self, name: str, message: str) -> None:
        self.recent_errors = [*self.recent_errors[-4:], f"{name}: {message}"]

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

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.failed or self.uncertain or self.unfinished:
            return 1
        return 0


class _Stop(Exception):
    """Internal: the whole run must stop now (bad token, journal unwritable)."""


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
        self.committed = 0.0
        """Estimated cost of every submit journalled for this manifest's jobs, for --max-cost."""
        self.interrupted = False
        self.fatal: BaseException | None = None
        self.client: RunComfyClient
        self.downloader: Downloader

    # -- journal helpers -----------------------------------------------------------

    def record(self, job: Job, kind: str, **fields: Any) -> JobRecord:
        """Journal an event for job and fold it into the in-memory record."""
        record = self.journal.append(kind, job.key, **fields)
        assert record is not None  # an event with a job always has a record
        record.name = record.name or job.name
        return record

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
        if record.phase == "uncertain":
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
        if action == "submit":
            if self.stop_submitting or not self.within_budget(job):
                progress.set(job.key, "waiting")
                return
            submitted = await self.submit(job)
            if not submitted:
                return
        record = self.records[job.key]
        if record.phase == "submitted":
            # Just submitted: nothing can be done yet, so the first look waits one interval.
            await self.poll(job, first_wait=self.options.poll_min if action == "submit" else 0.0)
            record = self.records[job.key]
        if record.phase == "completed":
            await self.download(job)

    def within_budget(self, job: Job) -> bool:
        """Count job's estimated price against --max-cost; False (and stop submitting) past the cap."""
        price = _estimate(job, self.manifest.schema_dirs)
        cap = self.options.max_cost
        if cap is not None and self.committed + price > cap + 1e-9:
            self.stop_submitting = (
                f"the next job would take the estimated cost to ${self.committed + price:,.2f}, "
                f"past --max-cost ${cap:,.2f}"
            )
            self.progress.stopping = "cost cap reached: no more submits this run"
            return False
        self.committed += price
        return True

    async def submit(self, job: Job) -> bool:
        progress = self.progress
        progress.set(job.key, "submitting")
        # Intent first: if we die while the POST is out, the next run knows it may have been paid.
        self.record(job, "submitting", name=job.name, model=job.model, input=job.input)
        try:
            submission = await self.client.submit(job.model, job.input)
        except UncertainSubmitError as exc:
            self.record(job, "uncertain", reason=str(exc))
            progress.set(job.key, "uncertain")
            progress.error(job.name, "submit uncertain, held (see --resubmit-uncertain)")
            return False
        except AuthError as exc:
            self.record(job, "refused", reason=str(exc))
            progress.set(job.key, "waiting")
            raise _Stop(str(exc)) from exc
        except BalanceError as exc:
            self.record(job, "refused", reason=str(exc))
            progress.set(job.key, "failed")
            progress.error(job.name, "insufficient balance")
            self.stop_submitting = self.stop_submitting or str(exc)
            progress.stopping = "insufficient balance: no more submits this run"
            return False
        except ApiError as exc:
            # Refused for certain (validation, bad model, retries ran out before acceptance):
            # nothing was charged, so a later run may try again.
            self.record(job, "refused", reason=str(exc))
            progress.set(job.key, "failed")
            progress.error(job.name, str(exc))
            return False
        try:
            self.record(job, "submitted", request_id=submission.request_id)
        except JournalError as exc:
            # The one thing that must not be lost: say it where the user will see it.
            msg = f"{exc}. Job {job.name} WAS submitted as request {submission.request_id}: keep this id"
            log.error("%s", msg)
            raise JournalError(msg) from exc
        progress.set(job.key, "queued")
        return True

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
        await anyio.sleep(self.next_wait(submitted_at, first_wait) if first_wait else 0.0)
        while True:
            try:
                result = await self.client.result(request_id)
            except RequestGoneError as exc:
                self.record(job, "failed", reason=str(exc))
                progress.set(job.key, "failed")
                progress.error(job.name, "request expired on RunComfy")
                return
            except AuthError as exc:
                raise _Stop(str(exc)) from exc
            except ApiError as exc:
                # Retries ran out on a poll: the job is still paid for, so keep waiting.
                progress.error(job.name, f"poll trouble, still waiting: {exc}")
                await anyio.sleep(delay)
                delay = min(delay * options.poll_growth, options.poll_max)
                continue
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
                    "job %s: unknown state %r; still polling. Body: %s", job.name, result.raw_status, result.raw
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

    def next_wait(self, submitted_at: float, backoff: float) -> float:
        """The wait before the next poll of a job submitted at submitted_at (see `DurationModel.wait`)."""
        age = time.time() - submitted_at
        return self.durations.wait(age, backoff, self.options.poll_min, self.options.poll_max)

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
        record = self.record(job, "completed", outputs=result.outputs, cost=result.cost, result=result.raw)
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
        temporary = sidecar.with_name(f".{sidecar.name}.part")
        temporary.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(temporary, sidecar)


def _estimate(job: Job, directories: Sequence[Path]) -> float:
    """The job's price; 0 where no table says (the cap then cannot count it)."""
    return estimate(job, directories) or 0.0


def _file_matches(root: Path, known: FileRecord) -> bool:
    path = root / known.path
    try:
        if path.stat().st_size != known.bytes:
            return False
        digest = hashlib.sha256()
        with path.open("rb") as handle:
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
) -> RunSummary:
    """Run (or resume) every job of manifest; the journal makes calling it again safe.

    on_start receives the live `RunProgress` once the plan is made, for a display.
    Raises UsageError before anything is sent when the token or API base is
    wrong, JournalLockedError when another run holds the output folder, and
    AuthError or JournalError when the run had to stop.
    """
    options = options or RunOptions()
    output_dir = (options.output_dir or default_output_dir(manifest, options.shard)).resolve()
    # A bad --only, or jobs another sharding already submitted, fail here, before anything is opened.
    jobs = select_jobs(manifest, options)
    _check_no_overlap(output_dir, jobs)
    async with AsyncExitStack() as stack:
        base_url, token = await stack.enter_async_context(_api_endpoint(options))
        journal = Journal(output_dir)
        folded = journal.open()
        stack.callback(journal.close)
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
            )
        )
        run.downloader = await stack.enter_async_context(
            Downloader(
                max_bytes=options.max_download_bytes,
                transport=options.download_transport,
                backoff=options.download_backoff,
                max_connections=options.concurrency,
            )
        )
        journal.append(
            "run",
            manifest=str(manifest.path),
            manifest_sha256=manifest.sha256,
            version=__version__,
            api_base=base_url if options.sandbox is None else "sandbox",
            jobs=len(manifest.jobs),
        )
        await _execute(run, on_start)
        try:
            await anyio.to_thread.run_sync(write_metadata, manifest, output_dir, run.records)
        except OSError as exc:
            log.warning("could not write %s: %s", METADATA_NAME, exc.strerror or exc)
        return _summarize(run, folded.warnings)
    raise AssertionError("unreachable")  # pragma: no cover


async def _execute(run: _Run, on_start: Callable[[RunProgress], None] | None) -> None:
    options = run.options
    plan: list[tuple[Job, Action]] = []
    for job in run.jobs:
        record = run.records.get(job.key)
        if record is not None:
            run.committed += record.submits * _estimate(job, run.manifest.schema_dirs)
        action = run.action_for(job)
        plan.append((job, action))
        status = _INITIAL_STATUS[action]
        record = run.records.get(job.key)
        if action == "hold" and record is not None and record.phase == "uncertain":
            status = "uncertain"
        elif record is not None and record.downloaded:
            status = "done"  # re-verified by a worker; only a missing or wrong file is fetched again
        run.progress.set(job.key, status)
    # Paid-for work first; new submits after, in manifest order.
    plan.sort(key=lambda item: item[1] == "submit")
    if on_start is not None:
        on_start(run.progress)

    send, receive = anyio.create_memory_object_stream[tuple[Job, Action]](0)

    async def feed() -> None:
        async with send:
            for job, action in plan:
                if action == "hold":
                    continue
                if action == "submit" and run.stop_submitting:
                    break
                await send.send((job, action))

    async def worker(jobs: anyio.abc.ObjectReceiveStream[tuple[Job, Action]]) -> None:
        async with jobs:
            async for job, action in jobs:
                try:
                    await run.process(job, action)
                except (_Stop, JournalError, OutputFolderError) as exc:
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
            async for _ in signals:
                if not run.interrupted:
                    run.interrupted = True
                    run.stop_submitting = "interrupted"
                    run.progress.stopping = "interrupted: finishing paid-for jobs; press Ctrl-C again to stop now"
                else:
                    scope.cancel()

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
        run.stop_submitting = f"the run timeout of {options.run_timeout:g}s passed"
    if run.fatal is None:
        with anyio.CancelScope(shield=True):
            await run.flush_sidecars()
    if run.fatal is not None:
        if isinstance(run.fatal, _Stop):
            cause = run.fatal.__cause__
            raise cause if isinstance(cause, BatcherError) else AuthError(str(run.fatal))
        raise run.fatal


def _summarize(run: _Run, warnings: list[str]) -> RunSummary:
    failed: list[JobOutcome] = []
    uncertain: list[JobOutcome] = []
    unfinished: list[JobOutcome] = []
    done = 0
    extra = 0.0
    spent = 0.0
    for job in run.jobs:
        record = run.records.get(job.key)
        if record is not None and record.cost:
            spent += record.cost
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
        if found == "uncertain":
            uncertain.append(outcome)
            extra += _estimate(job, run.manifest.schema_dirs)
        elif found == "failed":
            failed.append(outcome)
        else:
            unfinished.append(outcome)
    manifest_keys = {job.key for job in run.manifest.jobs}
    orphans = sorted(r.name or r.key for k, r in run.records.items() if k not in manifest_keys)
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
        possible_extra_cost=extra,
        spent=spent,
        warnings=warnings,
    )


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
    output_dir = (options.output_dir or default_output_dir(manifest, options.shard)).resolve()
    summary = CancelSummary()
    async with AsyncExitStack() as stack:
        base_url, token = await stack.enter_async_context(_api_endpoint(options))
        journal = Journal(output_dir)
        folded = journal.open()
        stack.callback(journal.close)
        client = await stack.enter_async_context(
            RunComfyClient(token, base_url, retry=options.retry, transport=options.api_transport)
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
            except ApiError as exc:
                summary.errors.append((job.name, str(exc)))
                continue
            if outcome.outcome == "cancelled" or outcome.state == "cancelled":
                journal.append("cancelled", job.key, name=job.name)
                summary.cancelled.append(job.name)
            else:
                summary.not_cancellable.append((job.name, outcome.state))
    return summary
