"""The ``batcher`` command: a thin layer over the library.

Library errors become messages and exit codes here and nowhere else:
0 all jobs done, 1 some failed or are held as uncertain, 2 bad input
(manifest, schema, flags, token), 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import click
import httpx2
from rich.console import Console
from rich.live import Live
from rich.table import Table

from .._version import __version__
from ..api import cancel_manifest, run_manifest
from ..engine.progress import ProgressView, RunProgress, plain_progress_line
from ..engine.runner import RunOptions, RunPlan, RunSummary
from ..engine.scheduler import is_auto, shard_from_scheduler
from ..errors import (
    AuthError,
    BatcherError,
    JournalCorruptError,
    JournalLockedError,
    ManifestError,
    UsageError,
)
from ..journal.failures import RETRYABLE, parse_retry_classes
from ..journal.store import JOURNAL_NAME, FoldedJournal
from ..manifest.cost import load_price_table
from ..manifest.loader import Manifest, load_manifest
from ..manifest.preflight import check_urls, input_urls
from ..manifest.schema import available_models, load_model_schema
from ..net.policy import loopback_origin
from ..output.dataset import METADATA_NAME, write_metadata
from ..output.download import DEFAULT_MAX_BYTES
from ..output.folders import (
    default_output_dir,
    parse_shard,
    read_folder,
    refuse_linked_default,
    rehearsal_only,
    shard_folders,
)
from ..output.ledger import noted_buckets, noted_folders
from ..output.remote import StoredFiles, pull_view
from ..output.storage import RemoteOutput, open_bucket, parse_output, upload
from ..printable import printable
from ..reports.export import DEFAULT_SHARD_SIZE, FORMATS, ExportFormat, export_dataset
from ..reports.gallery import GALLERY_NAME, write_gallery
from ..reports.notify import error_payload, notify_url, send, summary_payload
from ..reports.report import print_plan, print_status, print_summary, status_report
from ..review.replacements import with_replacements
from ..review.server import DEFAULT_PORT, ReviewServer
from ..runcomfy.account import look_up, read_balances
from ..runcomfy.client import DEFAULT_MAX_ANSWER_BYTES, RetryPolicy, api_base_from_env
from ..runcomfy.tokens import TOKEN_FILE_ENV, TOKENS_ENV, fingerprint, tokens_from_env
from ..sandbox.server import DIALECTS, FAULT_KINDS, REFUSALS, Sandbox, SandboxConfig

__all__ = ["cli", "main"]

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

_BAD_INPUT = (ManifestError, UsageError, AuthError, JournalLockedError, JournalCorruptError)

# soft_wrap: long lines stay whole in logs and pipes; terminals wrap them anyway.
stderr = Console(stderr=True, highlight=False, soft_wrap=True)
stdout = Console(highlight=False)


class _Failed(click.ClickException):
    """A library error on its way to the terminal: some work could not be done."""

    exit_code = EXIT_FAILED

    def show(self, file: Any = None) -> None:
        click.echo(f"batcher: {self.format_message()}", err=True)


class _BadInput(_Failed):
    """The manifest, a flag, the token or the journal needs fixing."""

    exit_code = EXIT_BAD_INPUT


class _Group(click.Group):
    """Turns BatcherError into a message and an exit code, in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _BAD_INPUT as exc:
            raise _BadInput(str(exc)) from exc
        except BatcherError as exc:
            raise _Failed(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo("batcher: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="batcher")
def cli() -> None:
    """Run large, resumable batches of image generations on RunComfy's Model API.

    Write a YAML manifest, then `batcher run MANIFEST`; run it again after any
    stop to resume. Try `batcher run manifests/london.yaml --sandbox` first.
    """


def _manifest_argument(function: Callable[..., Any]) -> Callable[..., Any]:
    from ..manifest.loader import MAX_JOBS, set_max_jobs

    def cap_jobs(ctx: click.Context, _param: click.Parameter, value: int | None) -> None:
        # Not a parameter of every command: load_manifest reads the cap, and it ends with the command.
        if value is not None:
            ctx.call_on_close(set_max_jobs(value))

    function = _schemas_option(
        "Folder of model schemas (<model id>.input.json), searched before the bundled ones; repeatable."
    )(function)
    function = click.option(
        "--max-jobs",
        type=click.IntRange(min=1),
        metavar="N",
        envvar="BATCHER_MAX_JOBS",
        expose_value=False,
        callback=cap_jobs,
        help=f"Refuse a manifest that expands to more than N jobs (default {MAX_JOBS:,}). Env BATCHER_MAX_JOBS.",
    )(function)
    return click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False))(function)


def _schemas_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--schemas",
        "schema_dirs",
        multiple=True,
        type=click.Path(path_type=Path, file_okay=False, exists=True),
        envvar="BATCHER_SCHEMAS",
        help=help_text + " Env BATCHER_SCHEMAS.",
    )


def _shard_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--shard",
        metavar="K/N",
        callback=lambda _ctx, _param, value: None if value is None else _parse_shard(value),
        help="Only the K-th of N slices of the jobs (by identity), in output/<name>/shard-K-of-N/ "
        "(shard-K-of-N/ below an s3:// or gs:// output). 'auto' (or auto/N) reads a Kubernetes Indexed Job's or a Slurm "
        "array's variables.",
    )(function)


def _parse_shard(value: str) -> tuple[int, int]:
    try:
        if is_auto(value):
            found = shard_from_scheduler(value)
            click.echo(f"batcher: shard {found.part}/{found.shards}, from {found.source}", err=True)
            return found.part, found.shards
        return parse_shard(value)
    except UsageError as exc:
        raise click.BadParameter(str(exc).removeprefix("--shard ")) from exc


def _parse_output(value: str | None) -> Path | RemoteOutput | None:
    if value is None:
        return None
    try:
        remote = parse_output(value)
    except UsageError as exc:
        raise click.BadParameter(str(exc).removeprefix("--output ")) from exc
    return remote if remote is not None else Path(value.removeprefix("file://"))


