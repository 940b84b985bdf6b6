"""What a run can be told (`RunOptions`), and which of the manifest's jobs it works on (`select_jobs`).

The CLI's flags map onto `RunOptions` one to one; library callers build one
directly. A bad value is a UsageError here, before anything is opened.
"""

from __future__ import annotations

import fnmatch
import itertools
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx2

from ..errors import ManifestChangedError, UsageError
from ..journal.failures import RETRYABLE
from ..lifecycle import FailureClass
from ..manifest.loader import Job, Manifest, in_shard
from ..net.policy import OutputHosts
from ..output.download import DEFAULT_MAX_BYTES
from ..runcomfy.client import DEFAULT_MAX_ANSWER_BYTES, RetryPolicy
from .endpoint import LocalApi

if TYPE_CHECKING:
    from ..output.storage.bucket import RemoteOutput

__all__ = ["JobSelection", "RunOptions", "select_jobs"]


def select_jobs(manifest: Manifest, options: RunOptions) -> JobSelection:
    """The jobs a run works on. Trial runs (--only, --limit) take a share; job identity does not
    depend on the share, so the full run that follows never pays twice for what the trial did.
    Raises UsageError when --only matches no job."""
    return JobSelection(manifest, options.shard, options.only, options.limit)


class JobSelection:
    """The jobs of a run, in manifest order: their keys held (8 bytes a job), the jobs themselves
    expanded again from the manifest each time they are iterated, so 100,000 of them are never in
    memory at once."""

    def __init__(self, manifest: Manifest, shard: tuple[int, int] | None, only: str | None, limit: int | None) -> None:
        self.manifest = manifest
        self._shard = shard
        self._only = only
        self._limit = limit
        if only is None:
            keys: Iterable[str] = (k for k in manifest.job_keys() if in_shard(k, shard))
        else:  # names are only known by expanding: a trial run's one extra pass
            keys = (job.key for job in self._matching())
        self._keys = array("Q", (int(key, 16) for key in itertools.islice(keys, limit)))
        if only is not None and not self._keys:
            msg = f"--only {only!r} matches no job id of {manifest.path}"
            raise UsageError(msg)
        self._key_set = frozenset(self._keys) if limit is not None else None

    def _matching(self) -> Iterator[Job]:
        for job in self.manifest.iter_jobs():
            if in_shard(job.key, self._shard) and (self._only is None or fnmatch.fnmatchcase(job.name, self._only)):
                yield job

    def __iter__(self) -> Iterator[Job]:
        jobs = self._matching()
        if self._key_set is None:
            return jobs
        # A --limit's share: the first N as counted when selected (a local image edited since changes no key
        # here, since keys are of the jobs as loaded), checked by key so the share cannot drift.
        return (job for job in itertools.islice(jobs, len(self._keys)) if int(job.key, 16) in self._key_set)

    def __len__(self) -> int:
        return len(self._keys)

    def checked(self) -> Iterator[tuple[int, Job]]:
        """(index, job) for each job, in order, each checked to be the one selected at that index.

        A run reads its jobs again for each pass (prompt files from disk): raises ManifestChangedError
        when they are not the jobs it loaded, so that a decision taken for one job never reaches another.
        """
        index = -1
        for index, job in enumerate(self):
            if index >= len(self._keys) or int(job.key, 16) != self._keys[index]:
                raise self._changed()
            yield index, job
        if index + 1 != len(self._keys):
            raise self._changed()

    def _changed(self) -> ManifestChangedError:
        msg = (
            f"the jobs of {self.manifest.path} changed while the run was reading them again (a prompt file "
            "edited during the run?): it stopped submitting. Run the same command again to go on with the jobs "
            "as they are now; nothing already sent is sent again"
        )
        return ManifestChangedError(msg)

    def keys(self) -> Iterator[str]:
        """The selected jobs' keys, in manifest order, without expanding them."""
        return (f"{packed:016x}" for packed in self._keys)


@dataclass(slots=True)
class RunOptions:
    """Everything `run_manifest` can be told; the CLI's flags map onto these."""

    output_dir: Path | None = None
    remote: RemoteOutput | None = None
    """An output on object storage (``s3://bucket/prefix`` or ``gs://bucket/prefix``, see `batcher.output.remote`): the
    run works in a local working copy and the bucket holds the journal and files; output_dir is then ignored."""
    concurrency: int = 8
    api_base: str | None = None
    token: str | None = None
    """Defaults to the environment's (see `batcher.runcomfy.tokens`); never needed with a sandbox."""
    tokens: tuple[str, ...] | None = None
    """Several accounts' tokens for one run (instead of token): each its own pace and in-flight cap."""
    sandbox: bool = False
    """Run against an in-process sandbox (no token, no network, no cost)."""
    sandbox_config: LocalApi | None = None
    """The in-process sandbox's settings (`batcher.SandboxConfig`; `batcher.run_manifest` gives the default one);
    used only with `sandbox`."""
    retry_failed: bool = False
    retry_classes: frozenset[FailureClass] = RETRYABLE
    """Which failures --retry-failed submits again (`batcher.journal.failures`): by default those another try can fix,
    never a content-policy block or an input RunComfy cannot use."""
    resubmit_uncertain: bool = False
    """Submit again the jobs whose submit may have been accepted (uncertain) or that RunComfy lost."""
    replace_rejected: bool = False
    """Submit one new generation for each image rejected in review (`batcher.review.replacements`)."""
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
    allow_output_hosts: tuple[str, ...] = ()
    """Hosts output files may come from besides RunComfy's (``*.runcomfy.net``, ``*.runcomfy.com``) and the
    API base's origin: ``cdn.example.com``, ``*.example.com`` or ``host:port`` (--allow-output-host)."""
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
    api_transport: httpx2.AsyncBaseTransport | None = None
    download_transport: httpx2.AsyncBaseTransport | None = None
    submit_timeout: httpx2.Timeout | None = None
    poll_timeout: httpx2.Timeout | None = None

    def __post_init__(self) -> None:
        try:
            OutputHosts.of("https://x.invalid", self.allow_output_hosts)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
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
