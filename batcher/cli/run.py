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
import cloup
from click.core import ParameterSource
from rich.live import Live

from ..api import run_manifest
from ..engine.options import CONFIRM_ABOVE, CONFIRM_ABOVE_DEFAULT, NOTIFY, RunSettings, run_settings
from ..engine.progress import ProgressView, RunProgress, plain_progress_line
from ..engine.runner import RunOptions, RunPlan, RunSummary
from ..journal.failures import RETRYABLE, parse_retry_classes
from ..manifest.loader import Manifest, load_manifest
from ..output.storage import RemoteOutput
from ..printable import counted
from ..reports.notify import NOTIFY_ENV, error_payload, notify_url, send, summary_payload
from ..reports.report import print_summary, report_command
from ..runcomfy.client import RetryPolicy
from ..sandbox.server import SandboxConfig
from .common import (
    setup_logging,
    stderr,
    this_command,
)
from .exits import BAD_INPUT, EXIT_BAD_INPUT, EXIT_FAILED, Failed
from .options import (
    api_base_option,
    field_option,
    flag_option,
    manifest_argument,
    output_option,
    run_option,
    shard_option,
)


@cloup.command()
@manifest_argument
@cloup.option_group(
    "Common options",
    output_option,
    run_option("concurrency"),
    run_option("sandbox"),
    run_option("max_cost"),
    run_option("limit"),
    run_option("only"),
    shard_option,
    click.option("-q", "--quiet", is_flag=True, help="No progress display; errors and the summary only."),
    click.option(
        "-v",
        "--verbose",
        count=True,
        help="-v: one log line per API call (call, model or request id, HTTP status, time); -vv: the HTTP "
        "library's too.",
    ),
)
@cloup.option_group(
    "Money and recovery",
    run_option("retry_failed", is_flag=False, flag_value="retryable", default=None, type=str, metavar="[=CLASSES]"),
    run_option("resubmit_uncertain"),
    run_option("replace_rejected"),
    run_option("new_output"),
    run_option("over_balance"),
    click.option("-y", "--yes", is_flag=True, help="Do not ask before spending more than --confirm-above."),
    flag_option(CONFIRM_ABOVE, CONFIRM_ABOVE_DEFAULT, "confirm_above"),
    run_option("cancel_on_interrupt"),
    flag_option(NOTIFY, None, "notify", help=f"{NOTIFY.help} Default: ${NOTIFY_ENV}."),
    click.option(
        "--notify-file",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Read the --notify URL from this file (its first line), out of sight of ps and shell history.",
    ),
)
@cloup.option_group(
    "Limits and tuning",
    api_base_option,
    run_option("rate"),
    run_option("queue_timeout"),
    run_option("job_timeout"),
    run_option("timeout"),
    run_option("lost_after"),
    run_option("outage_timeout"),
    run_option("poll_interval"),
    run_option("poll_max"),
    field_option(RetryPolicy, "attempts", param="retries"),
    run_option("read_timeout"),
    run_option("max_download_bytes"),
    run_option("allow_output_hosts"),
    run_option("max_answer_bytes"),
    run_option("download_timeout"),
)
def run(
    manifest: Path,
    schema_dirs: tuple[Path, ...],
    output: Path | RemoteOutput | None,
    retry_failed: str | None,
    retries: int,
    yes: bool,
    confirm_above: float,
    notify: str | None,
    notify_file: Path | None,
    quiet: bool,
    verbose: int,
    **flags: Any,
) -> None:
    """Run MANIFEST, or resume it: nothing already submitted is sent again.

    Ctrl-C once stops submitting and finishes the jobs already paid for;
    twice (or SIGTERM once) stops at once. The command printed at the end resumes.
    """
    setup_logging(verbose, quiet)
    loaded = load_manifest(manifest, schema_dirs)
    # The manifest's run: block, under every flag given on the command line (a flag always wins).
    settings = run_settings(loaded)
    context = click.get_current_context()
    given = {name for name in settings.values if _given(context, name)}
    taken = {name: value for name, value in settings.values.items() if name not in given}
    flags.update({name: value for name, value in taken.items() if name in flags})
    retries = taken.get("retries", retries)
    confirm_above = taken.get("confirm_above", confirm_above)
    # --notify, else --notify-file, else the manifest's notify, else $BATCHER_NOTIFY_URL; checked before the run.
    notify = notify_url(taken.get("notify", notify) if notify_file is None else notify, notify_file)
    _say_settings(settings, taken, given)
    if flags["sandbox"] and "poll_interval" not in taken and not _given(context, "poll_interval"):
        # The in-process sandbox's jobs wait 0.3 s and run 0.7 s: a 1 s poll saw each queued, then done, never
        # running. It charges nothing and limits no rate, so a rehearsal polls it often enough to see each state.
        flags["poll_interval"] = SANDBOX_POLL_INTERVAL
    # Every other flag is a RunOptions field of its own name (run_option): only what a flag spells
    # differently from its field is converted here.
    options = RunOptions(
        **flags,
        output_dir=output if isinstance(output, Path) else None,
        remote=output if isinstance(output, RemoteOutput) else None,
        sandbox_config=SandboxConfig(schema_dirs=loaded.schema_dirs) if flags["sandbox"] else None,
        retry_failed=retry_failed is not None,
        retry_classes=parse_retry_classes(retry_failed) if retry_failed is not None else RETRYABLE,
        retry=RetryPolicy(attempts=retries),
        handle_signals=True,
        from_manifest=tuple(name for name in taken if name in flags or name == "retries"),
    )
    if options.sandbox:
        stderr.print("[dim]sandbox: a local stand-in for RunComfy; images are test patterns and nothing is charged[/]")

    def on_plan(plan: RunPlan) -> None:
        _announce(plan, confirm_above=None if yes or plan.sandbox else confirm_above)  # a rehearsal is free

    try:
        summary = _run_with_display(loaded, options, quiet, on_plan)
    except BaseException as exc:
        if notify:
            code = EXIT_BAD_INPUT if isinstance(exc, BAD_INPUT) else EXIT_FAILED
            _notify(notify, error_payload(loaded.name, exc, code))
        raise
    resume = _resume_command(manifest, summary, schema_dirs, options)
    if isinstance(output, RemoteOutput):  # the bucket, not this machine's working copy, is the run's place
        resume = resume.replace(shlex.quote(str(summary.output_dir)), shlex.quote(output.url), 1)
    print_summary(
        stderr, summary, resume, report_command(this_command(), manifest, summary, schema_dirs, options.shard)
    )
    if notify:
        _notify(notify, summary_payload(loaded.name, summary))
    sys.exit(summary.exit_code)