def _output_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "-o",
        "--output",
        callback=lambda _ctx, _param, value: _parse_output(value),
        help="Output folder holding the journal and images, or s3://bucket/prefix or gs://bucket/prefix "
        "(journal and images in the bucket; credentials where the AWS CLI or gcloud's application-default "
        "login finds them) [default: output/<manifest name>/ in the manifest's project (the folder above it holding .git), whatever the current folder; "
        "output/sandbox/<manifest name>/ with --sandbox].",
    )(function)


def _sandbox_folder_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--sandbox", is_flag=True, help="The sandbox rehearsal's folder (output/sandbox/<name>/) by default."
    )(function)


def _api_base_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--api-base",
        envvar="RUNCOMFY_API_BASE",
        help="RunComfy API base URL (env RUNCOMFY_API_BASE) [default: https://model-api.runcomfy.net].",
    )(function)


def _setup_logging(verbosity: int, quiet: bool) -> None:
    """Warnings (errors only with quiet); from ``-v`` (1) batcher's own lines too, one per API call; from
    ``-vv`` (2) httpx2's and httpcore2's. A bool counts as 0 or 1: ``-v`` as a flag. The token is in none."""
    logging.basicConfig(
        level=logging.ERROR if quiet else logging.WARNING, format="batcher: %(message)s", stream=sys.stderr, force=True
    )
    logging.getLogger("batcher").setLevel(logging.DEBUG if verbosity >= 1 else logging.NOTSET)
    for library in ("httpx2", "httpcore2"):
        logging.getLogger(library).setLevel(logging.DEBUG if verbosity >= 2 else logging.NOTSET)


STARTER_MANIFEST = """\
# A batcher manifest: what to generate. Keep it in git; run it with
#   batcher validate {name}    # every problem at once, no network
#   batcher plan {name}        # the jobs and what they will cost
#   batcher run {name} --sandbox   # a rehearsal: no token, no cost
#   batcher run {name}         # for real (RUNCOMFY_API_TOKEN set); run again to resume
# Editors complete keys with batcher's schemas/manifest.schema.json: add a first line
#   # yaml-language-server: $schema=<path to it>
model: openai/gpt-image-1-5/image-to-image

# Merged into every job; a job's own fields win.
defaults:
  quality: low              # low | medium | high (see `batcher plan` for prices)
  image_size: 1024x1024     # auto | 1024x1024 | 1536x1024 | 1024x1536
  output_format: png        # png | jpeg | webp
  image_urls:               # 1-10 public https URLs the service can fetch
    - https://playgrounds-storage-public.runcomfy.net/tools/7286/media-files/input-1-1.jpg

jobs:
  - id: first-try           # optional: the job's name and output folder
    prompt: The same scene at golden hour, warm light, long shadows.
  - id: night
    prompt: The same scene at night, lit by street lamps, light rain.
    quality: medium
    repeat: 2               # independent generations: night-1, night-2

  # One job per combination; {{name}} placeholders are filled from it.
  # - id: "shot-{{season}}-{{quality}}"
  #   prompt: The same scene in {{season}}.
  #   matrix:
  #     season: [spring, winter]
  #     quality: [low, medium]     # a name that is an input field sets it
  #     exclude: [{{season: winter, quality: low}}]

  # One job per row of a CSV (header row; columns are fields or placeholders)
  # or JSONL file, relative to this manifest:
  # - from: prompts.csv
"""


