"""What does this run do with each job, and how far does it take it?

`JobSteps` is what a run's workers share (`batcher.engine.shared.RunShared`)
plus the two decisions about a job: `action_for`, once from its record when
the run plans (submit, poll, download, hold, done), and `process`, which takes
one job one step further, as far as it can go in this run: `submit`
(`batcher.engine.submit`), then `poll` (`batcher.engine.poll`, which ends in
`finish` or a `cancel`), then `download` (`batcher.engine.finish`). A submit goes
through the account with room (`batcher.engine.lanes`); every later call about the
job goes through the account the journal says submitted it. `runner` feeds it
jobs from a pool of workers; why and how hard the run is stopping is
`batcher.engine.stopping`.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from ..journal.failures import failure_of
from ..journal.store import JobRecord, Journal
from ..lifecycle import Action, FailureClass
from ..manifest.loader import Job, Manifest
from ..output.download import Downloader
from .finish import download
from .lanes import AccountPool, Lane
from .poll import poll
from .shared import RunShared, price_of
from .submit import submit

if TYPE_CHECKING:
    from .options import JobSelection, RunOptions

__all__ = ["JobSteps", "price_of"]

log = logging.getLogger(__name__)


class JobSteps(RunShared):
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
        super().__init__(manifest, jobs, options, output_dir, journal, accounts, downloader)
        self.retry_skipped: Counter[FailureClass] = Counter()
        """Failed jobs --retry-failed leaves alone this run, by class (see `action_for`)."""
        self.retry_skipped_cost = 0.0
        """What resubmitting those would have been estimated at: money not spent."""
        self.without_token: dict[str, list[str]] = {}
        """Jobs in flight held because this run has no token for the account that submitted them, by account."""

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
        self.retry_skipped_cost += self.price(job)
        return "hold"

    # -- the steps ---------------------------------------------------------------------

    async def process(self, job: Job, action: Action) -> None:
        """Take job as far as it can go this run, starting with action."""
        stopping = self.stopping
        if stopping.halted:
            return
        lane: Lane | None = None
        if action == "submit":
            if not self.still_to_submit(job):
                log.warning("%s: not sent: the journal says it is %s", job.name, self.records[job.key].phase)
                return
            if stopping.reason or not self.within_budget(job):
                self.progress.set(job.key, "pending")
                return
            lane = await submit(self, job)
            if lane is None:
                return
        elif action == "poll":
            lane = self.accounts.lane_for(self.records[job.key].account)
            assert lane is not None  # action_for holds a job whose account has no token
            if lane.refused is not None:
                self.progress.set(job.key, "held")  # its account's token was refused: the next run polls it
                return
            self.accounts.adopt(lane, self.records[job.key].submitted_at)
        try:
            record = self.records[job.key]
            if record.phase == "submitted" and lane is not None:
                # Just submitted: nothing can be done yet, so the first look waits one interval.
                with stopping.wait_scope(lane.account):
                    await poll(self, job, lane, first_wait=self.options.poll_interval if action == "submit" else 0.0)
                if lane.refused is not None and self.records[job.key].phase == "submitted":
                    self.progress.set(job.key, "held")
        finally:
            if lane is not None:
                self.accounts.release(lane, self.records[job.key].submitted_at)
        if self.records[job.key].phase == "completed":
            with stopping.wait_scope():
                await download(self, job)

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
        price = self.price(job)
        cap = self.options.max_cost
        if cap is not None and self.committed + price > cap + 1e-9:
            spent = sum(r.spent for r in self.records.values())
            self.stopping.stop(
                "budget",
                f"--max-cost ${cap:,.2f} reached: this manifest's submits are estimated at ${self.committed:,.2f} "
                f"(RunComfy reported ${spent:,.2f} spent so far) and the next job would take it to "
                f"${self.committed + price:,.2f}",
            )
            self.progress.stopping = "cost cap reached: no more submits this run"
            return False
        self.committed += price
        return True
