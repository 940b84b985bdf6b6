"""What a person reads: the run summary, `status`, `plan`, and the live progress line.

Status comes from the journal alone (read without the run's lock), so it
works while a run is going and after it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from .cost import estimate, load_price_table
from .manifest import Manifest
from .runner import RunProgress, RunSummary, shard_folders
from .state import JOURNAL_NAME, FoldedJournal, JobRecord, category, read_journal

__all__ = [
    "JobStanding",
    "ProgressView",
    "StatusReport",
    "plain_progress_line",
    "print_plan",
    "print_status",
    "print_summary",
    "status_report",
]

CATEGORIES = ("done", "downloading", "in_flight", "pending", "failed", "uncertain")


@dataclass(slots=True)
class JobStanding:
    """One job as `status` shows it."""

    name: str
    key: str
    category: str
    phase: str
    request_id: str | None
    error: str | None
    estimate: float | None


@dataclass(slots=True)
class StatusReport:
    """Counts, problem jobs and money, for `batcher status` (and its --json)."""

    manifest: str
    journal: str
    total: int
    counts: dict[str, int]
    failed: list[JobStanding] = field(default_factory=list)
    uncertain: list[JobStanding] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    spent: float = 0.0
    to_spend: float = 0.0
    possible_extra_cost: float = 0.0
    warnings: list[str] = field(default_factory=list)
    journals: list[str] = field(default_factory=list)
    """Every journal summed: the folder's own and its shards'."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _category(record: JobRecord | None, output_dir: Path) -> str:
    """`category`, except that a done job whose files are gone shows as downloading (the next run fetches them)."""
    found = category(record)
    if (
        found == "done"
        and record is not None
        and not all((output_dir / f.path).is_file() for f in record.files.values())
    ):
        return "downloading"
    return found


def status_report(manifest: Manifest, output_dir: Path) -> StatusReport:
    """Where every job of manifest stands according to the journal in output_dir.

    Shard folders inside output_dir (``shard-K-of-N/``, from ``run --shard``)
    are read too and summed: gather the shards' folders from several machines
    under one output folder and `status` shows the whole manifest.
    """
    folders = [output_dir, *shard_folders(output_dir)]
    records: dict[str, tuple[JobRecord, Path]] = {}
    warnings: list[str] = []
    journals: list[str] = []
    for folder in folders:
        if not (folder / JOURNAL_NAME).is_file():
            continue
        folded = read_journal(folder / JOURNAL_NAME)
        journals.append(str(folder / JOURNAL_NAME))
        warnings += folded.warnings
        for key, found in folded.records.items():
            if key not in records or found.submits > records[key][0].submits:
                records[key] = (found, folder)
    counts = dict.fromkeys(CATEGORIES, 0)
    report = StatusReport(
        manifest=str(manifest.path),
        journal=journals[0] if journals else str(output_dir / JOURNAL_NAME),
        total=manifest.count,
        counts=counts,
        warnings=warnings,
        journals=journals,
    )
    keys: set[str] = set()
    for job in manifest.iter_jobs():
        keys.add(job.key)
        record: JobRecord | None
        record, folder = records.get(job.key, (None, output_dir))
        category = _category(record, folder)
        counts[category] += 1
        price = estimate(job, manifest.schema_dirs)
        if record is not None and record.cost:
            report.spent += record.cost
        if category == "pending" and price:
            report.to_spend += price
        standing = JobStanding(
            name=job.name,
            key=job.key,
            category=category,
            phase=record.phase if record else "pending",
            request_id=record.request_id if record else None,
            error=record.error if record else None,
            estimate=price,
        )
        if category == "failed":
            report.failed.append(standing)
        elif category == "uncertain":
            report.uncertain.append(standing)
            report.possible_extra_cost += price or 0.0
    report.orphans = sorted(r.name or r.key for k, (r, _) in records.items() if k not in keys)
    return report


def _money(value: float) -> str:
    return f"${value:,.2f}"


def print_status(console: Console, report: StatusReport) -> None:
    console.print(f"{report.manifest}: {report.total} jobs")
    if len(report.journals) > 1:
        console.print(f"summed over {len(report.journals)} journals: " + ", ".join(report.journals))
    table = Table()
    table.add_column("state")
    table.add_column("jobs", justify="right")
    for name in CATEGORIES:
        table.add_row(name.replace("_", " "), str(report.counts[name]))
    console.print(table)
    console.print(
        f"spent {_money(report.spent)} (as RunComfy reported), still to spend about {_money(report.to_spend)}"
    )
    _print_problems(console, report.failed, report.uncertain, report.possible_extra_cost, report.orphans)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


def _print_problems(
    console: Console,
    failed: list[JobStanding],
    uncertain: list[JobStanding],
    extra: float,
    orphans: list[str],
) -> None:
    if failed:
        console.print(f"\n[red]{len(failed)} failed[/] (run again with --retry-failed to submit them again):")
        for job in failed[:50]:
            console.print(f"  {job.name}: {job.error or job.phase}", markup=False)
        if len(failed) > 50:
            console.print(f"  … and {len(failed) - 50} more (batcher status --json lists all)")
    if uncertain:
        console.print(
            f"\n[yellow]{len(uncertain)} uncertain[/]: their submits may have been accepted and charged, "
            f"but no answer was recorded. Resubmitting could cost up to {_money(extra)} more. "
            "Check your RunComfy dashboard, then run again with --resubmit-uncertain if you want them."
        )
        for job in uncertain[:50]:
            console.print(f"  {job.name}: {job.error or ''}", markup=False)
    if orphans:
        console.print(
            f"\n{len(orphans)} job(s) in the journal are no longer in the manifest (left alone): "
            + ", ".join(orphans[:10])
        )