@cli.command()
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False), default="manifest.yaml")
def init(path: Path) -> None:
    """Write a commented starter manifest to PATH [default: manifest.yaml]."""
    if path.exists():
        raise _BadInput(f"{path} already exists; choose another name or remove it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(STARTER_MANIFEST.format(name=path), encoding="utf-8")
    except OSError as exc:
        raise _BadInput(f"cannot write {path}: {exc.strerror or exc}") from exc
    click.echo(f"wrote {path}; next: batcher plan {path}")


@cli.command()
@_manifest_argument
@click.option(
    "--check-urls",
    is_flag=True,
    help="Also fetch the headers of every distinct input image URL: reachable, an image, within 50 MB.",
)
@click.option("-c", "--concurrency", default=8, show_default=True, type=click.IntRange(1, 64), help="URLs at once.")
def validate(manifest: Path, schema_dirs: tuple[Path, ...], check_urls: bool, concurrency: int) -> None:
    """Check MANIFEST against the model's schema; list every problem. No network unless --check-urls."""
    loaded = load_manifest(manifest, schema_dirs)
    click.echo(f"{manifest}: {loaded.count} jobs for {', '.join(loaded.models)}, all valid")
    if check_urls:
        _check_input_urls(loaded, concurrency)


def _check_input_urls(manifest: Manifest, concurrency: int) -> None:
    schemas = {model: load_model_schema(model, manifest.schema_dirs) for model in manifest.models}
    checks = input_urls(manifest.iter_jobs(), schemas)
    click.echo(f"checking {len(checks)} distinct input URL(s)...")
    anyio.run(lambda: check_urls(checks.values(), concurrency=concurrency))
    bad = [check for check in checks.values() if check.problem]
    for check in bad:
        more = f" and {check.uses - len(check.origins)} more" if check.uses > len(check.origins) else ""
        click.echo(f"{check.url}: {check.problem}", err=True)
        click.echo(f"  used by {check.uses} job(s) at {', '.join(check.origins)}{more}", err=True)
    if bad:
        raise _BadInput(f"{len(bad)} of {len(checks)} input URL(s) cannot be used; fix them before running")
    click.echo(f"all {len(checks)} input URL(s) serve images within RunComfy's 50 MB limit")


def _point_at_noted_folders(manifest: Manifest, looked_in: Path) -> None:
    """No journal where we looked: say where this manifest's runs are, if the ledger knows."""
    others = [folder for folder in noted_folders(manifest) if folder != looked_in.resolve()]
    rehearsal = default_output_dir(manifest, sandbox=True).resolve()
    if rehearsal in others:
        click.echo(f"no journal in {looked_in}; the sandbox rehearsal's is in {rehearsal}: add --sandbox", err=True)
        others.remove(rehearsal)
    places = [str(folder) for folder in others] + [bucket.url for bucket in noted_buckets(manifest)]
    if places:
        shown = ", ".join(places[:5])
        click.echo(f"no journal in {looked_in}; this manifest has runs in: {shown} (use -o)", err=True)


def _load_slice(
    manifest: Path,
    schema_dirs: tuple[Path, ...],
    output: Path | RemoteOutput | None,
    shard: tuple[int, int] | None,
    sandbox: bool = False,
) -> tuple[Manifest, Path]:
    """The manifest (or one shard of it) and its output folder."""
    loaded = load_manifest(manifest, schema_dirs)
    if shard:
        loaded = loaded.only_shard(*shard)
    if isinstance(output, RemoteOutput):
        return loaded, pull_view(output, journals_only=True)[0]  # every shard's journal, read from the bucket
    return loaded, output or default_output_dir(loaded, shard, sandbox=sandbox)


@cli.command()
@_manifest_argument
@_output_option
@_shard_option
@_sandbox_folder_option
@_api_base_option
@click.option("--offline", is_flag=True, help="Do not ask RunComfy for the balance and live price.")
@click.option(
    "--replace-rejected",
    is_flag=True,
    help="Plan as `run --replace-rejected` would: a new generation for each image rejected in review.",
)
def plan(
    manifest: Path,
    schema_dirs: tuple[Path, ...],
    output: Path | RemoteOutput | None,
    shard: tuple[int, int] | None,
    sandbox: bool,
    api_base: str | None,
    offline: bool,
    replace_rejected: bool,
) -> None:
    """Show the expanded jobs, what is left to do and its estimated cost.

    With a token set (RUNCOMFY_API_TOKEN, _TOKENS or _TOKEN_FILE; not --offline) it first asks RunComfy for
    each account's balance and the model's live price (a few seconds at most);
    otherwise no network. Shard folders (shard-K-of-N/) inside the output
    folder are summed in.
    """
    loaded, output_dir = _load_slice(manifest, schema_dirs, output, shard, sandbox)
    balances: list[tuple[str, float | None]] = []
    given = any(os.environ.get(name, "").strip() for name in ("RUNCOMFY_API_TOKEN", TOKENS_ENV, TOKEN_FILE_ENV))
    headers = read_folder(output_dir).headers
    journalled = headers[-1].get("api_base") if headers else None
    if api_base is None and isinstance(journalled, str):
        if journalled.rstrip("/") == api_base_from_env(None).rstrip("/") or loopback_origin(journalled):
            api_base = journalled  # the API this folder's runs talked to, not the default
        else:
            # A journal is a file anyone could have committed: the token goes to no host it names.
            click.echo(
                f"note: this folder's runs used {printable(journalled, 200)}; give --api-base to ask it for "
                "prices and balances with your token (not asked)",
                err=True,
            )
            offline = True
    if given and not offline and not sandbox and not rehearsal_only(headers):
        tokens = tokens_from_env()
        if output is None:
            refuse_linked_default(output_dir, loaded)
        output_dir.mkdir(parents=True, exist_ok=True)  # the live price is kept there, for status and run
        base = api_base_from_env(api_base)
        account = anyio.run(lambda: look_up(base, tokens[0], loaded.models, output_dir, schema_dirs=loaded.schema_dirs))
        for line in account.said:
            click.echo(f"price: {line}", err=True)
        # The other accounts' balances together: one by one, each slow answer added up over the accounts.
        others = anyio.run(lambda: read_balances(base, tokens[1:]))
        balances = [
            (fingerprint(token), balance) for token, balance in zip(tokens, [account.balance, *others], strict=True)
        ]
    print_plan(stdout, loaded, output_dir, replace_rejected=replace_rejected)
    for account_name, balance in balances:
        if balance is not None:
            named = f" {account_name}" if len(balances) > 1 else ""
            stdout.print(f"account{named} balance: ${balance:,.2f}")
    if not (output_dir / JOURNAL_NAME).is_file() and not shard_folders(output_dir):
        _point_at_noted_folders(loaded, output_dir)


@cli.command()
@_manifest_argument
@_output_option
@_sandbox_folder_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def status(
    manifest: Path, schema_dirs: tuple[Path, ...], output: Path | RemoteOutput | None, sandbox: bool, as_json: bool
) -> None:
    """Where every job stands, from the journal. Works during a run. No network but an s3:// or gs:// output's bucket.

    Shard folders (shard-K-of-N/) inside the output folder are summed in.
    """
    loaded = load_manifest(manifest, schema_dirs)
    if isinstance(output, RemoteOutput):
        output_dir, listing = pull_view(output)
        with StoredFiles(output_dir, listing) as files:
            report = status_report(loaded, output_dir, files=files)
    else:
        output_dir = output or default_output_dir(loaded, sandbox=sandbox)
        report = status_report(loaded, output_dir)
    if not report.journals:
        _point_at_noted_folders(loaded, output_dir)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        print_status(stdout, report)


@cli.command()
@_manifest_argument
@_output_option
@click.option(
    "-c", "--concurrency", default=8, show_default=True, type=click.IntRange(1, 1024), help="Jobs in flight at once."
)
@_api_base_option
@click.option(
    "--sandbox", is_flag=True, help="Run against a local, in-process RunComfy sandbox: no token, no network, no cost."
)
@click.option(
    "--retry-failed",
    is_flag=False,
    flag_value="retryable",
    default=None,
    metavar="[=CLASSES]",
    help="Submit again the jobs that failed or were cancelled: alone, the retryable ones (model errors, "
    "timeouts, cancellations, unknown); =all, or =a comma-separated list of classes "
    "(content_policy, invalid_input, model_error, timeout, cancelled, unknown).",
)
@click.option(
    "--resubmit-uncertain",
    is_flag=True,
    help="Submit again the jobs whose earlier submit may have been accepted (may pay twice).",
)
@click.option(
    "--replace-rejected",
    is_flag=True,
    help="Submit one new generation for each image rejected in `batcher review` (each is paid once).",
)
@click.option(
    "--notify",
    metavar="URL",
    help="When the run ends, POST its summary as JSON to URL (a Slack or ntfy webhook, or your own). "
    "Default: $BATCHER_NOTIFY_URL.",
)
@click.option(
    "--notify-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Read the --notify URL from this file (its first line), out of sight of ps and shell history.",
)
@click.option(
    "--new-output",
    is_flag=True,
    help="Submit even the jobs another output folder already submitted (pays for them again).",
)
@click.option(
    "--lost-after",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds after its submit that a request RunComfy does not know (404001) counts as lost, not lagging.",
)
@click.option(
    "--outage-timeout",
    default=900.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to wait for RunComfy to answer again once no call gets through, before the run ends.",
)
@click.option(
    "--over-balance", is_flag=True, help="Start even when the jobs to submit are estimated over the account's balance."
)
@click.option("-y", "--yes", is_flag=True, help="Do not ask before spending more than --confirm-above.")
@click.option(
    "--confirm-above",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="On a terminal, ask before submitting jobs estimated above this many dollars.",
)
@click.option("--cancel-on-interrupt", is_flag=True, help="On Ctrl-C, also cancel the jobs still queued at RunComfy.")
@click.option("--limit", type=click.IntRange(min=1), help="Trial run: only the first N jobs, in manifest order.")
@click.option("--only", metavar="PATTERN", help="Trial run: only jobs whose id matches this pattern (london-*).")
@_shard_option
@click.option(
    "--max-cost",
    type=click.FloatRange(min=0),
    help="Stop submitting before the estimated cost of this manifest's submits (all runs) passes this many dollars.",
)
@click.option(
    "--rate", type=click.FloatRange(min=0.01), help="At most this many API requests a second, across all jobs."
)
@click.option(
    "--queue-timeout",
    type=click.FloatRange(min=1),
    help="Cancel a job that stays queued longer than this many seconds.",
)
@click.option(
    "--job-timeout",
    type=click.FloatRange(min=1),
    help="Stop waiting for a job running longer than this (it resumes next run).",
)
@click.option(
    "--timeout",
    "run_timeout",
    type=click.FloatRange(min=1),
    help="Stop the whole run after this many seconds (resume later).",
)
@click.option(
    "--poll-interval",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.05),
    help="Shortest wait between polls; it grows to --poll-max, or to what finished jobs suggest.",
)
@click.option(
    "--poll-max", default=10.0, show_default=True, type=click.FloatRange(min=0.05), help="Longest wait between polls."
)
@click.option(
    "--retries",
    default=6,
    show_default=True,
    type=click.IntRange(1, 20),
    help="Attempts per API call on 429, 5xx and connection faults (backoff with jitter between them).",
)
@click.option(
    "--read-timeout",
    type=click.FloatRange(min=0.1),
    help="Seconds to wait for an answer [default: 90 for submits, 20 for polls].",
)
@click.option(
    "--max-download-bytes",
    default=DEFAULT_MAX_BYTES,
    show_default=True,
    type=click.IntRange(min=1),
    help="Refuse output files larger than this.",
)
@click.option(
    "--max-answer-bytes",
    default=DEFAULT_MAX_ANSWER_BYTES,
    show_default=True,
    type=click.IntRange(min=1024),
    help="The largest API answer read (past it, a submit is held as uncertain and a poll retried).",
)
@click.option(
    "--download-timeout",
    type=click.FloatRange(min=1),
    help="Seconds one output file may take in all, retries included [default: 300, more for a larger "
    "--max-download-bytes].",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress display; errors and the summary only.")
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="-v: one log line per API call (call, model or request id, HTTP status, time); -vv: the HTTP library's too.",
)
def run(
    manifest: Path,
    schema_dirs: tuple[Path, ...],
    output: Path | RemoteOutput | None,
    concurrency: int,
    api_base: str | None,
    sandbox: bool,
    retry_failed: str | None,
    resubmit_uncertain: bool,
    replace_rejected: bool,
    notify: str | None,
    notify_file: Path | None,
    new_output: bool,
    lost_after: float,
    outage_timeout: float,
    over_balance: bool,
    yes: bool,
    confirm_above: float,
    cancel_on_interrupt: bool,
    limit: int | None,
    only: str | None,
    shard: tuple[int, int] | None,
    max_cost: float | None,
    rate: float | None,
    queue_timeout: float | None,
    job_timeout: float | None,
    run_timeout: float | None,
    poll_interval: float,
    poll_max: float,
    retries: int,
    read_timeout: float | None,
    max_download_bytes: int,
    max_answer_bytes: int,
    download_timeout: float | None,
    quiet: bool,
    verbose: int,
) -> None:
    """Run MANIFEST, or resume it: nothing already submitted is sent again.

    Ctrl-C once stops submitting and finishes the jobs already paid for;
    twice (or SIGTERM once) stops at once. The command printed at the end resumes.
    """
    _setup_logging(verbose, quiet)
    notify = notify_url(notify, notify_file)
    loaded = load_manifest(manifest, schema_dirs)
    options = RunOptions(
        output_dir=output if isinstance(output, Path) else None,
        remote=output if isinstance(output, RemoteOutput) else None,
        concurrency=concurrency,
        api_base=api_base,
        sandbox=sandbox,
        sandbox_config=SandboxConfig(schema_dirs=loaded.schema_dirs) if sandbox else None,
        retry_failed=retry_failed is not None,
        retry_classes=parse_retry_classes(retry_failed) if retry_failed is not None else RETRYABLE,
        resubmit_uncertain=resubmit_uncertain,
        replace_rejected=replace_rejected,
        new_output=new_output,
        over_balance=over_balance,
        lost_after=lost_after,
        outage_timeout=outage_timeout,
        cancel_on_interrupt=cancel_on_interrupt,
        rate=rate,
        limit=limit,
        only=only,
        shard=shard,
        max_cost=max_cost,
        queue_timeout=queue_timeout,
        job_timeout=job_timeout,
        run_timeout=run_timeout,
        poll_min=poll_interval,
        poll_max=max(poll_max, poll_interval),
        max_download_bytes=max_download_bytes,
        download_deadline=download_timeout,
        max_answer_bytes=max_answer_bytes,
        retry=RetryPolicy(attempts=retries),
        submit_timeout=httpx2.Timeout(read_timeout, connect=10.0) if read_timeout else None,
        poll_timeout=httpx2.Timeout(read_timeout, connect=10.0) if read_timeout else None,
        handle_signals=True,
    )
    if sandbox:
        stderr.print("[dim]sandbox: a local stand-in for RunComfy; images are test patterns and nothing is charged[/]")

    def on_plan(plan: RunPlan) -> None:
        _announce(plan, confirm_above=None if yes or sandbox else confirm_above)

    try:
        summary = _run_with_display(loaded, options, quiet, on_plan)
    except BaseException as exc:
        if notify:
            code = EXIT_BAD_INPUT if isinstance(exc, _BAD_INPUT) else EXIT_FAILED
            _notify(notify, error_payload(loaded.name, exc, code))
        raise
    resume = _resume_command(
        manifest, summary, schema_dirs, api_base, sandbox, shard, only, limit, concurrency, replace_rejected
    )
    if isinstance(output, RemoteOutput):  # the bucket, not this machine's working copy, is the run's place
        resume = resume.replace(shlex.quote(str(summary.output_dir)), shlex.quote(output.url), 1)
    print_summary(stderr, summary, resume)
    if notify:
        _notify(notify, summary_payload(loaded.name, summary))
    sys.exit(summary.exit_code)


