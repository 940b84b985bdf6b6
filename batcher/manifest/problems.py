"""How a manifest's problems are gathered: each once, where the user can fix it, at most `MAX_PROBLEMS`.

Loading a manifest reports everything wrong with it at once, so each check
adds what it finds here and goes on; `Problems.raise_if_any` turns the lot
into one `ManifestError`. A place in the manifest is a `YamlPath` (keys and
list indexes from the top), named in messages as ``jobs[1].quality``.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path, PurePath

from ..errors import ManifestError, Problem

__all__ = [
    "MAX_PROBLEMS",
    "Alike",
    "Problems",
    "YamlPath",
    "did_you_mean",
    "did_you_mean_file",
    "field_name",
    "shorten",
]

MAX_PROBLEMS = 200
"""The most problems listed; past it they are counted ("and N more")."""

YamlPath = tuple[str | int, ...]
Alike = tuple[YamlPath, Hashable]
"""An entry, and a kind of problem its jobs may each have (`Problems.add`)."""


def field_name(path: YamlPath) -> str:
    """path as a message names it: ``("jobs", 1, "quality")`` is ``jobs[1].quality``."""
    return ".".join(f"[{p}]" if isinstance(p, int) else p for p in path).replace(".[", "[")


def shorten(value: object) -> str:
    """repr(value), cut to fit a message: a hostile value may be megabytes long."""
    shown = repr(value)
    return shown if len(shown) <= 40 else f"{shown[:30]}… ({len(str(value)):,} characters)"


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or nothing."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def did_you_mean_file(name: str, folder: Path, wanted: Callable[[Path], bool]) -> str:
    """`` (did you mean 'x'?)`` for the wanted file or folder beside where name (relative to folder) points
    whose name is closest, or nothing. At most `_MAX_LOOKED_AT` names are looked at."""
    relative = PurePath(name)
    try:
        beside = [p for p in itertools.islice((folder / relative).parent.iterdir(), _MAX_LOOKED_AT) if wanted(p)]
    except (OSError, ValueError):
        return ""
    close = difflib.get_close_matches(relative.name, [p.name for p in beside], n=1)
    if not close:
        return ""
    return f" (did you mean {(relative.parent / close[0]).as_posix()!r}?)"


_MAX_LOOKED_AT = 10_000


class Problems:
    """The problems found in one manifest (and its prompt files) so far."""

    def __init__(self, file: str, locate: Callable[[YamlPath], int | None]) -> None:
        self.file = file
        """The manifest: its problems are listed before its prompt files'."""
        self.line = locate
        """The line of a path in the manifest (or of the nearest enclosing value that has one)."""
        self._found: dict[tuple[str, int | None, str, str], Problem] = {}
        self._omitted = 0
        self._alike: dict[Alike, tuple[tuple[str, int | None, str, str], int]] = {}
        """For each kind of problem repeated across an entry's expansions: its first report, and how many."""

    def __bool__(self) -> bool:
        return bool(self._found)

    def at(self, path: YamlPath, message: str, *, alike: Alike | None = None) -> None:
        """A problem with the manifest's value at path (alike: as for `add`)."""
        self.add(Problem(self.file, self.line(path), field_name(path), message), alike=alike)

    def add(self, problem: Problem, *, alike: Alike | None = None) -> None:
        """Note problem, unless the same was noted already.

        alike is ``(entry, kind)`` for a problem that repeats over the jobs an
        entry expands to (one missing field in every row and matrix combination):
        only the first of a kind is listed, with how many jobs have it.
        """
        if alike is not None and alike in self._alike:
            first, count = self._alike[alike]
            self._alike[alike] = first, count + 1
            return
        # A bad default or template repeats over thousands of rows: report it once.
        identity = (problem.file, problem.line, problem.field, problem.message)
        if alike is not None:
            self._alike[alike] = identity, 1
        if identity in self._found:
            return
        if len(self._found) >= MAX_PROBLEMS:
            self._omitted += 1
            return
        self._found[identity] = problem

    def raise_if_any(self) -> None:
        """Raise ManifestError listing every problem in file and line order, if any was found."""
        if self._found:
            found = dict(self._found)
            for (entry, _kind), (first, count) in self._alike.items():
                if count > 1 and first in found:
                    message = (
                        f"{found[first].message}; the same in {count:,} jobs of {field_name(entry)} (the first shown)"
                    )
                    found[first] = dataclasses.replace(found[first], message=message)
            ordered = sorted(found.values(), key=lambda p: (p.file != self.file, p.file, p.line or 0, p.field))
            raise ManifestError(ordered, omitted=self._omitted)