SANDBOX_POLL_INTERVAL = 0.1
"""--poll-interval of a `run --sandbox` that gives none: the in-process sandbox's states last under a second."""


def _given(context: click.Context, name: str) -> bool:
    """Whether the flag of param name was given (on the command line or by its environment variable)."""
    source = context.get_parameter_source(name)
    return source not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _say_settings(settings: RunSettings, taken: dict[str, Any], given: set[str]) -> None:
    """One line naming the settings taken from the manifest, and those a flag overrode; a manifest that raises
    the question's threshold says so (a manifest may come from someone else's repository)."""
    if taken:
        shown = ", ".join(f"{name} {_shown(value)}" for name, value in taken.items())
        overridden = f" (flags win over {', '.join(sorted(given))})" if given else ""
        stderr.print(f"settings from the manifest's run: block: {shown}{overridden}", markup=False)
    elif given:
        stderr.print(f"flags win over the manifest's run: {', '.join(sorted(given))}", markup=False)
    raised = taken.get("confirm_above")
    if raised is not None and raised > CONFIRM_ABOVE_DEFAULT:
        stderr.print(
            f"note: the manifest ({settings.where['confirm_above']}) raises confirm_above to ${raised:,.2f} "
            f"(default ${CONFIRM_ABOVE_DEFAULT:,.2f}): give --confirm-above to ask sooner",
            markup=False,
        )


def _shown(value: object) -> str:
    return "none" if value is None else str(value)


def _notify(url: str, payload: dict[str, Any]) -> None:
    """Send the end-of-run notification; a failure is a warning, never the run's exit code."""
    failure = send(url, payload)
    if failure is not None:
        # Only the host: a webhook's path is its secret (Slack's is).
        stderr.print(f"warning: could not notify {urlsplit(url).hostname}: {failure}", markup=False)


def _announce(plan: RunPlan, confirm_above: float | None) -> None:
    """The line before the first request: what will be sent and its estimate; on a terminal, above
    confirm_above dollars, ask first (never without a terminal: a cron job must not hang)."""
    unpriced = f", +{counted(plan.unpriced, 'job')} with no price table" if plan.unpriced else ""
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
            f"held: {counted(len(names), 'job')} submitted by account {account or '(unnamed)'} cannot be polled: no token of "
            f"this run is that account's (RunComfy answers only the account that submitted a request). Add its "
            f"token to resume them; they are never submitted again. Jobs: {', '.join(names[:5])}{more}",
            markup=False,
        )
    if plan.retry_skipped:
        counts = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(plan.retry_skipped.items()))
        stderr.print(
            f"--retry-failed skips {counted(sum(plan.retry_skipped.values()), 'failed job')} another try would not fix "
            f"({counts}): ${plan.retry_skipped_cost:,.2f} not spent. --retry-failed=all sends them too.",
            markup=False,
        )
    stderr.print(f"will submit {counted(plan.to_submit, 'job')} ({cost}){balance}{tail}", markup=False)
    if confirm_above is None or plan.estimate <= confirm_above:
        return
    if not (sys.stdin.isatty() and stderr.is_terminal):
        return
    if not click.confirm(f"Spend about ${plan.estimate:,.2f}?", default=False, err=True):
        raise Failed("nothing was sent (not confirmed); add --yes to skip this question")


def _resume_command(manifest: Path, summary: RunSummary, schema_dirs: tuple[Path, ...], options: RunOptions) -> str:
    """The command that goes on with this run: every flag that chose its folder, API and jobs."""
    # Absolute paths: the hint must work from wherever it is pasted (a cron job, another shell).
    words = [*this_command(), "run", str(manifest.resolve()), "-o", str(summary.output_dir)]
    for folder in schema_dirs:
        words += ["--schemas", str(folder)]
    if options.sandbox:
        words.append("--sandbox")
    elif options.api_base:
        words += ["--api-base", options.api_base]
    if options.shard:
        words += ["--shard", f"{options.shard[0]}/{options.shard[1]}"]
    if options.only is not None:
        words += ["--only", options.only]
    if options.limit is not None:
        words += ["--limit", str(options.limit)]
    if options.concurrency != RunOptions().concurrency and "concurrency" not in options.from_manifest:
        words += ["-c", str(options.concurrency)]
    if options.replace_rejected:
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
