"""What the user sees while a run goes: live counts, throughput, ETA and the last few errors.

`RunProgress` is written by the run's workers and read, at any time, by a
display: a rich renderable on a terminal (`ProgressView`), one plain line
every few seconds elsewhere (`plain_progress_line`). The words are the ones
`plan` and `status` use: *pending* (not sent yet), *in flight* (queued or
running at RunComfy), *downloading*, *done*, *failed*, *uncertain*, *lost*.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from rich.console import Group, RenderableType
from rich.text import Text

from ..lifecycle import JobStatus
from ..printable import printable

__all__ = ["ProgressView", "RunProgress", "plain_progress_line"]

_ENDED: frozenset[JobStatus] = frozenset({"done", "refused", "failed", "cancelled", "lost", "held"})
_FINISHED: frozenset[JobStatus] = _ENDED - {"held"}
"""Counted as finished this run (throughput, ETA): every end but a hold, which only stops waiting."""
_LEFT: tuple[JobStatus, ...] = ("pending", "submitting", "queued", "running", "downloading")


@dataclass(slots=True)
class RunProgress:
    """Live counts for a progress display; read it from another task at any time."""

    total: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    finished_this_run: int = 0
    recent_errors: list[str] = field(default_factory=list)
    stopping: str | None = None
    status_of: dict[str, JobStatus] = field(default_factory=dict)

    def set(self, key: str, status: JobStatus) -> None:
        old = self.status_of.get(key)
        if old == status:
            return
        if old is not None:
            self.statuses[old] -= 1
        self.statuses[status] += 1
        self.status_of[key] = status
        if status in _FINISHED and old is not None and old not in _ENDED:
            self.finished_this_run += 1

    def settle(self, key: str) -> None:
        """The run is done with key: its status stays counted, but is no longer held by key (100,000
        finished jobs would otherwise keep 100,000 entries). Only for a job nothing will set again."""
        if self.status_of.get(key) in _ENDED:
            del self.status_of[key]

    def error(self, name: str, message: str) -> None:
        # Shown on a live terminal: whatever a server put in it is made printable first.
        self.recent_errors = [*self.recent_errors[-4:], printable(f"{name}: {message}", 300)]

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def eta(self) -> float | None:
        left = sum(self.statuses[s] for s in _LEFT)
        if not self.finished_this_run or not left:
            return None
        return self.elapsed / self.finished_this_run * left


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def _rate(progress: RunProgress) -> float:
    return progress.finished_this_run / progress.elapsed * 60 if progress.elapsed > 0 else 0.0


def plain_progress_line(progress: RunProgress) -> str:
    """One line for logs and non-terminals."""
    s = progress.statuses
    lost = f"{s['lost']} lost, " if s["lost"] else ""
    lost += f"{s['refused']} refused, " if s["refused"] else ""
    lost += f"{s['cancelled']} cancelled, " if s["cancelled"] else ""
    return (
        f"[{_clock(progress.elapsed)}] {s['done']}/{progress.total} done, {s['failed']} failed, "
        f"{s['uncertain']} uncertain, {lost}{s['pending'] + s['submitting']} pending, "
        f"{s['queued'] + s['running']} in flight ({s['queued']} queued, {s['running']} running), "
        f"{s['downloading']} downloading; {_rate(progress):.1f} jobs/min, ETA {_clock(progress.eta())}"
        + (f" — {progress.stopping}" if progress.stopping else "")
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
            *([(f"{s['lost']} lost  ", "yellow")] if s["lost"] else []),
            *([(f"{s['cancelled']} cancelled  ", "yellow")] if s["cancelled"] else []),
            f"{s['pending'] + s['submitting']} pending  {s['queued']} queued  {s['running']} running  "
            f"{s['downloading']} downloading",
        )
        timing = Text(f"elapsed {_clock(p.elapsed)}  ETA {_clock(p.eta())}  {_rate(p):.1f} jobs/min", style="dim")
        parts: list[RenderableType] = [line, timing]
        if p.stopping:
            parts.append(Text(printable(p.stopping, 300), style="yellow"))
        for error in p.recent_errors[-3:]:
            parts.append(Text(error[:200], style="red", no_wrap=True, overflow="ellipsis"))
        return Group(*parts)
