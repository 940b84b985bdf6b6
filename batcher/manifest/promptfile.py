"""Prompt files: jobs read row by row from a CSV or JSONL file beside the manifest.

CSV: a header row names the columns; each later row is a job, each cell a
field (or a placeholder's value), read as the type the model's schema gives
the field. An empty cell sets nothing. JSONL: one JSON object a line, values
taken as they are. Both are streamed and decoded line by line, so a bad byte
or a bad row is reported with its line and row number.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..confined import open_regular

__all__ = ["KINDS", "NO_ROW", "PromptFile", "Row", "from_text"]

KINDS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class Row:
    values: dict[str, Any]
    line: int | None = None
    number: int | None = None
    from_text: bool = False
    """CSV cells are text, to be read as the schema's type; JSON values keep theirs."""
    problem: str | None = None


NO_ROW = Row({})


class PromptFile:
    """A CSV (header row, one job a row) or JSONL (one JSON object a line) file of jobs."""

    def __init__(self, path: Path, display: str) -> None:
        self.path = path
        self.display = display
        self.kind = KINDS[path.suffix.lower()]

    def header(self) -> list[str] | None:
        """A CSV file's column names, or None for JSONL (whose rows name their own fields)."""
        if self.kind != "csv":
            return None
        for row in self.csv_rows(header_only=True):
            return list(row.values)
        return []

    def rows(self) -> Iterator[Row]:
        return self.csv_rows() if self.kind == "csv" else self._jsonl_rows()

    def line_bound(self) -> int:
        """At most how many rows the file holds: its lines (a row takes one line or more), counted in bytes."""
        with open_regular(self.path) as handle:
            return 1 + sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))

    def sha256(self) -> str:
        with open_regular(self.path) as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    def _lines(self, state: list[int]) -> Iterator[str]:
        # Decoded line by line so a bad byte is reported with its line number; state[0] is that number.
        with open_regular(self.path) as handle:
            for state[0], raw in enumerate(handle, 1):
                text = raw.decode("utf-8")
                yield text.removeprefix("\ufeff") if state[0] == 1 else text

    def _jsonl_rows(self) -> Iterator[Row]:
        position = [0]
        number = 0
        try:
            for text in self._lines(position):
                if not text.strip():
                    continue
                number += 1
                try:
                    values = json.loads(text)
                except ValueError as exc:
                    yield Row({}, position[0], number, problem=f"invalid JSON: {exc}")
                    continue
                if not isinstance(values, dict):
                    yield Row({}, position[0], number, problem="expected a JSON object of fields")
                    continue
                yield Row(values, position[0], number)
        except UnicodeDecodeError as exc:
            yield Row({}, position[0], None, problem=f"is not UTF-8 text ({exc.reason})")

    def csv_rows(self, *, header_only: bool = False) -> Iterator[Row]:
        position = [0]
        reader = csv.reader(self._lines(position), strict=True)
        try:
            header = next(reader, None)
            if header is None:
                yield Row(
                    {}, 1, None, problem="is empty: a CSV prompt file starts with a header row naming its columns"
                )
                return
            names = [cell.strip() for cell in header]
            bad = [n for n in names if not _COLUMN.match(n)]
            if bad or len(set(names)) != len(names):
                what = f"column name {bad[0]!r} is not a name" if bad else "the header names a column twice"
                yield Row({}, 1, None, problem=f"{what}: use letters, digits and '_'")
                return
            if header_only:
                yield Row(dict.fromkeys(names))
                return
            number = 0
            start = position[0] + 1
            for cells in reader:
                line, start = start, position[0] + 1
                if not any(cell.strip() for cell in cells):
                    continue
                number += 1
                if len(cells) != len(names):
                    problem = f"has {len(cells)} cells, the header has {len(names)}"
                    yield Row({}, line, number, problem=problem)
                    continue
                # An empty cell sets nothing: the entry's value or the default applies.
                yield Row({n: c for n, c in zip(names, cells, strict=True) if c != ""}, line, number, from_text=True)
        except UnicodeDecodeError as exc:
            yield Row({}, position[0], None, problem=f"is not UTF-8 text ({exc.reason})")
        except csv.Error as exc:
            yield Row({}, position[0], None, problem=f"is not valid CSV: {exc}")


def from_text(text: str, spec: dict[str, Any]) -> Any:
    """A CSV cell as the value its schema field expects; raises ValueError."""
    kind = spec.get("type")
    if kind == "array":
        stripped = text.strip()
        if stripped.startswith("["):
            return json.loads(stripped)
        return stripped.split()  # URLs hold no spaces: "a.jpg b.jpg" is a list of two
    if kind == "integer":
        return int(text)
    if kind == "number":
        return float(text)
    if kind == "boolean":
        lowered = text.strip().lower()
        if lowered in ("true", "yes", "1"):
            return True
        if lowered in ("false", "no", "0"):
            return False
        msg = f"expected true or false, got {text!r}"
        raise ValueError(msg)
    if kind == "object":
        return json.loads(text)
    return text