def _notify(url: str, payload: dict[str, Any]) -> None:
    """Send the end-of-run notification; a failure is a warning, never the run's exit code."""
    failure = send(url, payload)
    if failure is not None:
        # Only the host: a webhook's path is its secret (Slack's is).
        stderr.print(f"warning: could not notify {urlsplit(url).hostname}: {failure}", markup=False)


def _announce(plan: RunPlan, confirm_above: float | None) -> None:
    """The line before the first request: what will be sent and its estimate; on a terminal, above
    confirm_above dollars, ask first (never without a terminal: a cron job must not hang)."""
    unpriced = f", +{plan.unpriced} job(s) with no price table" if plan.unpriced else ""
    if plan.sandbox:
        cost = f"sandbox: nothing is charged; a real run would cost about ${plan.estimate:,.2f}{unpriced}"
    else:
        cost = f"estimated ${plan.estimate:,.2f}{unpriced}"
    rest = [f"{plan.to_finish} already submitted to finish"] if plan.to_finish else []
    rest += [f"{plan.superseded} no longer in the manifest but paid for, to finish"] if plan.superseded else []
    rest += [f"{plan.held} held"] if plan.held else []
    rest += [f"{plan.done} done"] if plan.done else []
    tail = f"; {', '.join(rest)}" if rest else ""
    for notice in plan.notices:  # said even with -q, before anything is sent: each changes what is sent
        stderr.print(f"warning: {notice}", markup=False)
    for line in [] if plan.sandbox else plan.prices:  # a rehearsal's prices are the bundled ones, and not paid
        stderr.print(f"price: {line}", markup=False)
    balance = f"; balance ${plan.balance:,.2f}" if plan.balance is not None and not plan.sandbox else ""
    if len(plan.accounts) > 1:
        shown = [
            f"{account} {'$' + format(b, ',.2f') if b is not None else 'balance not known'}"
            for account, b in plan.accounts
        ]
        stderr.print(f"{len(plan.accounts)} accounts (token fingerprints): {', '.join(shown)}", markup=False)
        balance = f"; balance ${plan.balance:,.2f} in all" if plan.balance is not None and not plan.sandbox else ""
    for account, names in plan.without_token.items():
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        stderr.print(
            f"held: {len(names)} job(s) submitted by account {account or '(unnamed)'} cannot be polled: no token of "
            f"this run is that account's (RunComfy answers only the account that submitted a request). Add its "
            f"token to resume them; they are never submitted again. Jobs: {', '.join(names[:5])}{more}",
            markup=False,
        )
    if plan.retry_skipped:
        counts = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(plan.retry_skipped.items()))
        stderr.print(
            f"--retry-failed skips {sum(plan.retry_skipped.values())} failed job(s) another try would not fix "
            f"({counts}): ${plan.retry_skipped_cost:,.2f} not spent. --retry-failed=all sends them too.",
            markup=False,
        )
    stderr.print(f"will submit {plan.to_submit} job(s) ({cost}){balance}{tail}", markup=False)
    if confirm_above is None or plan.estimate <= confirm_above:
        return
    if not (sys.stdin.isatty() and stderr.is_terminal):
        return
    if not click.confirm(f"Spend about ${plan.estimate:,.2f}?", default=False, err=True):
        raise _Failed("nothing was sent (not confirmed); add --yes to skip this question")


