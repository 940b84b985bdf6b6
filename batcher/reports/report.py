"""What a person reads after the fact: the run summary, `status` and `plan`.

Status comes from the journal alone (read without the run's lock), so it
works while a run is going and after it. Every figure comes from
`standing.tally`, as the run summary's does.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table

from ..confined import OutputDir
from ..engine.runner import RunSummary
from ..journal.failures import RETRYABLE, failure_sentence
from ..journal.standing import AccountFigures, JobStanding, Tally, category_of, opened, tally
from ..journal.store import JOURNAL_NAME
from ..lifecycle import CATEGORIES
from ..manifest.cost import estimate, load_price_table
from ..manifest.loader import Job, Manifest
from ..output.dataset import completed_in, dataset_images
from ..output.folders import FolderView, read_folder, rehearsal_only
from ..printable import counted, printable
from ..review.decisions import read_decisions, review_counts
from ..review.replacements import decisions_folder, pending_replacements, with_replacements
from ..runcomfy.account import LIVE_PRICES, price_dirs

__all__ = [
    "StatusReport",
    "is_sandbox",
    "print_plan",
    "print_status",
    "print_summary",
    "report_command",
    "status_report",
]


@dataclass(slots=True)
class StatusReport(Tally):
    """What `batcher status` (and its --json) shows: the `Tally` of a manifest's jobs, and where it was read."""

    manifest: str = ""
    journal: str = ""
    total: int = 0
    sandbox: bool = False
    """The journals are a rehearsal's: the money figures were never charged."""
    warnings: list[str] = field(default_factory=list)
    journals: list[str] = field(default_factory=list)
    """Every journal summed: the folder's own and its shards'."""
    accepted: int = 0
    """Images accepted in `batcher review`; `rejected` and `undecided` the same (downloaded images only;
    all three 0 until a first decision is recorded)."""
    rejected: int = 0
    undecided: int = 0
    replacements_to_submit: int = 0
    """Rejected images whose replacement `run --replace-rejected` would submit now."""
    replacements_cost: float = 0.0
    """Their estimated cost."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def status_report(
    manifest: Manifest, output_dir: Path, view: FolderView | None = None, files: OutputDir | None = None
) -> StatusReport:
    """Where every job of manifest stands according to the journals in output_dir.

    Shard folders inside output_dir (``shard-K-of-N/``, from ``run --shard``)
    are read too and summed (see `read_folder`): gather the shards' folders
    from several machines under one output folder and `status` shows the
    whole manifest.
    """
    view = view or read_folder(output_dir)
    damage: list[str] = []
    manifest = with_replacements(manifest, output_dir, view=view, said=damage)
    prices = _prices_of(output_dir, view, manifest.schema_dirs)
    # Read past a damaged line (said in the warnings): the counts are then of the sound lines.
    decisions = read_decisions(decisions_folder(output_dir), skip_damaged=bool(damage))
    with nullcontext(files) if files is not None else opened(output_dir) as folder:
        sums = tally(manifest.priced_jobs(prices), view.records, prices, folder)
        # A second pass over the jobs only once someone reviewed: a prompt file is read again for it.
        done = manifest.jobs_through(completed_in(view.records))
        images = dataset_images(done, view.records, folder) if decisions.lines else iter(())
        counts = review_counts(((i.job.key, i.index, i.file.sha256) for i in images), decisions)
    pending = pending_replacements(manifest, output_dir, view=view)
    return StatusReport(
        **{f.name: getattr(sums, f.name) for f in fields(Tally)},
        manifest=str(manifest.path),
        journal=str(view.journals[0]) if view.journals else str(output_dir / JOURNAL_NAME),
        total=manifest.count,
        sandbox=is_sandbox(view),
        warnings=view.warnings + damage + decisions.warnings,
        journals=[str(j) for j in view.journals],
        accepted=counts.accepted,
        rejected=counts.rejected,
        undecided=counts.undecided,
        replacements_to_submit=len(pending),
        replacements_cost=_estimate_all(pending, prices),
    )


def _prices_of(output_dir: Path, view: FolderView, schema_dirs: Sequence[Path]) -> tuple[Path, ...]:
    """Where a view's prices are looked up: the live tables in output_dir, else in the first of its shards' folders
    that has them (a sharded run keeps them there), so a folder and its shards label one price alike."""
    for folder in [output_dir, *(journal.parent for journal in view.journals)]:
        if (folder / LIVE_PRICES).is_dir():
            return price_dirs(folder, schema_dirs)
    return price_dirs(output_dir, schema_dirs)


def _estimate_all(jobs: list[Job], prices: Sequence[Path]) -> float:
    return round(sum(estimate(job, prices) or 0.0 for job in jobs), 6)


def is_sandbox(view: FolderView) -> bool:
    """True when the journals were written against a sandbox (their money was never charged)."""
    return rehearsal_only(view.headers)


def _money(value: float) -> str:
    return f"${value:,.2f}"


def _spent_line(spent: float, superseded: float, sandbox: bool) -> str:
    apart = f", of which {_money(superseded)} on jobs no longer in the manifest" if superseded else ""
    if sandbox:
        return f"sandbox: would have cost {_money(spent)}{apart} (nothing was charged)"
    return f"spent {_money(spent)} (as RunComfy reported){apart}"


def _replacements_line(count: int, cost: float, sandbox: bool, again: str | None = None) -> str:
    price = f"a real run would cost about {_money(cost)}" if sandbox else f"estimated {_money(cost)}"
    return (
        f"{count} rejected image(s) to replace: to submit {count} new generation(s) ({price}), run: "
        f"{again or 'batcher run MANIFEST'} --replace-rejected"
    )


def print_status(console: Console, report: StatusReport, again: str | None = None) -> None:
    """`batcher status`; again is the `run` command of this folder, which its hints complete."""
    console.print(f"{report.manifest}: {report.total} jobs")
    if len(report.journals) > 1:
        console.print(f"summed over {len(report.journals)} journals: " + ", ".join(report.journals))
    table = Table()
    table.add_column("state")
    table.add_column("jobs", justify="right")
    for name in CATEGORIES:
        table.add_row(name.replace("_", " "), str(report.counts[name]))
    console.print(table)
    if report.accepted or report.rejected:
        console.print(
            f"review: {report.accepted} accepted, {report.rejected} rejected, {report.undecided} undecided "
            f"(of {report.accepted + report.rejected + report.undecided} images)"
        )
    if report.replacements_to_submit:
        console.print(
            _replacements_line(report.replacements_to_submit, report.replacements_cost, report.sandbox, again)
        )
    console.print(
        _spent_line(report.spent, report.spent_superseded, report.sandbox)
        + (f"; in flight about {_money(report.in_flight_cost)}" if report.in_flight_cost else "")
        + f"; still to spend about {_money(report.to_spend)}"
    )
    _print_accounts(console, report.accounts, report.sandbox)
    _print_problems(console, report, report.possible_extra_cost, again)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


class _Problems(Protocol):
    """What `status` and a run's summary both list: the jobs that need a person's eyes."""

    refused: list[JobStanding]
    failed: list[JobStanding]
    uncertain: list[JobStanding]
    lost: list[JobStanding]
    orphans: list[str]
    failures: dict[str, int]
    failures_cost: dict[str, float]


def _print_problems(console: Console, problems: _Problems, extra: float, again: str | None = None) -> None:
    """The jobs that need a person, each kind with the whole command that sends them again (again: the `run`
    command of this folder, to which the flag is added)."""
    run = again or "batcher run MANIFEST"
    refused, failed, uncertain, lost = problems.refused, problems.failed, problems.uncertain, problems.lost
    orphans = problems.orphans
    if refused:
        console.print(
            f"\n[red]{len(refused)} refused[/] (certainly not accepted, nothing was charged; fix the cause, "
            "the next run sends them again):"
        )
        _print_jobs(console, refused)
    if failed:
        if all(job.failure == "download" for job in failed):
            why = (
                "RunComfy finished them, but their files could not be fetched: the next run fetches them again, "
                "paying nothing more"
            )
        else:
            why = f"to submit the retryable ones again, run: {run} --retry-failed"
        console.print(f"\n[red]{len(failed)} failed[/] ({why}):")
        _print_failures(console, problems.failures, problems.failures_cost)
        _print_jobs(console, failed)
    if lost:
        console.print(
            f"\n[yellow]{len(lost)} lost[/]: RunComfy accepted them (they may have been charged), then stopped "
            "knowing them, so there is no result. Check your RunComfy dashboard, then, to have them generated "
            f"again, run: {run} --resubmit-uncertain"
        )
        _print_jobs(console, lost)
    if uncertain:
        console.print(
            f"\n[yellow]{len(uncertain)} uncertain[/]: their submits may have been accepted and charged, "
            f"but no answer was recorded. Resubmitting could cost up to {_money(extra)} more. "
            f"Check your RunComfy dashboard, then, if you want them, run: {run} --resubmit-uncertain"
        )
        _print_jobs(console, uncertain)
    if orphans:
        console.print(
            f"\n{counted(len(orphans), 'job')} in the journal {'is' if len(orphans) == 1 else 'are'} no longer in the manifest (those paid for and not "
            "finished are still polled and downloaded by `run`; the rest are left alone): " + ", ".join(orphans[:10])
        )


def _print_failures(console: Console, failures: dict[str, int], costs: dict[str, float]) -> None:
    """RunComfy's failures by class, and which of them a plain --retry-failed sends again."""
    if not failures:
        return
    parts = []
    for kind, count in failures.items():
        if kind == "download":
            parts.append(f"{count} download (paid: fetched again by the next run, never submitted again)")
            continue
        again = "retried" if kind in RETRYABLE else "not retried"
        parts.append(f"{count} {kind.replace('_', ' ')} ({again}, about {_money(costs.get(kind, 0.0))})")
    console.print("  by reason: " + "; ".join(parts), markup=False)
    if any(kind not in RETRYABLE and kind != "download" for kind in failures):
        console.print(
            "  (--retry-failed=all, or a list such as --retry-failed=content_policy,model_error, sends others too)",
            markup=False,
        )


