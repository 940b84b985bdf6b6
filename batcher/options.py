"""What a run can be told (`RunOptions`), and which of the manifest's jobs it works on (`select_jobs`).

The CLI's flags map onto `RunOptions` one to one; library callers build one
directly. A bad value is a UsageError here, before anything is opened.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from .client import DEFAULT_MAX_ANSWER_BYTES, RetryPolicy
from .download import DEFAULT_MAX_BYTES
from .errors import UsageError
from .manifest import Job, Manifest, shard_of

if TYPE_CHECKING:
    from .sandbox import SandboxConfig

__all__ = ["RunOptions", "select_jobs"]


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
    sandbox: bool = False
    """Run against an in-process sandbox (no token, no network, no cost)."""
    sandbox_config: SandboxConfig | None = None
    """The in-process sandbox's settings (default: `SandboxConfig()`); used only with `sandbox`."""
    retry_failed: bool = False
    resubmit_uncertain: bool = False
    """Submit again the jobs whose submit may have been accepted (uncertain) or that RunComfy lost."""
    replace_rejected: bool = False
    """Submit one new generation for each image rejected in review (`batcher.replacements`)."""
    over_balance: bool = False
    """Start even when the jobs to submit are estimated over the account's balance."""
    live_prices: bool = True
    """Ask RunComfy for the balance and each model's live price before the first submit."""
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
        if not isinstance(self.sandbox, bool):
            msg = "RunOptions.sandbox is True or False; put a SandboxConfig in sandbox_config"
            raise UsageError(msg)
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