def _resume_command(
    manifest: Path,
    summary: RunSummary,
    schema_dirs: tuple[Path, ...],
    api_base: str | None,
    sandbox: bool,
    shard: tuple[int, int] | None,
    only: str | None,
    limit: int | None,
    concurrency: int,
    replace_rejected: bool = False,
) -> str:
    """The command that goes on with this run: every flag that chose its folder, API and jobs."""
    # Absolute paths: the hint must work from wherever it is pasted (a cron job, another shell).
    words = [*_this_command(), "run", str(manifest.resolve()), "-o", str(summary.output_dir)]
    for folder in schema_dirs:
        words += ["--schemas", str(folder)]
    if sandbox:
        words.append("--sandbox")
    elif api_base:
        words += ["--api-base", api_base]
    if shard:
        words += ["--shard", f"{shard[0]}/{shard[1]}"]
    if only is not None:
        words += ["--only", only]
    if limit is not None:
        words += ["--limit", str(limit)]
    if concurrency != 8:
        words += ["-c", str(concurrency)]
    if replace_rejected:
        words.append("--replace-rejected")
    return shlex.join(words)


def _this_command() -> list[str]:
    """How batcher was started, so a printed command works as pasted (a venv's batcher is not on PATH)."""
    started = sys.argv[0] if sys.argv else ""
    if started.endswith("__main__.py"):
        return [sys.executable, "-m", "batcher"]
    if os.sep in started and os.path.isfile(started):
        return [os.path.abspath(started)]
    return ["batcher"]


