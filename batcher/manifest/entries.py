"""What each item of a manifest's ``jobs:`` says, checked on its own before any job is expanded.

An entry sets input fields, and may name its ``id``, ``repeat`` and
``model``; a ``matrix`` (one job per combination of its lists) or a
``from:`` prompt file (one job per row) gives it variables, which its
``{placeholders}`` must name. What is wrong with an entry is reported on it,
and an entry that cannot be expanded soundly is dropped (`read_entry`
returns None) rather than left to add noise about missing fields.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..confined import open_regular
from ..errors import Problem
from .folder import Confinement
from .problems import Problems, YamlPath, did_you_mean, did_you_mean_file
from .promptfile import KINDS, PromptFile
from .template import placeholders

__all__ = [
    "ENTRY_CONTROL_KEYS",
    "MAX_COMBINATIONS",
    "ROW_CONTROL_KEYS",
    "Combination",
    "Entry",
    "read_entry",
]

ROW_CONTROL_KEYS = ("id", "repeat", "model")
"""What a prompt-file column or a matrix variable may set besides input fields."""
ENTRY_CONTROL_KEYS = (*ROW_CONTROL_KEYS, "matrix", "from")
"""What an entry may set besides input fields."""
MAX_COMBINATIONS = 100_000
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class Combination:
    """One combination of a matrix: its values, and how messages name it (``animal=cat, city=Paris``)."""

    values: dict[str, Any]
    label: str


@dataclass(slots=True)
class Entry:
    """One item of ``jobs:``, checked on its own: what it sets and where its variables come from."""

    path: YamlPath
    fields: dict[str, Any]
    id: Any
    repeat: Any
    model: Any
    combinations: list[Combination] | None
    prompt_file: PromptFile | None
    placeholders: set[str]
    folder: Path
    """The manifest's folder: local images are relative to it (a prompt file's rows' too)."""

    @property
    def templated(self) -> bool:
        """Whether a matrix or a prompt file gives the entry variables to fill its placeholders with."""
        return self.combinations is not None or self.prompt_file is not None


def read_entry(
    problems: Problems, index: int, item: object, folder: Path, confined: Confinement | None
) -> Entry | None:
    """Item index of ``jobs:``, checked; None when it cannot be expanded soundly (its problems are reported)."""
    where: YamlPath = ("jobs", index)
    if not isinstance(item, dict):
        problems.at(where, "expected a mapping with at least 'prompt' and 'image_urls' (or 'from' a prompt file)")
        return None
    combinations = _matrix(problems, (*where, "matrix"), item["matrix"]) if "matrix" in item else None
    prompt_file = _prompt_file(problems, (*where, "from"), item["from"], folder, confined) if "from" in item else None
    if ("matrix" in item and combinations is None) or ("from" in item and prompt_file is None):
        return None  # reported above; expanding it anyway would only add noise about missing fields
    entry = Entry(
        path=where,
        fields={k: v for k, v in item.items() if k not in ENTRY_CONTROL_KEYS},
        id=item.get("id"),
        repeat=item.get("repeat", 1),
        model=item.get("model"),
        combinations=combinations,
        prompt_file=prompt_file,
        placeholders=set(),
        folder=folder,
    )
    if not entry.templated:
        return entry
    return entry if _placeholders_known(problems, entry, _variables(problems, entry)) else None


def _variables(problems: Problems, entry: Entry) -> set[str] | None:
    """The names entry's matrix and prompt file give its placeholders; None when each row names its own (JSONL)."""
    variables: set[str] = set()
    if entry.combinations:
        variables = set().union(*(c.values for c in entry.combinations))
    if entry.prompt_file is None:
        return variables
    header = entry.prompt_file.header()
    if header is None:
        return None  # JSONL: each row names its own fields; placeholders are checked row by row
    for clash in sorted(variables & set(header)):
        problems.at((*entry.path, "matrix", clash), f"{clash!r} is also a column of {entry.prompt_file.display}")
    return variables | set(header)


def _placeholders_known(problems: Problems, entry: Entry, variables: set[str] | None) -> bool:
    """Notes the placeholders entry's fields and id use; whether variables give them all (None: the rows will say)."""
    templated = {**entry.fields, **({"id": entry.id} if isinstance(entry.id, str) else {})}
    sound = True
    for name, value in templated.items():
        used = placeholders(value)
        entry.placeholders |= used
        if variables is None:
            continue
        for unknown in sorted(used - variables):
            sound = False
            problems.at(
                (*entry.path, name),
                f"unknown placeholder {{{unknown}}}{did_you_mean(unknown, variables)}; "
                f"the matrix and prompt file give: {', '.join(sorted(variables)) or 'nothing'}",
            )
    return sound


