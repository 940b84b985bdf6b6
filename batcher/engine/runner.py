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
import logging
import math
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import get_args

import anyio
import anyio.abc

from .._version import __version__
from ..errors import BalanceError, JournalError, ManifestChangedError, OutputFolderError, StorageError
from ..journal.standing import Tally, category, opened, tally
from ..journal.store import JOURNAL_NAME, FoldedJournal
from ..lifecycle import Action, ExitCode, FailureClass, StopKind, held_status, starting_status
from ..manifest.cost import estimator
from ..manifest.loader import Job, Manifest
from ..net.policy import OutputHosts, loopback_origin
from ..output.dataset import METADATA_NAME, write_metadata
from ..output.download import Downloader
from ..output.folders import api_identity, check_no_overlap, is_rehearsal, shard_folder_name
from ..output.ledger import Place, note_run_end, remember_place
from ..output.remote import RemoteRun, StoredFiles, pull_view
from ..review.replacements import with_replacements
from ..runcomfy.account import Account, look_up, price_dirs
from .cancel import CancelSummary, cancel_manifest
from .endpoint import Endpoint
from .finish import flush_sidecars
from .lanes import balances_of
from .opening import open_run, output_dir_of, place_of, safe_name
from .options import JobSelection, RunOptions, select_jobs, settings_used
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
    gallery: str | None = None
    """The gallery the run wrote at its end (a path, or a bucket run's URL); None when it wrote none."""
    refused_accounts: list[str] = field(default_factory=list)
    """One message per account whose token RunComfy refused while the others went on (fingerprint, the
    variable the tokens came from, its jobs held)."""

    @property
    def output(self) -> str:
        """Where the run's files are, as a person looks for them: the bucket URL, else the folder."""
        return self.output_url or str(self.output_dir)

    @property
    def exit_code(self) -> ExitCode:
        if self.interrupted:
            return ExitCode.INTERRUPTED
        if self.failed or self.refused or self.uncertain or self.unfinished or self.lost or self.refused_accounts:
            return ExitCode.FAILED
        return ExitCode.DONE


GalleryWriter = Callable[[Manifest, Path, FoldedJournal, StoredFiles | None], Path]
"""Writes a run's gallery into its folder (a bucket run's working copy, with its stored files) and returns its
path: `batcher.reports.gallery.write_gallery`, given by `batcher.run_manifest` (the engine is below reports)."""