def print_summary(console: Console, summary: RunSummary) -> None:
    """The closing lines of `batcher run`."""
    parts = [f"{summary.done}/{summary.total} done"]
    if summary.failed:
        parts.append(f"{len(summary.failed)} failed")
    if summary.uncertain:
        parts.append(f"{len(summary.uncertain)} uncertain")
    if summary.unfinished:
        parts.append(f"{len(summary.unfinished)} not finished")
    console.print(", ".join(parts) + f"; spent {_money(summary.spent)}. Output: {summary.output_dir}")
    standings = [JobStanding(o.name, o.key, "failed", o.phase, o.request_id, o.error, None) for o in summary.failed]
    unsure = [JobStanding(o.name, o.key, "uncertain", o.phase, o.request_id, o.error, None) for o in summary.uncertain]
    _print_problems(console, standings, unsure, summary.possible_extra_cost, summary.orphans)
    if summary.stop_reason and not summary.interrupted:
        console.print(f"\nstopped submitting: {summary.stop_reason}")
    if summary.interrupted or summary.unfinished:
        console.print("\nRun the same command again to resume: nothing already submitted is sent again.")


PLAN_ROWS_SHOWN = 200


def print_plan(console: Console, manifest: Manifest, folded: FoldedJournal, output_dir: Path) -> None:
    several = len(manifest.models) > 1
    models = ", ".join(manifest.models)
    table = Table(title=f"{manifest.path}: {manifest.count} jobs for {models}", title_justify="left")
    columns = ("#", "job", *(("model",) if several else ()), "quality", "size", "images", "state", "est.")
    for column in columns:
        table.add_column(column, justify="right" if column in ("#", "images", "est.") else "left")
    left = 0.0
    unpriced = 0
    # Streamed: a 50,000-row prompt file is planned without holding its jobs.
    for number, job in enumerate(manifest.iter_jobs(), 1):
        record = folded.records.get(job.key)
        category = _category(record, output_dir)
        price = estimate(job, manifest.schema_dirs)
        if category == "pending":
            left += price or 0.0
            unpriced += price is None
        if number <= PLAN_ROWS_SHOWN:
            table.add_row(
                str(number),
                job.name,
                *((job.model,) if several else ()),
                str(job.input.get("quality", "")),
                str(job.input.get("image_size", "")),
                str(len(job.input.get("image_urls", []))),
                category.replace("_", " "),
                "?" if price is None else f"{price:.3f}",
            )
    console.print(table)
    if manifest.count > PLAN_ROWS_SHOWN:
        console.print(f"… {manifest.count - PLAN_ROWS_SHOWN} more jobs not shown")
    sources = []
    for model in manifest.models:
        table_info = load_price_table(model, manifest.schema_dirs)
        if table_info:
            sources.append(f"{table_info.source}, as of {table_info.as_of}")
    source = f" (prices: {'; '.join(dict.fromkeys(sources))})" if sources else ""
    missing = f"; {unpriced} jobs have no price table" if unpriced else ""
    console.print(f"estimated cost of what is left to submit: {_money(left)}{source}{missing}")


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def plain_progress_line(progress: RunProgress) -> str:
    """One line for logs and non-terminals."""
    s = progress.statuses
    rate = progress.finished_this_run / progress.elapsed * 60 if progress.elapsed > 0 else 0.0
    return (
        f"[{_clock(progress.elapsed)}] {s['done']}/{progress.total} done, {s['failed']} failed, "
        f"{s['uncertain']} uncertain, {s['queued']} queued, {s['running']} running, "
        f"{s['downloading']} downloading, {s['waiting'] + s['submitting']} waiting; "
        f"{rate:.1f} jobs/min, ETA {_clock(progress.eta())}" + (f" — {progress.stopping}" if progress.stopping else "")
    )


class ProgressView:
    """A rich renderable over a live `RunProgress`: counts, throughput, ETA, recent errors."""

    def __init__(self, progress: RunProgress) -> None:
        self.progress = progress

    def __rich__(self) -> RenderableType:
        p = self.progress
        s = p.statuses
        done = s["done"]
        width = 30
        filled = int(width * done / p.total) if p.total else width
        bar = Text("█" * filled + "░" * (width - filled), style="green")
        line = Text.assemble(
            bar,
            f" {done}/{p.total}  ",
            (f"{s['failed']} failed  ", "red" if s["failed"] else "dim"),
            (f"{s['uncertain']} uncertain  ", "yellow" if s["uncertain"] else "dim"),
            f"{s['waiting'] + s['submitting']} waiting  {s['queued']} queued  {s['running']} running  "
            f"{s['downloading']} downloading",
        )
        rate = p.finished_this_run / p.elapsed * 60 if p.elapsed > 0 else 0.0
        timing = Text(f"elapsed {_clock(p.elapsed)}  ETA {_clock(p.eta())}  {rate:.1f} jobs/min", style="dim")
        parts: list[RenderableType] = [line, timing]
        if p.stopping:
            parts.append(Text(p.stopping, style="yellow"))
        for error in p.recent_errors[-3:]:
            parts.append(Text(error[:200], style="red", no_wrap=True, overflow="ellipsis"))
        return Group(*parts)