def _matrix(problems: Problems, where: YamlPath, value: object) -> list[Combination] | None:
    """Every combination of the matrix's lists, less `exclude`, plus `include` (as CI matrices do)."""
    if not isinstance(value, dict) or not value:
        problems.at(where, "expected a mapping of names to lists of values, with optional 'include' and 'exclude'")
        return None
    axes: dict[str, list[Any]] = {}
    for name, values in value.items():
        if name in ("include", "exclude"):
            continue
        if not isinstance(name, str) or not _VARIABLE.match(name):
            problems.at((*where, name), "a matrix name uses letters, digits and '_', not starting with a digit")
        elif not isinstance(values, list) or not values:
            problems.at((*where, name), "expected a non-empty list of values")
        else:
            axes[name] = values
    extra: dict[str, list[dict[str, Any]]] = {}
    for special in ("include", "exclude"):
        listed = value.get(special, [])
        if not isinstance(listed, list) or not all(isinstance(e, dict) and e for e in listed):
            problems.at((*where, special), "expected a list of mappings of matrix names to values")
            listed = []
        extra[special] = listed
    for index, excluded in enumerate(extra["exclude"]):
        for name in excluded:
            if name not in axes:
                problems.at(
                    (*where, "exclude", index, name), f"{name!r} is not a matrix name{did_you_mean(name, axes)}"
                )
    size = 1
    for values in axes.values():
        size *= len(values)
    if size > MAX_COMBINATIONS:
        problems.at(where, f"expands to {size:,} combinations; more than {MAX_COMBINATIONS:,} belongs in a prompt file")
        return None

    combinations = (
        [dict(zip(axes, chosen, strict=True)) for chosen in itertools.product(*axes.values())] if axes else []
    )
    combinations = [c for c in combinations if not any(_matches(c, e) for e in extra["exclude"])]
    for included in extra["include"]:
        # Like GitHub Actions: extend every combination the entry agrees with, else add it as a new one.
        agreeing = [c for c in combinations if all(c[k] == v for k, v in included.items() if k in axes)]
        if agreeing and any(k not in axes for k in included):
            for combination in agreeing:
                combination.update({k: v for k, v in included.items() if k not in axes})
        elif not agreeing:
            combinations.append(dict(included))
    return [Combination(c, ", ".join(f"{k}={v}" for k, v in c.items())) for c in combinations]


def _matches(combination: dict[str, Any], pattern: dict[str, Any]) -> bool:
    return all(combination.get(k) == v for k, v in pattern.items())


def _prompt_file(
    problems: Problems, where: YamlPath, value: object, folder: Path, confined: Confinement | None
) -> PromptFile | None:
    """The entry's ``from:`` file, if it is a readable prompt file inside the manifest's folder with a sound header."""
    if not isinstance(value, str) or not value:
        problems.at(where, "expected the path of a .csv or .jsonl prompt file, relative to the manifest")
        return None
    path = folder / value
    if path.suffix.lower() not in KINDS:
        problems.at(where, f"{value!r}: a prompt file ends in .csv, .jsonl or .ndjson")
        return None
    if confined is not None and confined.escapes(path):  # checked first: whether it exists is none of its business
        problems.at(where, confined.refusal(repr(value)))
        return None
    if not path.exists():
        hint = did_you_mean_file(value, folder, _is_prompt_file)
        problems.at(where, f"no prompt file {path}{hint} (prompt files are relative to the manifest)")
        return None
    try:
        open_regular(path).close()  # a FIFO or a folder is refused, never waited on
    except OSError as exc:
        problems.at(where, f"cannot read {path}: {exc.strerror}")
        return None
    display = str(path)
    prompt_file = PromptFile(path, display)
    for row in prompt_file.csv_rows(header_only=True) if prompt_file.kind == "csv" else ():
        if row.problem:
            problems.add(Problem(display, row.line, "", row.problem))
            return None
    return prompt_file


def _is_prompt_file(path: Path) -> bool:
    return path.suffix.lower() in KINDS and path.is_file()