async def run_manifest(
    manifest: Manifest,
    options: RunOptions | None = None,
    *,
    on_start: Callable[[RunProgress], None] | None = None,
    on_plan: Callable[[RunPlan], None] | None = None,
    gallery: GalleryWriter | None = None,
) -> RunSummary:
    """Run (or resume) every job of manifest; the journal makes calling it again safe.

    on_plan receives what the run is about to do before its first request
    (raise from it to stop there: nothing is sent); on_start the live
    `RunProgress` once the plan is made, for a display; gallery, when given,
    writes the gallery at the end (with ``metadata.jsonl``; a bucket run's are
    uploaded with its files), where `RunSummary.gallery` says.
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
        manifest, output_dir_of(manifest, options), submit_new=options.replace_rejected, said=notices
    )
    # A bad --only, or jobs another sharding already submitted, fail here, before anything is opened.
    jobs = select_jobs(manifest, options)
    output_dir = output_dir_of(manifest, options)
    journal_here = await _journal_here(options, jobs, output_dir)
    async with AsyncExitStack() as stack:
        noted: list[Place] = []
        # Called last, once the journal is closed (and a bucket's flushed): the ledger's summary of this place.
        stack.push_async_callback(_note_run_end, noted, output_dir)
        endpoint, journal, pool, remote = await stack.enter_async_context(
            open_run(manifest, options, jobs, ledger=True, journal_here=journal_here)
        )
        # The bucket's URL for a bucket run (never its working copy in the cache, nor a credential).
        if not endpoint.sandbox:
            noted.append(place_of(manifest, options))
            remember_place(manifest, noted[0], endpoint.identity)
        folded = journal.folded
        for warning in folded.warnings:
            log.warning("%s", warning)
        warnings = list(folded.warnings) + notices
        downloader = await stack.enter_async_context(_downloader(options, endpoint, output_dir))
        run = JobSteps(manifest, jobs, options, output_dir, journal, pool, downloader)
        if remote is not None:
            run.durable, run.stored = remote.durable, remote.present
        account, balances = await _accounts(run, endpoint)
        journal.append(
            "run",
            manifest=str(manifest.path),
            manifest_sha256=manifest.sha256,
            version=__version__,
            api_base=endpoint.identity if endpoint.sandbox else endpoint.base_url,
            jobs=manifest.count,
            settings=settings_used(options),
        )
        plan = _plan(run)
        _announce(run, plan, account, balances, notices, on_plan)
        run.progress.started = time.monotonic()  # the clock of elapsed and jobs/min: not the wait at a prompt
        if on_start is not None:
            on_start(run.progress)
        await _Loop(run, plan).run()
        await _write_metadata(run, remote)
        summary = _summarize(run, warnings, endpoint, remote)
        if gallery is not None:
            summary.gallery = await _write_gallery(gallery, run, journal.folded, remote)
        return summary
    raise AssertionError("unreachable")  # pragma: no cover


def _downloader(options: RunOptions, endpoint: Endpoint, output_dir: Path) -> Downloader:
    return Downloader(
        max_bytes=options.max_download_bytes,
        transport=options.download_transport,
        backoff=options.download_backoff,
        max_connections=options.concurrency,
        folder=output_dir,
        # Loopback only at a loopback API base's own origin (the sandbox's): never another local port.
        loopback_origin=loopback_origin(endpoint.base_url),
        deadline=options.download_timeout,
        output_hosts=OutputHosts.of(endpoint.base_url, options.allow_output_hosts),
    )


async def _write_metadata(run: JobSteps, remote: RemoteRun | None) -> None:
    """metadata.jsonl beside the outputs; a failure is a warning (the run's work is done)."""
    try:
        files = remote.files() if remote is not None else None
        await anyio.to_thread.run_sync(write_metadata, run.manifest, run.output_dir, run.records, files)
    except OSError as exc:
        log.warning("could not write %s: %s", METADATA_NAME, exc.strerror or exc)


async def _write_gallery(
    write: GalleryWriter, run: JobSteps, folded: FoldedJournal, remote: RemoteRun | None
) -> str | None:
    """The run's gallery, written (with the replacements it sent, and every job of the manifest, as `report`
    writes it); where it is, or None when it could not be written (said as a warning: the run's work is done)."""
    now = FoldedJournal(records=run.records, headers=folded.headers)
    try:
        files = remote.files() if remote is not None else None
        page = await anyio.to_thread.run_sync(write, run.manifest, run.output_dir, now, files)
    except (OSError, OutputFolderError) as exc:
        log.warning("could not write the gallery: %s", getattr(exc, "strerror", None) or exc)
        return None
    return f"{remote.bucket.output.url}/{page.name}" if remote is not None else str(page)


async def _note_run_end(noted: list[Place], working_copy: Path) -> None:
    with anyio.CancelScope(shield=True):
        for place in noted:
            await anyio.to_thread.run_sync(note_run_end, place, working_copy)


async def _journal_here(options: RunOptions, jobs: JobSelection, output_dir: Path) -> bool:
    """Whether the run's own place already holds its journal, after checking that no other layout of
    it (shard folders, or none) submitted these jobs."""
    if options.remote is None:
        check_no_overlap(output_dir, jobs.keys())
        return (output_dir / JOURNAL_NAME).is_file()
    # The bucket's layouts (unsharded, shard-K-of-N/), read into a local view laid out as a folder is:
    # the same check, so that another layout of one prefix never pays again for what it sent, from
    # whichever machine (the per-user ledger knows only this one's runs).
    view, _ = await anyio.to_thread.run_sync(partial(pull_view, options.remote, journals_only=True))
    own = view / shard_folder_name(*options.shard) if options.shard else view
    check_no_overlap(own, jobs.keys())
    return (own / JOURNAL_NAME).is_file() and (own / JOURNAL_NAME).stat().st_size > 0


async def _accounts(run: JobSteps, endpoint: Endpoint) -> tuple[Account, list[tuple[str, float | None]]]:
    """The first account's live prices and balance (when asked for), every account's balance, and the
    price tables and job durations the run starts from."""
    options, manifest = run.options, run.manifest
    account = Account()
    if options.live_prices:
        account = await look_up(
            endpoint.base_url,
            endpoint.token,
            manifest.models,
            run.output_dir,
            schema_dirs=manifest.schema_dirs,
            transport=options.api_transport,
            balance=endpoint.balance_base,
        )
    balances = await balances_of(endpoint, options, account)
    run.price_dirs = price_dirs(run.output_dir, manifest.schema_dirs)
    finished = (r for r in run.journal.folded.records.values() if r.duration is not None)
    for record in heapq.nsmallest(256, finished, key=lambda r: -(r.finished_at or 0.0))[::-1]:
        run.durations.add(record.duration or 0.0)  # the last run's jobs say how long this run's take
    return account, balances


@dataclass(slots=True)
class _Plan:
    """What the run does with each job, decided once before the first request."""

    actions: bytearray = field(default_factory=bytearray)
    """One byte a job, in manifest order: the jobs themselves are expanded again as they are fed."""
    counts: Counter[Action] = field(default_factory=Counter)
    estimate: float = 0.0
    """Of the jobs to submit, in dollars."""
    unpriced: int = 0
    finishing: int = 0
    rechecks: int = 0
    """Jobs whose downloaded files are only read back, after the new submits."""
    superseded: list[tuple[Job, Action]] = field(default_factory=list)


def _plan(run: JobSteps) -> _Plan:
    """Each job's action and live status, from its record."""
    plan = _Plan()
    estimate = estimator(run.price_dirs)
    for _, job in _planned(run):
        record = run.records.get(job.key)
        price = estimate(job)
        if record is not None:
            run.committed += record.submits * (price or 0.0)
        action = run.action_for(job, record)
        if record is not None and record.phase == "submitting":
            record = run.records.get(job.key)  # action_for journalled it as uncertain
        plan.actions.append(_CODE[action])
        plan.counts[action] += 1
        if action == "submit":
            plan.estimate += price or 0.0
            plan.unpriced += price is None
        status = starting_status(action)
        if action == "hold":
            # Live counters start from the journal's: a resumed run shows the failures it holds.
            status = held_status(category(record))
        elif record is not None and record.downloaded:
            status = "done"  # re-verified by a worker; only a missing or wrong file is fetched again
            if action == "download":
                plan.actions[-1] |= _RECHECK  # after the new submits: reading 50,000 files back held them for 50 s
                plan.rechecks += 1
        plan.finishing += action in ("poll", "download") and status != "done"
        run.progress.set(job.key, status)
    plan.superseded = _superseded_in_flight(run)
    plan.counts.update(action for _, action in plan.superseded)
    run.progress.total += len(plan.superseded)
    return plan


def _planned(run: JobSteps) -> Iterator[tuple[int, Job]]:
    """(index, job) of each selected job, as `JobSelection.checked` gives them, each job holding what the plan
    reads of it (key, name, model, price fields): from the table the load kept, without expanding the
    manifest again (a resume of 100,000 jobs expanded them once more for its plan, before its first submit).
    The jobs sent are still read again, and checked, by the feed's passes."""
    selected = run.jobs.keys()
    wanted = next(selected, None)
    index = 0
    if wanted is not None:
        for job in run.jobs.manifest.priced_jobs(run.price_dirs):
            if job.key != wanted:
                continue
            yield index, job
            index += 1
            wanted = next(selected, None)
            if wanted is None:
                break
    if wanted is not None:  # a selected key the manifest's own table does not hold: not the jobs it loaded
        msg = f"the jobs of {run.jobs.manifest.path} are not the jobs selected (job {wanted}): run it again"
        raise ManifestChangedError(msg)


_EARLY_SUBMITS = 1_000
"""The most new submits met before the last paid-for job that the feed holds, so that its submits go on from
where the paid-for pass ended rather than expanding every job again from the first (more: a pass of its own)."""


def _announce(
    run: JobSteps,
    plan: _Plan,
    account: Account,
    balances: list[tuple[str, float | None]],
    notices: list[str],
    on_plan: Callable[[RunPlan], None] | None,
) -> None:
    """Give the plan to on_plan (or log its notices), then refuse a plan over the accounts' balance."""
    options, counts = run.options, plan.counts
    for notice in notices if on_plan is None else ():
        log.warning("%s", notice)  # a library caller's log; the CLI says them with the plan, -q or not
    if on_plan is not None:
        on_plan(
            RunPlan(
                to_submit=counts["submit"],
                estimate=plan.estimate,
                unpriced=plan.unpriced,
                to_finish=plan.finishing,
                superseded=len(plan.superseded),
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
    over = account.balance is not None and counts["submit"] and plan.estimate > account.balance + 1e-9
    if over and not options.over_balance:
        msg = (
            f"the {counts['submit']} job(s) to submit are estimated at ${plan.estimate:,.2f}, over the account's "
            f"balance of ${account.balance:,.2f}. Top up, send fewer (--limit, --max-cost), or add --over-balance "
            "to go anyway (RunComfy refuses submits once the balance runs out; nothing is lost)"
        )
        raise BalanceError(msg)


class _Loop:
    """The run's tasks: a feeder, a fixed pool of workers, the fsync loop and the signal watcher."""

    def __init__(self, run: JobSteps, plan: _Plan) -> None:
        self.steps, self.plan = run, plan
        self.send, self.receive = anyio.create_memory_object_stream[tuple[Job, Action]](0)
        self.workers = anyio.CancelScope()
        """Cancelled when a worker meets a fatal error."""
        self.tasks = anyio.CancelScope()
        """Cancelled when the fsync loop meets one."""

    async def run(self) -> None:
        """Feed every planned job through the workers; raise what ended the run early."""
        run, options, plan = self.steps, self.steps.options, self.plan
        stopping = run.stopping
        deadline = math.inf if options.timeout is None else options.timeout
        with anyio.move_on_after(deadline) as run_scope:
            async with anyio.create_task_group() as outer:
                self.tasks = outer.cancel_scope
                outer.start_soon(self.fsync_loop)
                if options.handle_signals:
                    outer.start_soon(self.watch_signals, run_scope)
                async with anyio.create_task_group() as group:
                    self.workers = group.cancel_scope
                    group.start_soon(self.feed)
                    for _ in range(min(options.concurrency, max(1, len(plan.actions) + len(plan.superseded)))):
                        group.start_soon(self.worker, self.receive.clone())
                    self.receive.close()
                outer.cancel_scope.cancel()
        if run_scope.cancelled_caught and not stopping.interrupted:
            stopping.stop("timeout", f"the run timeout of {options.timeout:g}s passed")
        if stopping.fatal is None:
            with anyio.CancelScope(shield=True):
                await flush_sidecars(run)
        if stopping.fatal is not None:
            raise stopping.fatal
        if stopping.halt_error is not None:
            raise stopping.halt_error
        if stopping.changed is not None:
            raise stopping.changed

    async def feed(self) -> None:
        # Paid-for work first, then new submits, then the files of jobs done before are read back, each in
        # manifest order: up to three passes over the jobs (each only when it has work), so no list of
        # 100,000 jobs is ever held.
        # The paid-for pass ends at the last paid-for job, and the submits' pass goes on from there, holding
        # the few new submits met on the way (a resume's jobs in flight are near where it was killed: its
        # first new submit no longer waits for every job to be expanded twice more).
        run, plan, send = self.steps, self.plan, self.send
        stopping, actions = run.stopping, plan.actions
        walk: Iterator[tuple[int, Job]] | None = None
        early: list[Job] | None = []
        async with send:
            try:
                if plan.counts["poll"] + plan.counts["download"] > len(plan.superseded) + plan.rechecks:
                    last = max((i for i, code in enumerate(actions) if code in _PAID_FOR), default=len(actions))
                    walk = run.jobs.checked()
                    for index, job in walk:
                        if actions[index] in _PAID_FOR:
                            if stopping.halted:
                                return
                            await send.send((job, _ACTIONS[actions[index]]))
                        elif actions[index] == _SUBMIT and early is not None:
                            if len(early) < _EARLY_SUBMITS:
                                early.append(job)
                            else:
                                early = None  # too many to hold: the submits take a pass of their own
                        if index == last:
                            break
                for item in plan.superseded:
                    if stopping.halted:
                        return
                    await send.send(item)
                if plan.counts["submit"]:
                    if walk is None or early is None:
                        walk, early = run.jobs.checked(), []
                    for job in early:
                        if stopping.halted:
                            return
                        if stopping.reason:
                            break
                        await send.send((job, "submit"))
                    else:
                        for index, job in walk:
                            if actions[index] == _SUBMIT:
                                if stopping.halted:
                                    return
                                if stopping.reason:
                                    break
                                await send.send((job, "submit"))
                if plan.rechecks:
                    for index, job in run.jobs.checked():
                        if actions[index] & _RECHECK:
                            if stopping.halted or stopping.interrupted:
                                return  # Ctrl-C: what was done stays done; the next run reads them back
                            await send.send((job, "download"))
            except ManifestChangedError as exc:
                # What was sent stays sent and is finished; nothing more is decided from a stale plan.
                stopping.changed = exc
                stopping.halt("changed", str(exc))

    async def worker(self, jobs: anyio.abc.ObjectReceiveStream[tuple[Job, Action]]) -> None:
        run = self.steps
        async with jobs:
            async for job, action in jobs:
                try:
                    await run.process(job, action)
                except (JournalError, OutputFolderError, StorageError) as exc:
                    run.stopping.fatal = exc
                    self.workers.cancel()
                # Done with it this run: keep its record small (a later change decodes it again).
                run.records.settle(job.key)
                run.progress.settle(job.key)

    async def fsync_loop(self) -> None:
        run = self.steps
        while True:
            await anyio.sleep(run.options.fsync_interval)
            await anyio.to_thread.run_sync(run.journal.sync)
            checkpoint = run.journal.due_checkpoint()
            if checkpoint is not None:
                await anyio.to_thread.run_sync(checkpoint)
            try:
                await flush_sidecars(run)
            except OutputFolderError as exc:
                run.stopping.fatal = exc
                self.tasks.cancel()

    async def watch_signals(self, scope: anyio.CancelScope) -> None:
        stopping = self.steps.stopping
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if stopping.interrupted:
                    scope.cancel()
                    continue
                stopping.interrupted = True
                if signum == signal.SIGTERM:
                    # A service manager's "stop": end every wait now, but let submits in flight get
                    # their answers recorded (cutting one short would leave it uncertain).
                    stopping.halt("terminated", "terminated (SIGTERM): stopping now; the same command resumes")
                else:
                    stopping.stop("interrupted", "interrupted")
                    self.steps.progress.stopping = (
                        "interrupted: finishing paid-for jobs; press Ctrl-C again to stop now"
                    )


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
        job = Job(key=key, name=safe_name(record.name, key), model=record.model, input={})
        found.append((job, "poll" if record.phase == "submitted" else "download"))
        run.progress.set(key, "queued" if record.phase == "submitted" else "downloading")
    return found


def _summarize(run: JobSteps, warnings: list[str], endpoint: Endpoint, remote: RemoteRun | None) -> RunSummary:
    # A bucket run's files are counted where they are: in the bucket (a resume elsewhere fetches none again).
    with remote.files() if remote is not None else opened(run.output_dir) as folder:
        sums = tally(run.jobs, run.records, run.price_dirs, folder, wanted=run.manifest.holds)
    return RunSummary(
        **{f.name: getattr(sums, f.name) for f in fields(Tally)},
        output_dir=run.output_dir,
        journal=run.output_dir / JOURNAL_NAME,
        total=len(run.jobs),
        interrupted=run.stopping.interrupted,
        stop_reason=run.stopping.reason,
        stop_kind=run.stopping.kind,
        sandbox=endpoint.sandbox or is_rehearsal(endpoint.identity),
        warnings=warnings,
        output_url=remote.bucket.output.url if remote is not None else None,
        refused_accounts=_refused_accounts(run, endpoint),
    )


def _refused_accounts(run: JobSteps, endpoint: Endpoint) -> list[str]:
    """What to say of each account whose token RunComfy refused while the run went on through others."""
    said: list[str] = []
    for lane in run.accounts.revoked:
        held = [
            r.name or key[:12] for key, r in run.records.items() if r.phase == "submitted" and r.account == lane.account
        ]
        shown = ", ".join(held[:10]) + (f" and {len(held) - 10} more" if len(held) > 10 else "")
        jobs = (
            f"its {len(held)} job(s) in flight are held for the next run ({shown})"
            if held
            else "no job of it is in flight"
        )
        said.append(
            f"account {lane.account}: {lane.refused}; {jobs}. Replace that account's token in "
            f"{endpoint.token_env} and run the same command (nothing already submitted is sent again)"
        )
    return said