def _print_accounts(console: Console, accounts: dict[str, AccountFigures], sandbox: bool) -> None:
    """Per account (by fingerprint, never the token): jobs, spend and 429s; only when there are several."""
    if len(accounts) < 2:
        return
    table = Table(title="accounts (token fingerprints)", title_justify="left")
    table.add_column("account")
    table.add_column("jobs", justify="right")
    table.add_column("would have cost" if sandbox else "spent", justify="right")
    table.add_column("429s", justify="right")
    for account, figures in accounts.items():
        table.add_row(account, str(figures.jobs), _money(figures.spent), str(figures.throttled))
    console.print(table)


def _print_jobs(console: Console, jobs: list[JobStanding]) -> None:
    for job in jobs[:50]:
        # Errors are the server's words (or a journal's, written before they were cleaned at the client).
        said = failure_sentence(job.error, job.failure) if job.failure else job.error or job.phase
        console.print(f"  {job.name}: {printable(said, 300)}", markup=False)
    if len(jobs) > 50:
        console.print(f"  … and {len(jobs) - 50} more (batcher status --json lists all)")


def report_command(
    program: Sequence[str],
    manifest: Path,
    summary: RunSummary,
    schema_dirs: Sequence[Path] = (),
    shard: tuple[int, int] | None = None,
) -> str:
    """The `batcher report` command that writes a run's gallery (and metadata.jsonl) again, as pasted anywhere."""
    words = [*program, "report", str(manifest.resolve()), "-o", summary.output]
    for folder in schema_dirs:
        words += ["--schemas", str(folder)]
    if shard and summary.output_url is None:  # a bucket's report sums every shard at its top
        words += ["--shard", f"{shard[0]}/{shard[1]}"]
    return shlex.join(words)