def _run_with_display(manifest: Manifest, options: RunOptions, quiet: bool, on_plan: Callable[[RunPlan], None]) -> Any:
    """Run with a live rich display on a terminal, a plain line every few seconds elsewhere."""
    done = threading.Event()
    live: Live | None = None
    threads: list[threading.Thread] = []

    def on_start(progress: RunProgress) -> None:
        nonlocal live
        if quiet:
            return
        if stderr.is_terminal:
            live = Live(ProgressView(progress), console=stderr, refresh_per_second=4, transient=False)
            live.start()
        else:

            def plain() -> None:
                while not done.wait(5.0):
                    click.echo(plain_progress_line(progress), err=True)
                click.echo(plain_progress_line(progress), err=True)

            thread = threading.Thread(target=plain, daemon=True)
            thread.start()
            threads.append(thread)

    try:
        return anyio.run(lambda: run_manifest(manifest, options, on_start=on_start, on_plan=on_plan))
    finally:
        done.set()
        for thread in threads:
            thread.join(1)
        if live is not None:
            live.stop()


@cli.command()
@_manifest_argument
@_output_option
@_api_base_option
@click.option("--sandbox", is_flag=True, help="Cancel against the in-process sandbox.")
@_shard_option
def cancel(
    manifest: Path,
    schema_dirs: tuple[Path, ...],
    output: Path | RemoteOutput | None,
    api_base: str | None,
    sandbox: bool,
    shard: tuple[int, int] | None,
) -> None:
    """Cancel this manifest's jobs that are queued at RunComfy (running ones cannot be)."""
    loaded = load_manifest(manifest, schema_dirs)
    options = RunOptions(
        output_dir=output if isinstance(output, Path) else None,
        remote=output if isinstance(output, RemoteOutput) else None,
        api_base=api_base,
        sandbox=sandbox,
        sandbox_config=SandboxConfig(schema_dirs=loaded.schema_dirs) if sandbox else None,
        shard=shard,
    )
    summary = anyio.run(cancel_manifest, loaded, options)
    click.echo(f"cancelled {len(summary.cancelled)} job(s)")
    for name, state in summary.not_cancellable:
        click.echo(f"  {name}: not cancellable ({state})")
    for name, error in summary.errors:
        click.echo(f"  {name}: {error}", err=True)
    if summary.errors:
        sys.exit(EXIT_FAILED)


@cli.command()
@_manifest_argument
@_output_option
@_shard_option
@_sandbox_folder_option
def report(
    manifest: Path,
    schema_dirs: tuple[Path, ...],
    output: Path | RemoteOutput | None,
    shard: tuple[int, int] | None,
    sandbox: bool,
) -> None:
    """Write the gallery (index.html) and the dataset's metadata.jsonl. No network but an s3:// or gs:// output's bucket.

    Shard folders (shard-K-of-N/) inside the output folder are summed in.
    """
    if isinstance(output, RemoteOutput):
        _remote_report(load_manifest(manifest, schema_dirs), output)
        return
    loaded, output_dir = _load_slice(manifest, schema_dirs, output, shard, sandbox)
    view = read_folder(output_dir)
    folded = FoldedJournal(records=view.records, headers=view.headers, warnings=view.warnings)
    if not folded.records:
        _point_at_noted_folders(loaded, output_dir)
        raise _BadInput(f"nothing to report: no journal with jobs in {output_dir} (run the manifest first)")
    loaded = with_replacements(loaded, output_dir, view=view)
    try:
        rows = write_metadata(loaded, output_dir, folded.records)
        page = write_gallery(loaded, output_dir, folded)
    except OSError as exc:
        raise _Failed(f"cannot write the report into {output_dir}: {exc.strerror or exc}") from exc
    click.echo(f"gallery: {page}")
    click.echo(f"dataset: {output_dir / METADATA_NAME} ({rows} images)")
    click.echo(f'  load it: datasets.load_dataset("imagefolder", data_dir="{output_dir}")')


def _remote_report(loaded: Manifest, output: RemoteOutput) -> None:
    """`report` for an s3:// or gs:// output: every shard's journal summed, the gallery and metadata.jsonl written at the
    output's top, beside the shard folders they link into."""
    output_dir, listing = pull_view(output)
    view = read_folder(output_dir)
    folded = FoldedJournal(records=view.records, headers=view.headers, warnings=view.warnings)
    if not folded.records:
        raise _BadInput(f"nothing to report: no journal with jobs in {output.url} (run the manifest first)")
    with StoredFiles(output_dir, listing) as files:
        rows = write_metadata(loaded, output_dir, folded.records, files)
    with StoredFiles(output_dir, listing) as files:
        # The file's name only: a page in a bucket may be served to others, and this machine's paths are its own.
        write_gallery(loaded, output_dir, folded, files, manifest_shown=loaded.path.name)
    with open_bucket(output) as bucket:
        for name in (METADATA_NAME, GALLERY_NAME):
            upload(bucket, output_dir / name, name)
    click.echo(f"gallery: {output.url}/{GALLERY_NAME}")
    click.echo(f"dataset: {output.url}/{METADATA_NAME} ({rows} images)")


