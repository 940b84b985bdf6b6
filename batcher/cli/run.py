"""`batcher run`: a run (or its resumption) with its live display, confirmation and resume hint."""

from __future__ import annotations

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
from rich.live import Live

from ..api import run_manifest
from ..engine.progress import ProgressView, RunProgress, plain_progress_line
from ..engine.runner import RunOptions, RunPlan, RunSummary
from ..journal.failures import RETRYABLE, parse_retry_classes
from ..manifest.loader import Manifest, load_manifest
from ..output.download import DEFAULT_MAX_BYTES
from ..output.storage import RemoteOutput
from ..reports.notify import check_notify_url, error_payload, send, summary_payload
from ..reports.report import print_summary
from ..runcomfy.client import DEFAULT_MAX_ANSWER_BYTES, RetryPolicy
from ..sandbox.server import SandboxConfig
from .common import (
    setup_logging,
    stderr,
    this_command,
)
from .exits import BAD_INPUT, EXIT_BAD_INPUT, EXIT_FAILED, Failed
from .options import (
    api_base_option,
    manifest_argument,
    output_option,
    shard_option,
)


@click.command()
@manifest_argument
@output_option
@click.option(
    "-c", "--concurrency", default=8, show_default=True, type=click.IntRange(1, 1024), help="Jobs in flight at once."
)
@api_base_option
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
    help="When the run ends, POST its summary as JSON to URL (a Slack or ntfy webhook, or your own).",
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
@shard_option
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
    setup_logging(verbose, quiet)
    if notify:
        check_notify_url(notify)
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
            code = EXIT_BAD_INPUT if isinstance(exc, BAD_INPUT) else EXIT_FAILED
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
        raise Failed("nothing was sent (not confirmed); add --yes to skip this question")


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
    words = [*this_command(), "run", str(manifest.resolve()), "-o", str(summary.output_dir)]
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
