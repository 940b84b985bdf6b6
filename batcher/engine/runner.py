"""Running a manifest: the loop that feeds jobs to workers, with the journal as the only truth.

`run_manifest` folds the journal, decides each job's next step, and feeds
the work through a fixed pool of workers (an anyio task group reading one
memory object stream), so memory and task count stay flat however many jobs
there are. Jobs already paid for (submitted, completed) go first; new
submits follow in manifest order. What one job goes through is
`batcher.engine.steps`; what the user sees meanwhile is `batcher.engine.progress`.

Journal appends are synchronous ``os.write`` calls of one line each (see
`batcher.journal.store`): a worker must not go on until its request_id is recorded,
and a small blocking write is cheaper and simpler than a round trip through
a writer task. The one slow part, ``fsync``, runs in groups on a thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import re
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import get_args

import anyio
import anyio.abc

from .._version import __version__
from ..errors import (
    ApiError,
    AuthError,
    BalanceError,
    JournalError,
    ManifestChangedError,
    OutputFolderError,
    StorageError,
    UsageError,
)
from ..journal.standing import Tally, category, opened, tally
from ..journal.store import JOURNAL_NAME, Journal
from ..lifecycle import Action, ExitCode, FailureClass, StopKind, held_status, starting_status
from ..manifest.cost import estimate
from ..manifest.loader import Job, Manifest
from ..net.policy import loopback_origin
from ..output.dataset import METADATA_NAME, write_metadata
from ..output.download import Downloader
from ..output.folders import (
    api_identity,
    check_journal_api,
    check_no_overlap,
    default_output_dir,
    is_rehearsal,
    refuse_linked_default,
    shard_folder_name,
)
from ..output.ledger import Place, check_ledger, forget_gone_places, note_run_end, remember_place
from ..output.remote import RemoteRun, pull_view, run_output
from ..review.replacements import with_replacements
from ..runcomfy.account import Account, look_up, price_dirs
from .endpoint import Endpoint, LocalApi, open_endpoint
from .lanes import AccountPool, balances_of, open_pool
from .options import JobSelection, RunOptions, select_jobs
from .progress import RunProgress
from .steps import JobSteps

__all__ = [
    "CancelSummary",
    "RunOptions",
    "RunPlan",
    "RunSummary",
    "cancel_manifest",
    "run_manifest",
    "select_jobs",
]

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
"""A journalled job name fit for a folder (a tampered journal's is replaced by the key)."""

_ACTIONS: tuple[Action, ...] = get_args(Action)
_CODE: dict[Action, int] = {action: code for code, action in enumerate(_ACTIONS)}
_SUBMIT = _CODE["submit"]
_PAID_FOR = frozenset({_CODE["poll"], _CODE["download"]})
_RECHECK = 0x80
"""Added to a plan's download code: the job's files were all downloaded, and are only read back (after the
new submits: they wait for nothing but the disk)."""


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
    """Against a sandbox (in process or on loopback): nothing will be charged."""
    superseded: int = 0
    """Jobs no longer in the manifest, paid for and not finished: polled and downloaded all the same."""
    balance: float | None = None
    """The account's balance as RunComfy said it before the run (None: not known)."""
    prices: list[str] = field(default_factory=list)
    """One line per model on which price the estimate uses (live or bundled) and why."""
    accounts: list[tuple[str, float | None]] = field(default_factory=list)
    """Each account of the run (fingerprint, balance or None when not known), first token first."""
    retry_skipped: dict[FailureClass, int] = field(default_factory=dict)
    """Failed jobs --retry-failed leaves alone (their class is not asked for), by class."""
    retry_skipped_cost: float = 0.0
    """What resubmitting retry_skipped would have been estimated at."""
    without_token: dict[str, list[str]] = field(default_factory=dict)
    """Jobs in flight held because no token of this run is the account's that submitted them, by account."""
    notices: list[str] = field(default_factory=list)
    """What to say before the first request even to a quiet run: it changes what the run may send
    (a damaged ``decisions.jsonl``: no rejected image is replaced until it is mended)."""


@dataclass(slots=True)
class RunSummary(Tally):
    """What a run did and what is left: the `Tally` of its jobs (as `status` computes it, so the two cannot
    disagree), and how the run ended; `exit_code` follows the CLI's contract."""

    output_dir: Path = Path()
    """The run's folder: for a bucket run, its working copy on this machine (see `output`)."""
    journal: Path = Path()
    total: int = 0
    interrupted: bool = False
    stop_reason: str | None = None
    stop_kind: StopKind | None = None
    sandbox: bool = False
    """The figures are a rehearsal's: nothing was charged."""
    warnings: list[str] = field(default_factory=list)
    output_url: str | None = None
    """A bucket run's ``s3://`` or ``gs://`` URL (a shard's own)."""

    @property
    def output(self) -> str:
        """Where the run's files are, as a person looks for them: the bucket URL, else the folder."""
        return self.output_url or str(self.output_dir)

    @property
    def exit_code(self) -> ExitCode:
        if self.interrupted:
            return ExitCode.INTERRUPTED
        if self.failed or self.refused or self.uncertain or self.unfinished or self.lost:
            return ExitCode.FAILED
        return ExitCode.DONE


def _output_dir(manifest: Manifest, options: RunOptions) -> Path:
    if options.remote is not None:
        return run_output(options.remote, options.shard).cache_dir()
    if options.output_dir is not None:
        return options.output_dir.resolve()
    folder = default_output_dir(manifest, options.shard, sandbox=options.sandbox)
    refuse_linked_default(folder, manifest)
    return folder.resolve()


def _place(manifest: Manifest, options: RunOptions) -> Place:
    """Where the run lives, as the ledger notes it: the bucket output (a shard's), else the local folder."""
    if options.remote is not None:
        return run_output(options.remote, options.shard)
    return _output_dir(manifest, options)


@asynccontextmanager
async def _open_run(
    manifest: Manifest, options: RunOptions, jobs: JobSelection, *, ledger: bool, journal_here: bool = False
) -> AsyncIterator[tuple[Endpoint, Journal, AccountPool, RemoteRun | None]]:
    """What `run_manifest` and `cancel_manifest` share: the endpoint, the folder's journal (locked,
    checked to belong to this API) and a client per account; with ledger, the check that no other place
    already submitted these jobs, made before the folder (or anything in the bucket) is even created
    (journal_here: the run's own place already holds its journal)."""
    output_dir = _output_dir(manifest, options)
    remote: RemoteRun | None = None
    async with AsyncExitStack() as stack:
        endpoint = await stack.enter_async_context(
            open_endpoint(
                sandbox=(options.sandbox_config or _default_sandbox()) if options.sandbox else None,
                api_base=options.api_base,
                token=options.token,
                tokens=options.tokens,
            )
        )
        # An in-process sandbox charges nothing: a rehearsal in a second checkout must not be refused for the
        # first one's (found by a newcomer: the README's first command, exit 2), nor note itself.
        ledger = ledger and not endpoint.sandbox
        if ledger and not options.new_output:
            here = _place(manifest, options)
            await anyio.to_thread.run_sync(
                lambda: check_ledger(manifest, jobs.keys(), here, endpoint.identity, journal_here=journal_here)
            )
        elif ledger:
            await anyio.to_thread.run_sync(forget_gone_places)
        if options.remote is not None:
            # Before the journal opens: the bucket's journal is the truth, rebuilt here; flushed until the end.
            remote = await stack.enter_async_context(
                RemoteRun.open(run_output(options.remote, options.shard), output_dir)
            )
        journal = Journal(output_dir)
        journal.open()
        stack.callback(journal.close)
        check_journal_api(journal.folded.headers, endpoint.identity, output_dir)
        pool = await stack.enter_async_context(open_pool(endpoint.tokens, endpoint.base_url, options))
        yield endpoint, journal, pool, remote


def _default_sandbox() -> LocalApi:
    # The engine cannot make a sandbox (it never imports one): `batcher.run_manifest` and the CLI give it.
    msg = "RunOptions(sandbox=True) needs a sandbox_config here: call batcher.run_manifest, which gives the default"
    raise UsageError(msg)


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
    # Rejected images' replacements are the manifest's jobs once sent; new ones only with --replace-rejected.
    notices: list[str] = []
    manifest = with_replacements(
        manifest, _output_dir(manifest, options), submit_new=options.replace_rejected, said=notices
    )
    # A bad --only, or jobs another sharding already submitted, fail here, before anything is opened.
    jobs = select_jobs(manifest, options)
    output_dir = _output_dir(manifest, options)
    if options.remote is None:
        check_no_overlap(output_dir, jobs.keys())
        journal_here = (output_dir / JOURNAL_NAME).is_file()
    else:
        # The bucket's layouts (unsharded, shard-K-of-N/), read into a local view laid out as a folder is:
        # the same check, so that another layout of one prefix never pays again for what it sent, from
        # whichever machine (the per-user ledger knows only this one's runs).
        view, _ = await anyio.to_thread.run_sync(partial(pull_view, options.remote, journals_only=True))
        own = view / shard_folder_name(*options.shard) if options.shard else view
        check_no_overlap(own, jobs.keys())
        journal_here = (own / JOURNAL_NAME).is_file() and (own / JOURNAL_NAME).stat().st_size > 0
    async with AsyncExitStack() as stack:
        noted: list[Place] = []
        # Called last, once the journal is closed (and a bucket's flushed): the ledger's summary of this place.
        stack.push_async_callback(_note_run_end, noted, output_dir)
        endpoint, journal, pool, remote = await stack.enter_async_context(
            _open_run(manifest, options, jobs, ledger=True, journal_here=journal_here)
        )
        # The bucket's URL for a bucket run (never its working copy in the cache, nor a credential).
        if not endpoint.sandbox:
            noted.append(_place(manifest, options))
            remember_place(manifest, noted[0], endpoint.identity)
        folded = journal.folded
        for warning in folded.warnings:
            log.warning("%s", warning)
        warnings = list(folded.warnings) + notices
        downloader = await stack.enter_async_context(
            Downloader(
                max_bytes=options.max_download_bytes,
                transport=options.download_transport,
                backoff=options.download_backoff,
                max_connections=options.concurrency,
                folder=output_dir,
                # Loopback only at a loopback API base's own origin (the sandbox's): never another local port.
                loopback_origin=loopback_origin(endpoint.base_url),
                deadline=options.download_timeout,
            )
        )
        run = JobSteps(manifest, jobs, options, output_dir, journal, pool, downloader)
        if remote is not None:
            run.durable, run.stored = remote.durable, remote.present
        account = Account()
        if options.live_prices:
            account = await look_up(
                endpoint.base_url,
                endpoint.token,
                manifest.models,
                output_dir,
                schema_dirs=manifest.schema_dirs,
                transport=options.api_transport,
                balance=endpoint.balance_base,
            )
        balances = await balances_of(endpoint, options, account)
        run.price_dirs = price_dirs(output_dir, manifest.schema_dirs)
        finished = (r for r in folded.records.values() if r.duration is not None)
        for record in heapq.nsmallest(256, finished, key=lambda r: -(r.finished_at or 0.0))[::-1]:
            run.durations.add(record.duration or 0.0)  # the last run's jobs say how long this run's take
        journal.append(
            "run",
            manifest=str(manifest.path),
            manifest_sha256=manifest.sha256,
            version=__version__,
            api_base=endpoint.identity if endpoint.sandbox else endpoint.base_url,
            jobs=manifest.count,
        )
        await _execute(run, account, on_start, on_plan, balances, notices)
        try:
            files = remote.files() if remote is not None else None
            await anyio.to_thread.run_sync(write_metadata, manifest, output_dir, run.records, files)
        except OSError as exc:
            log.warning("could not write %s: %s", METADATA_NAME, exc.strerror or exc)
        return _summarize(run, warnings, endpoint, remote)
    raise AssertionError("unreachable")  # pragma: no cover


async def _note_run_end(noted: list[Place], working_copy: Path) -> None:
    with anyio.CancelScope(shield=True):
        for place in noted:
            await anyio.to_thread.run_sync(note_run_end, place, working_copy)


async def _execute(
    run: JobSteps,
    account: Account,
    on_start: Callable[[RunProgress], None] | None,
    on_plan: Callable[[RunPlan], None] | None,
    balances: list[tuple[str, float | None]],
    notices: list[str],
) -> None:
    options = run.options
    # One byte a job, in manifest order: the jobs themselves are expanded again as they are fed (see feed).
    plan = bytearray()
    counts: Counter[Action] = Counter()
    estimate_left = 0.0
    unpriced = 0
    finishing = 0
    for _, job in run.jobs.checked():
        record = run.records.get(job.key)
        price = estimate(job, run.price_dirs)
        if record is not None:
            run.committed += record.submits * (price or 0.0)
        action = run.action_for(job, record)
        if record is not None and record.phase == "submitting":
            record = run.records.get(job.key)  # action_for journalled it as uncertain
        plan.append(_CODE[action])
        counts[action] += 1
        if action == "submit":
            estimate_left += price or 0.0
            unpriced += price is None
        status = starting_status(action)
        if action == "hold":
            # Live counters start from the journal's: a resumed run shows the failures it holds.
            status = held_status(category(record))
        elif record is not None and record.downloaded:
            status = "done"  # re-verified by a worker; only a missing or wrong file is fetched again
            if action == "download":
                plan[-1] |= _RECHECK  # after the new submits: reading 50,000 files back held them for 50 s
        finishing += action in ("poll", "download") and status != "done"
        run.progress.set(job.key, status)
    rechecks = sum(1 for code in plan if code & _RECHECK)
    superseded = _superseded_in_flight(run)
    counts.update(action for _, action in superseded)
    run.progress.total += len(superseded)
    for notice in notices if on_plan is None else ():
        log.warning("%s", notice)  # a library caller's log; the CLI says them with the plan, -q or not
    if on_plan is not None:
        on_plan(
            RunPlan(
                to_submit=counts["submit"],
                estimate=estimate_left,
                unpriced=unpriced,
                to_finish=finishing,
                superseded=len(superseded),
                held=counts["hold"],
                done=counts["done"],
                sandbox=options.sandbox or is_rehearsal(api_identity(run.client.base_url)),
                balance=account.balance,
                prices=account.said,
                accounts=balances,
                retry_skipped=dict(run.retry_skipped),
                retry_skipped_cost=run.retry_skipped_cost,
                without_token=run.without_token,
                notices=notices,
            )
        )
    over = account.balance is not None and counts["submit"] and estimate_left > account.balance + 1e-9
    if over and not options.over_balance:
        msg = (
            f"the {counts['submit']} job(s) to submit are estimated at ${estimate_left:,.2f}, over the account's "
            f"balance of ${account.balance:,.2f}. Top up, send fewer (--limit, --max-cost), or add --over-balance "
            "to go anyway (RunComfy refuses submits once the balance runs out; nothing is lost)"
        )
        raise BalanceError(msg)
    if on_start is not None:
        on_start(run.progress)

    send, receive = anyio.create_memory_object_stream[tuple[Job, Action]](0)

    async def feed() -> None:
        # Paid-for work first, then new submits, then the files of jobs done before are read back, each in
        # manifest order: up to three passes over the jobs (each only when it has work), so no list of
        # 100,000 jobs is ever held.
        async with send:
            try:
                if counts["poll"] + counts["download"] > len(superseded) + rechecks:
                    for index, job in run.jobs.checked():
                        if plan[index] in _PAID_FOR:
                            if run.halted:
                                return
                            await send.send((job, _ACTIONS[plan[index]]))
                for item in superseded:
                    if run.halted:
                        return
                    await send.send(item)
                if counts["submit"]:
                    for index, job in run.jobs.checked():
                        if plan[index] == _SUBMIT:
                            if run.halted:
                                return
                            if run.stop_submitting:
                                break
                            await send.send((job, "submit"))
                if rechecks:
                    for index, job in run.jobs.checked():
                        if plan[index] & _RECHECK:
                            if run.halted or run.interrupted:
                                return  # Ctrl-C: what was done stays done; the next run reads them back
                            await send.send((job, "download"))
            except ManifestChangedError as exc:
                # What was sent stays sent and is finished; nothing more is decided from a stale plan.
                run.changed = exc
                run.halt("changed", str(exc))

    async def worker(jobs: anyio.abc.ObjectReceiveStream[tuple[Job, Action]]) -> None:
        async with jobs:
            async for job, action in jobs:
                try:
                    await run.process(job, action)
                except (JournalError, OutputFolderError, StorageError) as exc:
                    run.fatal = exc
                    group.cancel_scope.cancel()
                # Done with it this run: keep its record small (a later change decodes it again).
                run.records.settle(job.key)
                run.progress.settle(job.key)

    async def fsync_loop() -> None:
        while True:
            await anyio.sleep(options.fsync_interval)
            await anyio.to_thread.run_sync(run.journal.sync)
            checkpoint = run.journal.due_checkpoint()
            if checkpoint is not None:
                await anyio.to_thread.run_sync(checkpoint)
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

    deadline = math.inf if options.timeout is None else options.timeout
    with anyio.move_on_after(deadline) as run_scope:
        async with anyio.create_task_group() as outer:
            outer.start_soon(fsync_loop)
            if options.handle_signals:
                outer.start_soon(watch_signals, run_scope)
            async with anyio.create_task_group() as group:
                group.start_soon(feed)
                for _ in range(min(options.concurrency, max(1, len(plan) + len(superseded)))):
                    group.start_soon(worker, receive.clone())
                receive.close()
            outer.cancel_scope.cancel()
    if run_scope.cancelled_caught and not run.interrupted:
        run.stop("timeout", f"the run timeout of {options.timeout:g}s passed")
    if run.fatal is None:
        with anyio.CancelScope(shield=True):
            await run.flush_sidecars()
    if run.fatal is not None:
        raise run.fatal
    if run.halt_error is not None:
        raise run.halt_error
    if run.changed is not None:
        raise run.changed


def _superseded_in_flight(run: JobSteps) -> list[tuple[Job, Action]]:
    """Jobs the journal holds that the manifest no longer does (an edited prompt's earlier version),
    accepted and not finished: paid for, so they are polled and downloaded like any other."""
    if run.options.shard is None and (run.options.only is not None or run.options.limit is not None):
        return []  # a trial run works on its share only
    found: list[tuple[Job, Action]] = []
    for key in run.records:
        if run.manifest.holds(key):
            continue  # asked first: reading a settled record decodes it, and most records are the manifest's
        record = run.records[key]
        if not (record.phase == "submitted" or (record.phase == "completed" and not record.downloaded)):
            continue
        job = Job(key=key, name=_safe_name(record.name, key), model=record.model, input={})
        found.append((job, "poll" if record.phase == "submitted" else "download"))
        run.progress.set(key, "queued" if record.phase == "submitted" else "downloading")
    return found


def _safe_name(name: str, key: str) -> str:
    return name if _SAFE_NAME.fullmatch(name or "") else key[:12]


def _summarize(run: JobSteps, warnings: list[str], endpoint: Endpoint, remote: RemoteRun | None) -> RunSummary:
    # A bucket run's files are counted where they are: in the bucket (a resume elsewhere fetches none again).
    with remote.files() if remote is not None else opened(run.output_dir) as folder:
        sums = tally(run.jobs, run.records, run.price_dirs, folder, wanted=run.manifest.holds)
    return RunSummary(
        **{f.name: getattr(sums, f.name) for f in fields(Tally)},
        output_dir=run.output_dir,
        journal=run.output_dir / JOURNAL_NAME,
        total=len(run.jobs),
        interrupted=run.interrupted,
        stop_reason=run.stop_submitting,
        stop_kind=run.stop_kind,
        sandbox=endpoint.sandbox or is_rehearsal(endpoint.identity),
        warnings=warnings,
        output_url=remote.bucket.output.url if remote is not None else None,
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
    summary = CancelSummary()
    jobs = select_jobs(manifest, options)
    async with _open_run(manifest, options, jobs, ledger=False) as (_, journal, pool, _remote):
        folded = journal.folded
        pool.recorded({r.account for r in folded.records.values() if r.account})
        # Jobs edited out of the manifest while queued are paid for all the same: cancel them too.
        superseded = [
            Job(key=key, name=_safe_name(record.name, key), model=record.model, input={})
            for key, record in folded.records.items()
            if not manifest.holds(key)
            and record.phase == "submitted"
            and options.only is None
            and options.limit is None
        ]
        for job in itertools.chain(jobs, superseded):
            record = folded.records.get(job.key)
            if record is None or record.phase in ("pending", "uncertain", "submitting"):
                summary.not_submitted += 1
                continue
            if record.phase != "submitted" or record.request_id is None:
                continue
            lane = pool.lane_for(record.account)
            if lane is None:
                summary.errors.append((job.name, f"no token for account {record.account}, which submitted it"))
                continue
            try:
                outcome = await lane.client.cancel(record.request_id)
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