def print_summary(console: Console, summary: RunSummary, resume: str | None = None, report: str | None = None) -> None:
    """The closing lines of `batcher run`; resume is the command that goes on (None: "the same command"),
    report the one that writes the gallery again."""
    parts = [f"{summary.done}/{summary.total} done"]
    for count, word in (
        (len(summary.refused), "refused"),
        (len(summary.failed), "failed"),
        (len(summary.uncertain), "uncertain"),
        (len(summary.lost), "lost"),
        (len(summary.unfinished), "not finished"),
    ):
        if count:
            parts.append(f"{count} {word}")
    spent = _spent_line(summary.spent, summary.spent_superseded, summary.sandbox)
    console.print(", ".join(parts) + f"; {spent}. Output: {summary.output}")
    if summary.gallery:
        again = f"; to write it again: {report}" if report else ""
        console.print(f"Gallery: {summary.gallery} (open it in a browser){again}", markup=False)
    _print_accounts(console, summary.accounts, summary.sandbox)
    _print_problems(console, summary, summary.possible_extra_cost, resume)
    again = resume or "the same command"
    if summary.stop_kind == "budget":
        console.print(
            f"\nstopped submitting: {summary.stop_reason}. {counted(len(summary.unfinished), 'job')} not sent, estimated at "
            f"{_money(summary.to_spend)}. To go on with all of them, raise --max-cost: "
            f"{resume or 'batcher run MANIFEST'} --max-cost "
            f"{math.ceil((summary.committed + summary.to_spend) * 100) / 100:.2f}"
        )
        return
    if summary.stop_reason and not summary.interrupted and summary.stop_kind != "auth":
        console.print(f"\nstopped submitting: {printable(summary.stop_reason, 1000)}", markup=False)
    for refused in summary.refused_accounts:
        console.print(f"\n{printable(refused, 2000)}", markup=False)
    if summary.interrupted or summary.unfinished:
        console.print(f"\nTo resume, run: {again}\n(nothing already submitted is sent again)")