@cli.command()
@_manifest_argument
@_output_option
@_sandbox_folder_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address to listen on.")
@click.option(
    "-p",
    "--port",
    type=click.IntRange(0, 65535),
    help=f"Port to listen on [default: {DEFAULT_PORT}, or any free one when it is taken; 0: any free one].",
)
def review(
    manifest: Path,
    schema_dirs: tuple[Path, ...],
    output: Path | RemoteOutput | None,
    sandbox: bool,
    host: str,
    port: int | None,
) -> None:
    """Serve a page on loopback to accept or reject every image, beside its inputs. No network but inputs.

    Prints the address (with this session's token) and opens nothing. Keys:
    j/k move, a accept, r reject, x undo, u undecided only. Decisions go to
    decisions.jsonl in the output folder and survive reruns; `run
    --replace-rejected` then makes a new generation for each rejected image,
    and `export --accepted-only` hands the rest on.
    """
    local = _local_only(output, "review")
    loaded = load_manifest(manifest, schema_dirs)
    output_dir = local or default_output_dir(loaded, sandbox=sandbox)
    if not read_folder(output_dir).records:
        _point_at_noted_folders(loaded, output_dir)
        raise _BadInput(f"nothing to review: no journal with jobs in {output_dir} (run the manifest first)")
    try:
        server = ReviewServer(loaded, output_dir, host=host, port=DEFAULT_PORT if port is None else port).start()
    except OSError as exc:
        if port is not None:
            raise _BadInput(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        server = ReviewServer(loaded, output_dir, host=host, port=0).start()  # the default port is taken
    click.echo(f"review: {server.url}", err=True)
    click.echo(
        "review: open that address in a browser; Ctrl-C to stop (decisions are saved as they are made)", err=True
    )
    try:
        server.wait()
    except KeyboardInterrupt:
        click.echo("review: stopped", err=True)
    finally:
        server.stop()


@cli.command()
@_manifest_argument
@click.argument("dest", type=click.Path(path_type=Path, file_okay=False))
@_output_option
@_sandbox_folder_option
@click.option(
    "-f",
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="imagefolder",
    show_default=True,
    help="imagefolder: images and metadata.jsonl; webdataset: tar shards; parquet: images embedded.",
)
@click.option("--accepted-only", is_flag=True, help="Only the images accepted in `batcher review`.")
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=DEFAULT_SHARD_SIZE,
    show_default=True,
    help="Images per WebDataset tar shard or Parquet file.",
)
def export(
    manifest: Path,
    dest: Path,
    schema_dirs: tuple[Path, ...],
    output: Path | RemoteOutput | None,
    sandbox: bool,
    fmt: ExportFormat,
    accepted_only: bool,
    shard_size: int,
) -> None:
    """Write the run's images to DEST (a new folder) as a dataset, with their prompts and provenance. No network.

    Every row carries the image's review decision; --accepted-only keeps the
    accepted ones. Shard folders (shard-K-of-N/) inside the output folder are summed in.
    """
    local = _local_only(output, "export")
    loaded = load_manifest(manifest, schema_dirs)
    output_dir = local or default_output_dir(loaded, sandbox=sandbox)
    if not read_folder(output_dir).records:
        _point_at_noted_folders(loaded, output_dir)
        raise _BadInput(f"nothing to export: no journal with jobs in {output_dir} (run the manifest first)")
    summary = export_dataset(loaded, output_dir, dest, fmt, accepted_only=accepted_only, shard_size=shard_size)
    for reason in summary.skipped:
        click.echo(f"warning: left out {reason}", err=True)
    files = f"{len(summary.files)} file(s)" if fmt != "imagefolder" else "images and metadata.jsonl"
    click.echo(f"{fmt}: {summary.images} images in {summary.dest} ({files})")
    click.echo(f"  load it: {_LOADERS[fmt].format(dest=summary.dest, last=len(summary.files) - 1)}")


_LOADERS: dict[str, str] = {
    "imagefolder": 'datasets.load_dataset("imagefolder", data_dir="{dest}")',
    "webdataset": 'webdataset.WebDataset("{dest}/shard-{{000000..{last:06d}}}.tar").decode("pil")',
    "parquet": 'datasets.load_dataset("parquet", data_dir="{dest}")',
}


def _local_only(output: Path | RemoteOutput | None, command: str) -> Path | None:
    """`review` and `export` read images from a local folder (an s3:// or gs:// output is not fetched back)."""
    if isinstance(output, RemoteOutput):
        raise _BadInput(
            f"{command} works on a local output folder; {output.url} is in object storage. Copy it down first "
            f"(aws s3 sync {output.url} ./night), then: batcher {command} ... -o ./night"
        )
    return output


@cli.command()
@click.argument("model", required=False)
@_schemas_option("Folder of model schemas, searched before the bundled ones; repeatable.")
def schemas(model: str | None, schema_dirs: tuple[Path, ...]) -> None:
    """List the models batcher has schemas for, or show MODEL's input fields."""
    if model is None:
        for known in available_models(schema_dirs):
            source = load_model_schema(known, schema_dirs).source
            click.echo(f"{known}  ({source})")
        click.echo("\nshow one with: batcher schemas MODEL; add your own with --schemas DIR (see README)", err=True)
        return
    schema = load_model_schema(model, schema_dirs)
    table = Table(title=f"{model}  ({schema.source})", title_justify="left")
    for column in ("field", "type", "required", "default", "allowed"):
        table.add_column(column, overflow="fold")
    required = set(schema.required)
    for name, spec in schema.properties.items():
        table.add_row(
            name,
            _type_of(spec),
            "yes" if name in required else "",
            "" if name in required or "default" not in spec else json.dumps(spec["default"]),
            _allowed(spec),
        )
    stdout.print(table)
    prices = load_price_table(model, schema_dirs)
    if prices:
        stdout.print(f"prices by {', '.join(prices.keys)}: {prices.source}, as of {prices.as_of}")


