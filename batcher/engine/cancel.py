"""Asking RunComfy to cancel: one queued job during a run, or every job of a manifest.

RunComfy cancels only queued jobs; a running one answers ``not_cancellable``
and is waited for. `cancel_request` is the run's step (Ctrl-C with
--cancel-on-interrupt, --queue-timeout: see `batcher.engine.poll`);
`cancel_manifest` is ``batcher cancel``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ..errors import ApiError, AuthError
from ..manifest.loader import Job, Manifest
from .lanes import Lane
from .opening import open_run, safe_name
from .options import RunOptions, select_jobs
from .shared import RunShared

__all__ = ["CancelSummary", "cancel_manifest", "cancel_request"]


async def cancel_request(run: RunShared, job: Job, lane: Lane, request_id: str, why: str) -> None:
    """Ask RunComfy to cancel job's request (why: for the journal); a refusal is shown, and the job waited for."""
    try:
        outcome = await lane.client.cancel(request_id)
    except ApiError as exc:
        run.progress.error(job.name, f"cancel failed: {exc}")
        return
    if outcome.outcome == "cancelled" or outcome.state == "cancelled":
        run.record(job, "note", reason=f"cancel asked: {why}")
    else:
        run.progress.error(job.name, f"not cancellable ({outcome.state or outcome.outcome}); waiting for it")


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
    async with open_run(manifest, options, jobs, ledger=False) as (_, journal, pool, _remote):
        folded = journal.folded
        pool.recorded({r.account for r in folded.records.values() if r.account})
        # Jobs edited out of the manifest while queued are paid for all the same: cancel them too.
        superseded = [
            Job(key=key, name=safe_name(record.name, key), model=record.model, input={})
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