PLAN_ROWS_SHOWN = 200


def print_plan(
    console: Console, manifest: Manifest, output_dir: Path, *, replace_rejected: bool = False, again: str | None = None
) -> None:
    """The jobs, their state in output_dir's journals (shards summed) and what is left to pay; with
    replace_rejected, the replacements of rejected images among them (as ``run --replace-rejected``)."""
    view = read_folder(output_dir)
    prices = _prices_of(output_dir, view, manifest.schema_dirs)
    pending = [] if replace_rejected else pending_replacements(manifest, output_dir, view=view)
    manifest = with_replacements(manifest, output_dir, submit_new=replace_rejected, view=view)
    several = len(manifest.models) > 1
    models = ", ".join(manifest.models)
    table = Table(title=f"{manifest.path}: {manifest.count} jobs for {models}", title_justify="left")
    columns = ("#", "job", *(("model",) if several else ()), "quality", "size", "images", "state", "est.")
    for column in columns:
        table.add_column(column, justify="right" if column in ("#", "images", "est.") else "left")
    left = 0.0
    unpriced = 0
    # Streamed: a 50,000-row prompt file is planned without holding its jobs, and expanded only for the rows shown.
    shown = list(islice(manifest.iter_jobs(), PLAN_ROWS_SHOWN))
    with opened(output_dir) as folder:
        for number, job in enumerate(manifest.priced_jobs(prices), 1):
            record = view.records.get(job.key)
            category = category_of(record, folder)
            price = estimate(job, prices)
            if category == "pending":
                left += price or 0.0
                unpriced += price is None
            if number <= len(shown):
                payload = shown[number - 1].input
                table.add_row(
                    str(number),
                    job.name,
                    *((job.model,) if several else ()),
                    str(payload.get("quality", "")),
                    str(payload.get("image_size", "")),
                    str(len(payload.get("image_urls", []))),
                    category.replace("_", " "),
                    "?" if price is None else f"{price:.3f}",
                )
    console.print(table)
    if manifest.count > PLAN_ROWS_SHOWN:
        console.print(f"… {manifest.count - PLAN_ROWS_SHOWN} more jobs not shown")
    sources = []
    for model in manifest.models:
        table_info = load_price_table(model, prices)
        if table_info:
            sources.append(f"{table_info.source}, as of {table_info.as_of}")
    source = f" (prices: {'; '.join(dict.fromkeys(sources))})" if sources else ""
    missing = f"; {unpriced} jobs have no price table" if unpriced else ""
    label = "sandbox: would cost about" if is_sandbox(view) else "estimated cost of what is left to submit:"
    console.print(f"{label} {_money(left)}{source}{missing}")
    if pending:
        console.print(_replacements_line(len(pending), _estimate_all(pending, prices), is_sandbox(view), again))