def _type_of(spec: dict[str, Any]) -> str:
    kind = str(spec.get("type", "any"))
    if kind == "array" and isinstance(spec.get("items"), dict):
        kind = f"list of {spec['items'].get('format') or spec['items'].get('type', 'any')}"
    return kind


def _allowed(spec: dict[str, Any]) -> str:
    if "enum" in spec:
        return " | ".join(str(v) for v in spec["enum"])
    limits = [
        f"{word} {spec[key]}"
        for key, word in (("minItems", "min items"), ("maxItems", "max items"), ("minimum", "min"), ("maximum", "max"))
        if key in spec
    ]
    return ", ".join(limits)


@cli.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address to listen on.")
@click.option("-p", "--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--queue-delay",
    default=0.3,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds a job waits in the queue.",
)
@click.option("--run-delay", default=0.7, show_default=True, type=click.FloatRange(min=0), help="Seconds a job runs.")
@click.option(
    "--run-delay-max", type=click.FloatRange(min=0), help="Draw each job's run time between --run-delay and this."
)
@click.option(
    "--fail-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="Fraction of jobs that fail."
)
@click.option(
    "--fault-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Fraction of requests that meet a fault.",
)
@click.option(
    "--faults",
    default=",".join(FAULT_KINDS),
    show_default=True,
    help="Comma-separated faults to draw from: " + ", ".join(FAULT_KINDS) + ".",
)
@click.option("--slow-seconds", default=5.0, show_default=True, type=float, help="Delay of a 'slow' fault.")
@click.option("--retry-after", default=1.0, show_default=True, type=float, help="Retry-After seconds sent with 429s.")
@click.option("--url-ttl", type=float, help="Seconds output URLs stay valid [default: for ever].")
@click.option("--images-per-job", default=1, show_default=True, type=click.IntRange(1, 10))
@click.option("--require-token", help="Accept only this bearer token [default: any].")
@click.option(
    "--auth-status",
    default="401",
    show_default=True,
    type=click.Choice(["401", "403"]),
    help="How a wrong token is refused: 401 with RunComfy's 401001 body, or a bare 403.",
)
@click.option(
    "--max-in-flight", type=click.IntRange(min=1), help="An account cap: submits past N queued or running get 429."
)
@click.option(
    "--unknown-window",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds after a submit during which the request answers 404001 (a lagging replica).",
)
@click.option("--rate-limit", type=click.FloatRange(min=0.1), help="Answer 429 past this many API requests a second.")
@click.option(
    "--dialect",
    default="runcomfy",
    show_default=True,
    type=click.Choice(list(DIALECTS)),
    help="How answers are worded: RunComfy's own, or as each of its clients has seen them.",
)
@click.option("--balance", type=click.FloatRange(min=0), help="The account's balance in USD [default: unlimited].")
@click.option(
    "--model-price", type=click.FloatRange(min=0), help="base_price_usd to answer [default: the bundled table's]."
)
@click.option("--refuse", type=click.Choice(list(REFUSALS)), help="Refuse every call as RunComfy would.")
@click.option(
    "--account",
    "accounts",
    multiple=True,
    help="A token of one of several accounts (repeatable): each has its own jobs, --max-in-flight and "
    "--rate-limit, and gets 403001 for another's request; other tokens are refused.",
)
@click.option(
    "--blocked-word",
    "blocked_words",
    multiple=True,
    help="Prompts holding this word fail with a content-policy error (repeatable).",
)
@click.option("--seed", type=int, help="Seed for faults and failures, to replay a session.")
@_schemas_option("Folder of model schemas, so the sandbox accepts those models too; repeatable.")
def sandbox_command(
    host: str,
    port: int,
    queue_delay: float,
    run_delay: float,
    run_delay_max: float | None,
    fail_rate: float,
    fault_rate: float,
    faults: str,
    slow_seconds: float,
    retry_after: float,
    url_ttl: float | None,
    images_per_job: int,
    require_token: str | None,
    auth_status: str,
    max_in_flight: int | None,
    unknown_window: float,
    rate_limit: float | None,
    dialect: str,
    balance: float | None,
    model_price: float | None,
    refuse: str | None,
    accounts: tuple[str, ...],
    blocked_words: tuple[str, ...],
    seed: int | None,
    schema_dirs: tuple[Path, ...],
) -> None:
    """Serve a RunComfy-compatible API on loopback, for rehearsals and tests.

    Point a run at it with --api-base http://127.0.0.1:PORT and any token.
    """
    from ..net.policy import is_loopback_host

    if not is_loopback_host(host):
        raise _BadInput(f"the sandbox listens on loopback only, not {host}")
    config = SandboxConfig(
        queue_delay=queue_delay,
        run_delay=run_delay,
        run_delay_max=run_delay_max,
        fail_rate=fail_rate,
        fault_rate=fault_rate,
        faults=tuple(f.strip() for f in faults.split(",") if f.strip()),
        slow_seconds=slow_seconds,
        retry_after=retry_after,
        url_ttl=url_ttl,
        images_per_job=images_per_job,
        require_token=require_token,
        auth_status=int(auth_status),
        max_in_flight=max_in_flight,
        unknown_window=unknown_window,
        rate_limit=rate_limit,
        dialect=dialect,
        balance_usd=balance,
        model_price=model_price,
        refuse=refuse,
        accounts=accounts,
        blocked_words=blocked_words,
        seed=seed,
        schema_dirs=schema_dirs,
    )
    server = Sandbox(config)

    async def serve() -> None:
        async with server.running(host, port) as url:
            click.echo(f"sandbox: serving a RunComfy-compatible API at {url} (Ctrl-C to stop)", err=True)
            click.echo(f"sandbox: try  RUNCOMFY_API_TOKEN=any batcher run MANIFEST --api-base {url}", err=True)
            await anyio.sleep_forever()

    try:
        anyio.run(serve)
    except KeyboardInterrupt:
        click.echo(f"sandbox: stopped; {json.dumps(server.stats())}", err=True)
    except OSError as exc:
        raise _BadInput(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="batcher")
