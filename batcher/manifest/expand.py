"""What jobs each checked entry expands to, within the job cap; and, while loading, whether each is valid.

Every combination of an entry's matrix, for every row of its prompt file,
is filled in (defaults, then the entry's fields, then the variables), its
schema defaults added, its local images checked and replaced by references
(`batcher.manifest.localimages`), and repeated ``repeat`` times; each repeat is a `Job`
with its own identity. The manifest's job count is computed before an entry
is expanded and capped at `MAX_JOBS` (raised with `set_max_jobs`, ``--max-jobs``
or ``BATCHER_MAX_JOBS``), so a few hundred bytes cannot ask for billions of jobs.
A problem is placed where the user can fix it: the row, the matrix, the entry
or the defaults.
"""

from __future__ import annotations

import os
import re
from array import array
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from ..errors import Problem, UsageError
from .entries import ROW_CONTROL_KEYS, Combination, Entry
from .folder import Confinement
from .job import Job, job_key, slug_name
from .jobtable import JobTable
from .localimages import LocalImages, Normalised, identity_form
from .problems import Problems, YamlPath, shorten
from .promptfile import NO_ROW, PromptFile, Row, from_text
from .schema import ModelSchema, load_model_schema
from .template import placeholders, render, renders

__all__ = ["MAX_JOBS", "MAX_JOBS_ENV", "MAX_REPEAT", "Expander", "job_cap", "set_max_jobs"]

