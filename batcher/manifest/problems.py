"""How a manifest's problems are gathered: each once, where the user can fix it, at most `MAX_PROBLEMS`.

Loading a manifest reports everything wrong with it at once, so each check
adds what it finds here and goes on; `Problems.raise_if_any` turns the lot
into one `ManifestError`. A place in the manifest is a `YamlPath` (keys and
list indexes from the top), named in messages as ``jobs[1].quality``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

from ..errors import ManifestError, Problem

__all__ = ["MAX_PROBLEMS", "Problems", "YamlPath", "did_you_mean", "field_name", "shorten"]

MAX_PROBLEMS = 200
"""The most problems listed; past it they are counted ("and N more")."""

YamlPath = tuple[str | int, ...]


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


class Problems:
    """The problems found in one manifest (and its prompt files) so far."""

    def __init__(self, file: str, locate: Callable[[YamlPath], int | None]) -> None:
        self.file = file
        """The manifest: its problems are listed before its prompt files'."""
        self.line = locate
        """The line of a path in the manifest (or of the nearest enclosing value that has one)."""
        self._found: dict[tuple[str, int | None, str, str], Problem] = {}
        self._omitted = 0

    def __bool__(self) -> bool:
        return bool(self._found)

    def at(self, path: YamlPath, message: str) -> None:
        """A problem with the manifest's value at path."""
        self.add(Problem(self.file, self.line(path), field_name(path), message))

    def add(self, problem: Problem) -> None:
        # A bad default or template repeats over thousands of rows: report it once.
        identity = (problem.file, problem.line, problem.field, problem.message)
        if identity in self._found:
            return
        if len(self._found) >= MAX_PROBLEMS:
            self._omitted += 1
            return
        self._found[identity] = problem

    def raise_if_any(self) -> None:
        """Raise ManifestError listing every problem in file and line order, if any was found."""
        if self._found:
            ordered = sorted(self._found.values(), key=lambda p: (p.file != self.file, p.file, p.line or 0, p.field))
            raise ManifestError(ordered, omitted=self._omitted)
