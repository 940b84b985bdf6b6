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

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
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


_SHORT = {"uncertain": "unc.", "cancelled": "canc.", "pending": "pend.", "running": "run.", "downloading": "dl."}
"""The words of the live line, abbreviated when the whole line does not fit the terminal."""
_BAR = 30


class ProgressView:
    """A rich renderable over a live `RunProgress`: counts, throughput, ETA, recent errors. The counts line fits
    the terminal's width (80 columns and up): the bar shrinks, zero counts of trouble go, then words are
    abbreviated; a count is never cut in the middle."""

    def __init__(self, progress: RunProgress) -> None:
        self.progress = progress

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.render(options.max_width)

    def _counts_line(self, width: int) -> Text:
        p = self.progress
        s = p.statuses
        done = s["done"]
        counts: list[tuple[str, int, str, bool]] = [  # word, count, style, shown when 0
            ("failed", s["failed"], "red" if s["failed"] else "dim", True),
            ("uncertain", s["uncertain"], "yellow" if s["uncertain"] else "dim", True),
            ("lost", s["lost"], "yellow", False),
            ("cancelled", s["cancelled"], "yellow", False),
            ("pending", s["pending"] + s["submitting"], "", True),
            ("queued", s["queued"], "", True),
            ("running", s["running"], "", True),
            ("downloading", s["downloading"], "", True),
        ]
        # (bar width, zero counts of trouble shown, words abbreviated): the first that fits is shown.
        tries = [(_BAR, True, False), (20, True, False), (20, False, False), (10, False, False), (10, False, True)]
        tries.append((0, False, True))
        line = Text()
        for bar, zeros, short in tries:
            parts = [
                (f"{count} {_SHORT.get(word, word) if short else word}", style)
                for word, count, style, always in counts
                if count or (always and (zeros or style == ""))
            ]
            line = self._assemble(done, p.total, bar, parts)
            if line.cell_len <= width:
                return line
        while line.cell_len > width and parts:  # narrower than any abbreviation: whole counts go, from the end
            parts = parts[:-1]
            line = self._assemble(done, p.total, 0, parts)
        return line

    @staticmethod
    def _assemble(done: int, total: int, bar: int, parts: list[tuple[str, str]]) -> Text:
        filled = int(bar * done / total) if total else bar
        pieces: list[str | tuple[str, str]] = []
        if bar:
            pieces.append(("█" * filled + "░" * (bar - filled), "green"))
            pieces.append(" ")
        pieces.append(f"{done}/{total}")
        for text, style in parts:
            pieces.append("  ")
            pieces.append((text, style) if style else text)
        return Text.assemble(*pieces)

    def render(self, width: int = 80) -> RenderableType:
        p = self.progress
        line = self._counts_line(width)
        timing = Text(f"elapsed {_clock(p.elapsed)}  ETA {_clock(p.eta())}  {_rate(p):.1f} jobs/min", style="dim")
        parts: list[RenderableType] = [line, timing]
        if p.stopping:
            parts.append(Text(printable(p.stopping, 300), style="yellow"))
        for error in p.recent_errors[-3:]:
            parts.append(Text(error[:200], style="red", no_wrap=True, overflow="ellipsis"))
        return Group(*parts)