MAX_JOBS = 1_000_000
"""The most jobs a manifest may expand to, unless raised (`load_manifest`'s max_jobs)."""
MAX_JOBS_ENV = "BATCHER_MAX_JOBS"
MAX_REPEAT = 10_000
_DIGITS = re.compile(r"^[0-9]{1,9}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

_max_jobs: ContextVar[int | None] = ContextVar("batcher_max_jobs", default=None)


def set_max_jobs(value: int | None) -> Callable[[], None]:
    """Cap the jobs of later `load_manifest` calls in this context that pass no max_jobs (the CLI's --max-jobs).

    Returns the function that puts the previous cap back.
    """
    token = _max_jobs.set(value)
    return lambda: _max_jobs.reset(token)


def job_cap(max_jobs: int | None) -> int:
    """The job cap: max_jobs if given, else `set_max_jobs`'s, else env BATCHER_MAX_JOBS's, else MAX_JOBS."""
    if max_jobs is None:
        max_jobs = _max_jobs.get()
    if max_jobs is None:
        raw = os.environ.get(MAX_JOBS_ENV, "").strip()
        if raw and not re.fullmatch(r"[0-9]{1,15}", raw):
            msg = f"{MAX_JOBS_ENV}={raw!r} is not a number of jobs; give a whole number like 5000000"
            raise UsageError(msg)
        max_jobs = int(raw) if raw else MAX_JOBS
    if max_jobs < 1:
        msg = f"the job cap must be at least 1, got {max_jobs}"
        raise UsageError(msg)
    return max_jobs


class Expander:
    """Turns checked entries into jobs; `jobs(check=True)` also validates each one and records problems."""

    def __init__(
        self,
        problems: Problems,
        schema_dirs: Sequence[Path],
        model: str | None,
        defaults: dict[str, Any],
        entries: Callable[[], Iterator[Entry]],
        *,
        max_jobs: int,
        confined: Confinement | None = None,
        own_schema_dirs: Sequence[Path] = (),
    ) -> None:
        self.problems = problems
        self.schema_dirs = tuple(schema_dirs)
        self.model = model
        self.defaults = defaults
        self.entries = entries
        self.max_jobs = max_jobs
        self.confined = confined
        """Where the manifest's own schema folders must stay; None when files outside are allowed."""
        self.own_schema_dirs = tuple(own_schema_dirs)
        self.planned = 0
        """Jobs counted (not expanded) so far by the check, for the cap."""
        self._bounded: list[tuple[Entry, int]] = []
        """Entries counted in `planned` by their upper bound (`_row_bound`), not exactly."""
        self._schemas: dict[str, tuple[ModelSchema | None, str]] = {}
        self.models: dict[str, None] = {}
        self.count = 0
        # Where each job came from, packed into one int (file index, line): the only
        # per-job memory of a load, so that 50,000 rows cost a few MB, not the jobs.
        self._keys: dict[int, int] = {}
        self._names: dict[str, int] = {}
        self._sources: dict[str, int] = {}
        self.prompt_files: list[PromptFile] = []
        """Every prompt file read by the check, for the manifest's hash."""
        self.local_images = LocalImages(confined)
        """Checks each local image once per load; `iter_jobs` reuses what the check found."""
        self.table: JobTable | None = JobTable(self.schema_dirs)
        """What the views need of each checked job (`batcher.manifest.jobtable`); None: not kept."""

    def schema(self, model: str) -> tuple[ModelSchema | None, str]:
        """The model's schema, or None and why not."""
        if model not in self._schemas:
            escaping = self.confined.schema_file(model, self.own_schema_dirs) if self.confined else None
            if escaping is not None:
                self._schemas[model] = (None, escaping)
                return self._schemas[model]
            try:
                self._schemas[model] = (load_model_schema(model, self.schema_dirs), "")
            except UsageError as exc:
                self._schemas[model] = (None, str(exc))
        return self._schemas[model]

    def jobs(self, *, check: bool) -> Iterator[Job]:
        for job in self._jobs(check=check, build=True):
            assert job is not None
            yield job

    def check(self) -> None:
        """The load's checked pass: every job validated, counted and noted, none built (a `Job` a row is
        a tenth of the pass, and the load keeps none of them)."""
        for _ in self._jobs(check=True, build=False):
            pass

    def _jobs(self, *, check: bool, build: bool) -> Iterator[Job | None]:
        for entry in self.entries():
            if check and not self._within_cap(entry):
                return  # expanding on would only burn time and memory before the same refusal
            if check and entry.prompt_file is not None:
                self.prompt_files.append(entry.prompt_file)
            rows: Iterable[Row] = entry.prompt_file.rows() if entry.prompt_file else (NO_ROW,)
            combinations = entry.combinations or [Combination({}, "")]
            # A prompt file's entry without a placeholder: every row shares the entry's own values, unrendered.
            rendered = entry.templated and (renders(entry.fields) or renders(entry.id))
            for row in rows:
                if row.problem is not None:
                    if check:
                        assert entry.prompt_file is not None
                        where = f"row {row.number}" if row.number else ""
                        self.problems.add(Problem(entry.prompt_file.display, row.line, where, row.problem))
                    continue
                for combination in combinations:
                    yield from self._expand(entry, row, combination, check=check, rendered=rendered, build=build)

    def _within_cap(self, entry: Entry) -> bool:
        """Counts entry's jobs before it is expanded; past the cap, reports it on the entry's line."""
        bound = _row_bound(entry)
        if bound is not None and self.planned + bound <= self.max_jobs:
            self.planned += bound  # within the cap even at most: no need to read the rows to count them
            self._bounded.append((entry, bound))
            return True
        for earlier, most in self._bounded:  # counted exactly now: the cap and its message see the real count
            self.planned += _planned_jobs(earlier, most)[0] - most
        self._bounded = []
        jobs, exact = _planned_jobs(entry, self.max_jobs - self.planned)
        self.planned += jobs
        if self.planned <= self.max_jobs:
            return True
        more = "" if exact else "at least "
        whole = (
            f"expands to {more}{jobs:,} jobs"
            if self.planned == jobs
            else f"brings the manifest to {more}{self.planned:,} jobs (this entry: {more}{jobs:,})"
        )
        self.problems.at(
            entry.path,
            f"{whole}, past the cap of {self.max_jobs:,} jobs a manifest may expand to; if you mean it, "
            f"raise the cap with --max-jobs N ({MAX_JOBS_ENV}=N, or load_manifest(max_jobs=N))",
        )
        return False

    def _expand(
        self, entry: Entry, row: Row, combination: Combination, *, check: bool, rendered: bool, build: bool
    ) -> Iterator[Job | None]:
        """The jobs of one row and one combination of entry: one per repeat (rendered: its fields and id hold
        placeholders to fill; build: each a `Job`, else None once it is checked)."""
        variables = {**combination.values, **row.values}
        blame = _Blame(self.problems, entry, row, combination)
        found = self._model_schema(entry, variables, blame)
        if found is None:
            return
        model, schema = found
        from_variables = _variable_fields(entry, row, variables, schema, blame)
        if from_variables is None:
            return
        try:
            fields = render(entry.fields, variables) if rendered else entry.fields
            raw_id = render(entry.id, variables) if rendered and isinstance(entry.id, str) else entry.id
        except KeyError as exc:
            blame.whole(f"no value for the placeholder {{{exc.args[0]}}}")
            return
        raw_id = variables.get("id", raw_id)
        local = self.local_images.normalise(
            schema, schema.with_defaults({**self.defaults, **fields, **from_variables}), entry.folder
        )
        filled = local.input

        failed = check and not self._valid(schema, local, raw_id, fields, from_variables, blame)
        given = variables.get("repeat", entry.repeat)
        repeat = _repeats(given, from_text=row.from_text and "repeat" in row.values)
        if repeat is None:
            if check:
                blame.control("repeat", f"expected a whole number from 1 to {MAX_REPEAT:,}, got {shorten(given)}")
            return
        if failed:
            return

        source, line = blame.origin()
        identity = identity_form(filled, local.source)
        for repeat_index in range(repeat):
            key = job_key(model, identity, repeat_index)
            if raw_id:
                name = raw_id if repeat == 1 else f"{raw_id}-{repeat_index + 1}"
            else:
                name = slug_name(str(filled.get("prompt", "")), key)
            if check:
                if not self._register(key, name if raw_id else None, model, (source, line), blame):
                    continue
                if self.table is not None:
                    self.table.add(name, model, filled)
            yield Job(key, name, model, filled, repeat_index, line, source, local.source) if build else None

    def _model_schema(self, entry: Entry, variables: dict[str, Any], blame: _Blame) -> tuple[str, ModelSchema] | None:
        """The job's model (a variable's, else the entry's, else the manifest's) and its schema; None if reported."""
        model = variables.get("model", entry.model if entry.model is not None else self.model)
        if model is None:
            blame.control("model", "no model: give the manifest a 'model', or this job one")
            return None
        if not isinstance(model, str) or not model:
            blame.control("model", f"expected a model id, got {model!r}")
            return None
        schema, unknown = self.schema(model)
        if schema is None:
            if "model" in variables or entry.model is not None:
                blame.control("model", unknown)
            else:
                self.problems.at(("model",), unknown)
            return None
        return model, schema

    def _valid(
        self,
        schema: ModelSchema,
        local: Normalised,
        raw_id: object,
        fields: dict[str, Any],
        from_variables: dict[str, Any],
        blame: _Blame,
    ) -> bool:
        """Whether the filled input fits the schema, its local images are sound and the id is usable.

        Each problem is reported where it is fixed. The schema sees each local
        image as the data URI it will be sent as (`localimages.STAND_IN`).
        """
        valid = True
        for dotted, message in local.problems:
            blame.field(dotted, message, fields, from_variables, self.defaults)
            valid = False
        for error in schema.validate(local.for_schema):
            blame.field(error.field, error.message, fields, from_variables, self.defaults)
            valid = False
        if raw_id is not None and (not isinstance(raw_id, str) or not _JOB_ID.match(raw_id)):
            blame.control(
                "id",
                f"{raw_id!r} is not a usable job id: use 1-100 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit",
            )
            valid = False
        return valid

    def _register(self, key: str, named: str | None, model: str, origin: tuple[str, int | None], blame: _Blame) -> bool:
        """Counts a checked job, noting its key (and its id's name); False, reported, when either is taken."""
        source, line = origin
        packed_key = int(key, 16)
        if packed_key in self._keys:
            blame.whole(
                f"same input as the job {self._at(self._keys[packed_key], source)}; "
                "use 'repeat: N' for more generations of one input"
            )
            return False
        if named is not None and named in self._names:
            blame.control("id", f"job id {named!r} is already used {self._at(self._names[named], source)}")
            return False
        packed = self._sources.setdefault(source, len(self._sources)) << 32 | (line or 0)
        self._keys[packed_key] = packed
        if named is not None:  # a slug holds 12 characters of the key: unique as the key is
            self._names[named] = packed
        self.models[model] = None
        self.count += 1
        return True

    def loaded_keys(self) -> array[int]:
        """The key of every job the check registered, in manifest order; the check's own tables are
        let go (a streamed expansion never looks them up), so a loaded manifest keeps 8 bytes a job."""
        keys = array("Q", self._keys)
        self._keys, self._names, self._sources = {}, {}, {}
        return keys

    def _at(self, origin: int, here: str) -> str:
        source = next(name for name, index in self._sources.items() if index == origin >> 32)
        line = origin & 0xFFFFFFFF
        return f"on line {line}" if source == here else f"at {source}:{line}"


def _variable_fields(
    entry: Entry, row: Row, variables: dict[str, Any], schema: ModelSchema, blame: _Blame
) -> dict[str, Any] | None:
    """The input fields the row and combination set directly, CSV cells read as the schema's types; None if reported.

    Control names (id, repeat, model) set no field, nor does a variable only used in placeholders.
    """
    fields: dict[str, Any] = {}
    for name, value in variables.items():
        if name in ROW_CONTROL_KEYS or (name in entry.placeholders and name not in schema.properties):
            continue
        if row.from_text and name in row.values:
            try:
                value = from_text(value, schema.properties.get(name, {}))
            except ValueError as exc:
                blame.variable(name, f"cannot read {value!r}: {exc}")
                return None
        fields[name] = value
    return fields


def _repeats(value: Any, *, from_text: bool) -> int | None:
    """value as a number of generations (1 to MAX_REPEAT), or None when it is not one."""
    if from_text and isinstance(value, str) and _DIGITS.match(value.strip()):
        value = int(value)  # a CSV cell; no more than 9 ASCII digits, so never a 5,000-digit int()
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REPEAT:
        return None
    return value


def _row_bound(entry: Entry) -> int | None:
    """At most how many jobs a CSV prompt file's entry makes, from its lines, without reading its rows;
    None when a row may set its own repeat (a ``repeat`` column) or the rows are not a CSV file's."""
    prompt_file = entry.prompt_file
    if prompt_file is None or prompt_file.kind != "csv":
        return None
    combinations = entry.combinations or [Combination({}, "")]
    per_row = sum(_repeats(c.values.get("repeat", entry.repeat), from_text=False) or 0 for c in combinations)
    try:
        return None if "repeat" in (prompt_file.header() or ()) else per_row * prompt_file.line_bound()
    except OSError:
        return None  # counted row by row, as before, which meets the same error where it is reported


def _planned_jobs(entry: Entry, limit: int) -> tuple[int, bool]:
    """How many jobs entry expands to, counted without expanding it, and whether the count is exact.

    Rows of a prompt file are counted only until the count passes limit. A
    bad repeat counts nothing: it is reported, not expanded.
    """
    if entry.combinations is None and entry.prompt_file is None:
        return _repeats(entry.repeat, from_text=False) or 0, True  # one job's entry: 100,000 of them in a long list
    combinations = entry.combinations or [Combination({}, "")]
    per_row = sum(_repeats(c.values.get("repeat", entry.repeat), from_text=False) or 0 for c in combinations)
    if entry.prompt_file is None:
        return per_row, True
    total = 0
    for row in entry.prompt_file.rows():
        if total > limit:
            return total, False  # past the cap with rows left: no need to read on
        if row.problem is not None:
            continue
        if "repeat" in row.values:  # a row's repeat wins over the matrix's and the entry's
            total += len(combinations) * (_repeats(row.values["repeat"], from_text=row.from_text) or 0)
        else:
            total += per_row
    return total, True


class _Blame:
    """Places a problem where the user can fix it: the row, the matrix, the entry or the defaults."""

    def __init__(self, problems: Problems, entry: Entry, row: Row, combination: Combination) -> None:
        self.problems = problems
        self.entry = entry
        self.row = row
        self.combination = combination

    def origin(self) -> tuple[str, int | None]:
        if self.row.line is not None and self.entry.prompt_file is not None:
            return self.entry.prompt_file.display, self.row.line
        return self.problems.file, self.problems.line(self.entry.path)

    def _suffix(self) -> str:
        return f" (matrix: {self.combination.label})" if self.combination.label else ""

    def _at_row(self, field_name: str, message: str, *, alike: Hashable = None) -> None:
        assert self.entry.prompt_file is not None
        where = f"row {self.row.number}" + (f": {field_name}" if field_name else "")
        # One row's problem repeats over the matrix's combinations: listed once, counted.
        kind = alike if alike is not None else ("row", self.row.line, field_name, message)
        self.problems.add(
            Problem(self.entry.prompt_file.display, self.row.line, where, message + self._suffix()),
            alike=(self.entry.path, kind),
        )

    def _at_entry(self, path: YamlPath, message: str) -> None:
        """A problem with the entry's value at path, which each combination of its matrix repeats."""
        self.problems.at(path, message + self._suffix(), alike=(self.entry.path, (path, message)))

    def whole(self, message: str) -> None:
        # Nothing the row or entry sets is at fault (a required field no one gives): one problem
        # over all the entry's rows and combinations, listed at the first.
        if self.row.line is not None:
            self._at_row("", message, alike=("whole", message))
        else:
            self._at_entry(self.entry.path, message)

    def variable(self, name: str, message: str) -> None:
        if name in self.row.values:
            self._at_row(name, message)
        else:
            self._at_entry((*self.entry.path, "matrix", name), message)

    def control(self, name: str, message: str) -> None:
        if name in self.row.values or name in self.combination.values:
            self.variable(name, message)
        else:
            self._at_entry((*self.entry.path, name), message)

    def field(
        self,
        dotted: str,
        message: str,
        fields: dict[str, Any],
        from_variables: dict[str, Any],
        defaults: dict[str, Any],
    ) -> None:
        top = dotted.split(".")[0]
        from_row = set(self.row.values)
        if top in from_variables:
            self.variable(top, message)
        elif top in fields:
            if from_row & placeholders(self.entry.fields[top]):
                self._at_row(top, message)  # the row's value, put in through a placeholder
            else:
                self._at_entry((*self.entry.path, top), message)
        elif top in defaults:
            self.problems.at(("defaults", top), message)
        else:
            self.whole(message)
