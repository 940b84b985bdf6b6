"""What a run can be told (`RunOptions`), and which of the manifest's jobs it works on (`select_jobs`).

The CLI's flags are `RunOptions`' fields, named alike, their defaults and help
texts declared here once (`batcher.flags`); library callers build one directly.
A bad value (or an unknown name) is a UsageError here, before anything is opened.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2

from ..errors import ManifestChangedError, ManifestError, Problem, UsageError
from ..flags import Flag, closest, flag_of, flagged
from ..journal.failures import RETRYABLE
from ..lifecycle import FailureClass
from ..manifest.loader import Job, Manifest, RunBlock, in_shard
from ..manifest.problems import did_you_mean
from ..net.policy import OutputHosts
from ..output.download import DEFAULT_MAX_BYTES
from ..output.folders import parse_shard
from ..runcomfy.client import DEFAULT_MAX_ANSWER_BYTES, RetryPolicy
from .endpoint import LocalApi
from .scheduler import is_auto, shard_from_scheduler

if TYPE_CHECKING:
    from ..output.storage.bucket import RemoteOutput

__all__ = [
    "CONFIRM_ABOVE",
    "FLAGS_ONLY",
    "NOTIFY",
    "RENAMED",
    "RUN_SETTINGS",
    "JobSelection",
    "RunOptions",
    "RunSettings",
    "check_option_names",
    "run_settings",
    "select_jobs",
    "settings_used",
]


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


RENAMED = {
    "poll_min": "poll_interval",
    "run_timeout": "timeout",
    "download_deadline": "download_timeout",
}
"""Fields renamed to match their flags (``--poll-interval``, ``--timeout``, ``--download-timeout``)."""


def check_option_names(names: Iterable[str]) -> None:
    """Raises UsageError naming each of ``names`` that is no `RunOptions` field, with the likely one meant."""
    known = [f.name for f in fields(RunOptions)]
    unknown = sorted(set(names) - set(known))
    if unknown:
        msg = f"unknown run option(s): {', '.join(closest(name, known, RENAMED) for name in unknown)}"
        raise UsageError(msg)


@dataclass(slots=True)
class RunOptions:
    """Everything `run_manifest` can be told, each field named as its flag of `batcher run` (``--poll-interval``
    is ``poll_interval``). The flags' defaults and help texts are these fields' (`batcher.flags`)."""

    output_dir: Path | None = None
    remote: RemoteOutput | None = None
    """An output on object storage (``s3://bucket/prefix`` or ``gs://bucket/prefix``, see `batcher.output.remote`): the
    run works in a local working copy and the bucket holds the journal and files; output_dir is then ignored."""
    concurrency: int = flagged(8, "-c", "--concurrency", help="Jobs in flight at once.", minimum=1, maximum=1024)
    api_base: str | None = flagged(
        None,
        "--api-base",
        kind=str,
        envvar="RUNCOMFY_API_BASE",
        help="RunComfy API base URL (env RUNCOMFY_API_BASE) [default: https://model-api.runcomfy.net].",
    )
    token: str | None = None
    """Defaults to the environment's (see `batcher.runcomfy.tokens`); never needed with a sandbox."""
    tokens: tuple[str, ...] | None = None
    """Several accounts' tokens for one run (instead of token): each its own pace and in-flight cap."""
    sandbox: bool = flagged(
        False, "--sandbox", help="Run against a local, in-process RunComfy sandbox: no token, no network, no cost."
    )
    sandbox_config: LocalApi | None = None
    """The in-process sandbox's settings (`batcher.SandboxConfig`; `batcher.run_manifest` gives the default one);
    used only with `sandbox`."""
    retry_failed: bool = flagged(
        False,
        "--retry-failed",
        help="Submit again the jobs that failed or were cancelled: alone, the retryable ones (model errors, "
        "timeouts, cancellations, unknown); =all, or =a comma-separated list of classes "
        "(content_policy, invalid_input, model_error, timeout, cancelled, unknown).",
    )
    retry_classes: frozenset[FailureClass] = RETRYABLE
    """Which failures --retry-failed submits again (`batcher.journal.failures`): by default those another try can fix,
    never a content-policy block or an input RunComfy cannot use."""
    resubmit_uncertain: bool = flagged(
        False,
        "--resubmit-uncertain",
        help="Submit again the jobs whose earlier submit may have been accepted, or that RunComfy lost (may pay twice).",
    )
    replace_rejected: bool = flagged(
        False,
        "--replace-rejected",
        help="Submit one new generation for each image rejected in `batcher review` (each is paid once).",
    )
    over_balance: bool = flagged(
        False, "--over-balance", help="Start even when the jobs to submit are estimated over the account's balance."
    )
    live_prices: bool = True
    """Ask RunComfy for the balance and each model's live price before the first submit."""
    new_output: bool = flagged(
        False,
        "--new-output",
        help="Submit even the jobs another output folder already submitted (pays for them again).",
    )
    lost_after: float = flagged(
        300.0,
        "--lost-after",
        minimum=0,
        help="Seconds after its submit that a request RunComfy does not know (404001) counts as lost, not lagging "
        "(before, it is asked again: a replica may not have seen it yet).",
    )
    outage_timeout: float = flagged(
        900.0,
        "--outage-timeout",
        minimum=0,
        help="Seconds to wait for RunComfy to answer again once no call gets through, before the run ends.",
    )
    cancel_on_interrupt: bool = flagged(
        False, "--cancel-on-interrupt", help="On Ctrl-C, also cancel the jobs still queued at RunComfy."
    )
    poll_interval: float = flagged(
        1.0,
        "--poll-interval",
        minimum=0.05,
        help="Shortest wait between polls; it grows to --poll-max, or to what finished jobs suggest.",
    )
    poll_max: float = flagged(
        10.0, "--poll-max", minimum=0.05, help="Longest wait between polls (at least --poll-interval)."
    )
    poll_growth: float = 1.5
    queue_timeout: float | None = flagged(
        None,
        "--queue-timeout",
        kind=float,
        minimum=1,
        help="Cancel a job that stays queued longer than this many seconds.",
    )
    job_timeout: float | None = flagged(
        None,
        "--job-timeout",
        kind=float,
        minimum=1,
        help="Stop waiting for a job running longer than this many seconds (it stays resumable).",
    )
    timeout: float | None = flagged(
        None,
        "--timeout",
        kind=float,
        minimum=1,
        help="Stop the whole run after this many seconds (resume later).",
    )
    rate: float | None = flagged(
        None,
        "--rate",
        kind=float,
        minimum=0.01,
        help="At most this many API requests a second, across all jobs [default: no limit].",
    )
    limit: int | None = flagged(
        None, "--limit", kind=int, minimum=1, help="Trial run: only the first N jobs (after --only), in manifest order."
    )
    shard: tuple[int, int] | None = flagged(
        None,
        "--shard",
        kind=str,
        metavar="K/N",
        help="Only the K-th of N slices of the jobs (by identity), in output/<name>/shard-K-of-N/ "
        "(shard-K-of-N/ below an s3:// or gs:// output). 'auto' (or auto/N) reads a Kubernetes Indexed Job's or a "
        "Slurm array's variables.",
    )
    """``(K, N)``, or ``"K/N"`` / ``"auto"`` as the flag takes them; its own output folder."""
    only: str | None = flagged(
        None,
        "--only",
        kind=str,
        metavar="PATTERN",
        help="Trial run: only jobs whose id matches this shell pattern (london-*).",
    )
    max_cost: float | None = flagged(
        None,
        "--max-cost",
        kind=float,
        minimum=0,
        help="Stop submitting before the estimated cost of this manifest's submits (all runs, earlier ones "
        "included) passes this many dollars.",
    )
    max_download_bytes: int = flagged(
        DEFAULT_MAX_BYTES, "--max-download-bytes", minimum=1, help="Refuse output files larger than this."
    )
    allow_output_hosts: tuple[str, ...] = flagged(
        (),
        "--allow-output-host",
        kind=str,
        multiple=True,
        metavar="HOST",
        help="Also download output files from HOST (cdn.example.com, *.example.com, host:port); repeatable "
        "[default: RunComfy's *.runcomfy.net and *.runcomfy.com, and the API base's origin].",
    )
    max_answer_bytes: int = flagged(
        DEFAULT_MAX_ANSWER_BYTES,
        "--max-answer-bytes",
        minimum=1024,
        help="The largest API answer read (past it, a submit is held as uncertain and a poll retried).",
    )
    download_timeout: float | None = flagged(
        None,
        "--download-timeout",
        kind=float,
        minimum=1,
        help="Seconds one output file may take in all, retries and redirects included [default: 300, more for "
        "a larger --max-download-bytes].",
        show_default=False,
    )
    read_timeout: float | None = flagged(
        None,
        "--read-timeout",
        kind=float,
        minimum=0.1,
        help="Seconds to wait for an answer [default: 90 for submits, 20 for polls].",
        show_default=False,
    )
    """Sets submit_timeout and poll_timeout (10 s to connect) where they are not given."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    download_backoff: float = 0.5
    fsync_interval: float = 0.2
    from_manifest: tuple[str, ...] = ()
    """The settings this run took from the manifest's ``run:`` block (`run_settings`): the journal says so."""
    handle_signals: bool = False
    """Install SIGINT/SIGTERM handlers (the CLI does; library callers usually should not)."""
    api_transport: httpx2.AsyncBaseTransport | None = None
    download_transport: httpx2.AsyncBaseTransport | None = None
    submit_timeout: httpx2.Timeout | None = None
    poll_timeout: httpx2.Timeout | None = None

    def __new__(cls, *_args: Any, **names: Any) -> RunOptions:
        # Before the generated __init__ sees them: an unknown name gets a hint, not a bare TypeError.
        check_option_names(names)
        return object.__new__(cls)

    def __post_init__(self) -> None:
        try:
            OutputHosts.of("https://x.invalid", self.allow_output_hosts)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        if not isinstance(self.sandbox, bool):
            msg = "RunOptions.sandbox is True or False; put a SandboxConfig in sandbox_config"
            raise UsageError(msg)
        if isinstance(self.shard, str):
            self.shard = _parse_shard(self.shard)
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
        self.poll_max = max(self.poll_max, self.poll_interval)
        if self.read_timeout is not None:
            read = httpx2.Timeout(self.read_timeout, connect=10.0)
            self.submit_timeout = self.submit_timeout or read
            self.poll_timeout = self.poll_timeout or read


def _parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"``, ``"auto"`` or ``"auto/4"`` as `--shard` takes them."""
    if is_auto(text):
        found = shard_from_scheduler(text)
        return found.part, found.shards
    return parse_shard(text)


CONFIRM_ABOVE = Flag(
    ("--confirm-above",),
    "On a terminal, ask before submitting jobs estimated above this many dollars.",
    kind=float,
    minimum=0,
)
"""`batcher run --confirm-above`: the CLI's own (a library caller decides in its on_plan)."""
CONFIRM_ABOVE_DEFAULT = 5.0
NOTIFY = Flag(
    ("--notify",),
    "When the run ends, POST its summary as JSON to URL (a Slack or ntfy webhook, or your own).",
    kind=str,
    metavar="URL",
)
"""`batcher run --notify`: the CLI's own."""

_FROM_RUN_OPTIONS = (
    "concurrency",
    "max_cost",
    "rate",
    "poll_interval",
    "poll_max",
    "queue_timeout",
    "job_timeout",
    "timeout",
    "lost_after",
    "outage_timeout",
    "read_timeout",
    "download_timeout",
    "max_download_bytes",
    "max_answer_bytes",
    "cancel_on_interrupt",
)
RUN_SETTINGS: dict[str, tuple[Flag, Any]] = {
    **{name: flag_of(RunOptions, name) for name in _FROM_RUN_OPTIONS},
    "retries": flag_of(RetryPolicy, "attempts"),
    "confirm_above": (CONFIRM_ABOVE, CONFIRM_ABOVE_DEFAULT),
    "notify": (NOTIFY, None),
}
"""What a manifest's ``run:`` block may set, each as its flag of `batcher run` (named as the flag, ``max_cost`` for
``--max-cost``), with that flag's type, range and default. A flag given on the command line wins."""

FLAGS_ONLY: dict[str, str] = {
    "resubmit_uncertain": "it may pay twice for a job",
    "new_output": "it pays again for jobs another output folder submitted",
    "over_balance": "it spends past the account's balance",
    "retry_failed": "it pays again for failed jobs",
    "replace_rejected": "it pays for new generations",
    "api_base": "it sends your token to the host it names",
    "yes": "it skips the question before spending",
}
"""Flags a manifest may not set, and why: a manifest can come from someone else's repository, and these spend
money (or send the token) that the person running it has not agreed to."""


@dataclass(frozen=True, slots=True)
class RunSettings:
    """A manifest's ``run:`` settings, checked: the values (by `RUN_SETTINGS` name) and where each is written."""

    values: dict[str, Any] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    """``m.yaml:4`` for each name."""


def run_settings(manifest: Manifest) -> RunSettings:
    """The manifest's ``run:`` block, checked against the flags it stands for.

    Raises ManifestError listing every problem (file:line, with a did-you-mean): an unknown name, a value of the
    wrong type or out of the flag's range, or a flag that stays on the command line (`FLAGS_ONLY`)."""
    block: RunBlock = manifest.run
    problems: list[Problem] = []
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    for name, value in block.values.items():
        line = block.lines.get(name)
        field_name = f"run.{name}"
        key = name.replace("-", "_")
        if key in FLAGS_ONLY:
            spelled = "--" + key.replace("_", "-")
            problems.append(
                Problem(
                    block.file,
                    line,
                    field_name,
                    f"{spelled} is a command-line flag only: {FLAGS_ONLY[key]}, and a manifest may come from "
                    f"someone else's repository. Give {spelled} to batcher run when you mean it",
                )
            )
            continue
        if key not in RUN_SETTINGS:
            hint = did_you_mean(key, [*RUN_SETTINGS, *FLAGS_ONLY])
            if not hint and key in RENAMED:
                hint = f" (did you mean {RENAMED[key]!r}?)"
            problems.append(
                Problem(
                    block.file,
                    line,
                    field_name,
                    f"unknown run setting{hint}; a run: block takes: {', '.join(RUN_SETTINGS)}",
                )
            )
            continue
        flag, default = RUN_SETTINGS[key]
        wrong = _wrong_value(flag, default, value)
        if wrong:
            problems.append(Problem(block.file, line, field_name, wrong))
            continue
        values[key] = float(value) if (flag.kind or type(default)) is float and value is not None else value
        where[key] = f"{block.file}:{line}" if line is not None else block.file
    if problems:
        raise ManifestError(problems)
    return RunSettings(values, where)


def settings_used(options: RunOptions) -> dict[str, Any]:
    """The run settings a run used, for its journal's ``run`` header: each `RUN_SETTINGS` value a `RunOptions`
    holds (``notify`` is left out: a webhook's URL is its secret), and which came from the manifest."""
    used: dict[str, Any] = {name: getattr(options, name) for name in _FROM_RUN_OPTIONS}
    used["retries"] = options.retry.attempts
    return {**used, "from_manifest": list(options.from_manifest)}


def _wrong_value(flag: Flag, default: Any, value: object) -> str | None:
    """Why value cannot stand for flag (its type and range as the command line takes them), or None."""
    kind = flag.kind or type(default)
    if value is None:
        return None if default is None else f"expected a value ({flag.names[-1]} has no 'none')"
    if kind is bool:
        ok = isinstance(value, bool)
        wanted = "true or false"
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        wanted = "a whole number"
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        wanted = "a number"
    else:
        ok = isinstance(value, str) and bool(value)
        wanted = "a text"
    if not ok:
        return f"expected {wanted}, got {value!r}"[:200]
    if isinstance(value, int | float) and not isinstance(value, bool):
        if flag.minimum is not None and value < flag.minimum:
            return f"expected at least {flag.minimum:g}, got {value!r}"
        if flag.maximum is not None and value > flag.maximum:
            return f"expected at most {flag.maximum:g}, got {value!r}"
    return None
