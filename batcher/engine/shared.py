"""What do one run's workers share while they take jobs through their steps?

`RunShared` holds it, fully built in its constructor: the journal and its
records, the accounts, the downloader, the live progress, the outage state,
the run's reasons to stop (`batcher.engine.stopping.RunStop`) and the money
committed so far. The steps themselves live one to a module (`submit`,
`poll`, `finish`, `cancel`), each a function of a `RunShared`;
`batcher.engine.steps.JobSteps` adds the planning and the dispatch.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ApiError, AuthError
from ..journal.store import FileRecord, JobRecord, Journal
from ..journal.table import RecordTable
from ..lifecycle import EventKind
from ..manifest.cost import estimate
from ..manifest.loader import Job, Manifest
from ..output.download import Downloader
from ..runcomfy.backpressure import Outage
from ..runcomfy.polling import DurationModel
from .lanes import AccountPool, Lane
from .progress import RunProgress
from .stopping import RunStop

if TYPE_CHECKING:
    from .options import JobSelection, RunOptions

__all__ = ["RunShared", "price_of"]

log = logging.getLogger(__name__)


class RunShared:
    """What one run's workers share."""

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
        """Sidecars waiting to be written, by `batcher.engine.finish.flush_sidecars`."""
        self.durations = accounts.durations = DurationModel()
        """How long this manifest's jobs take, to time polls (and a full account's probe: see `lanes`)."""
        self.progress = RunProgress(total=len(self.jobs))
        self.stopping = RunStop(self.progress)
        """The run's reasons to stop, written by the loop and the steps alike."""
        self.committed = 0.0
        """Estimated cost of every submit journalled for this manifest's jobs, for --max-cost."""
        self.outage = Outage(options.outage_timeout)
        self.durable: Callable[[], Awaitable[None]] = _written
        """Returns once the journal's lines so far are durable where the run's journal lives (a remote
        output's bucket: see `batcher.output.remote`); awaited between a submit's intent and its POST."""
        self.stored: Callable[[FileRecord], bool] = _nowhere
        """True for a journalled file held elsewhere already (a remote output's bucket): not fetched again."""

    def record(self, job: Job, kind: EventKind, **fields: Any) -> JobRecord:
        """Journal an event for job and fold it into the in-memory record."""
        record = self.journal.append(kind, job.key, **fields)
        assert record is not None  # an event with a job always has a record
        record.name = record.name or job.name
        return record

    def price(self, job: Job) -> float:
        """The job's estimated price (see `price_of`)."""
        return price_of(job, self.price_dirs)

    def token_refused(self, lane: Lane, error: AuthError) -> None:
        """RunComfy refused lane's token: that account stops alone (no submit goes there again, its polls
        end, its jobs in flight are held for the next run); the run halts only when no account is left."""
        first = lane.refused is None
        if self.accounts.refuse(lane, error):
            refused = self.accounts.revoked
            if len(refused) > 1:
                error = AuthError(
                    "RunComfy refused the token of every account of this run: "
                    + "; ".join(f"account {each.account}: {each.refused}" for each in refused)
                )
            self.stopping.halt("auth", str(error), error)
            return
        self.stopping.cut(lane.account)
        if first:
            log.warning("account %s: %s; the other accounts go on", lane.account, error)
            self.progress.error(f"account {lane.account}", "token refused: its jobs are held; the others go on")

    async def sit_out_outage(self, job: Job, exc: ApiError) -> bool:
        """After a call that could not get through: wait for RunComfy to answer again.

        False when the run must stop (the patience ran out, or something else halted it).
        """
        stopping = self.stopping
        self.outage.failed()
        self.progress.stopping = f"RunComfy cannot be reached; waiting (up to {self.options.outage_timeout:g}s)"
        self.progress.error(job.name, str(exc))
        up = False
        with stopping.wait_scope():  # a halt (a refused token elsewhere, SIGTERM) ends the wait too
            up = await self.outage.wait(lambda: self.client.reachable(job.model))
        if stopping.halted:
            return False
        if not up:
            stopping.halt(
                "outage",
                f"RunComfy could not be reached for {self.options.outage_timeout:g}s (--outage-timeout); "
                f"last error: {exc}",
            )
            return False
        if self.progress.stopping and self.progress.stopping.startswith("RunComfy cannot be reached"):
            self.progress.stopping = None
        return not stopping.halted


def price_of(job: Job, directories: Sequence[Path]) -> float:
    """The job's price; 0 where no table says (the cap then cannot count it)."""
    return estimate(job, directories) or 0.0


async def _written() -> None:
    """A local journal's line is durable enough once written (see `batcher.journal.store`)."""


def _nowhere(_known: FileRecord) -> bool:
    return False
