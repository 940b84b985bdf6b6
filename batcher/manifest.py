"""Manifests: YAML in, a stream of validated `Job`s out.

A manifest says what to generate::

    model: openai/gpt-image-1-5/image-to-image
    defaults:            # merged into every job's input
      quality: high
    jobs:
      - id: london-giant # optional: the job's name and output folder
        prompt: "..."
        image_urls: ["https://example.org/ref.jpg"]
        repeat: 3        # optional: independent generations of the same input
      - prompt: "a {animal} in {city}"     # a matrix: one job per combination
        image_urls: ["https://example.org/ref.jpg"]
        matrix:
          animal: [cat, dog]
          city: [London, Paris]
          exclude: [{animal: dog, city: Paris}]
      - from: prompts.csv                  # one job per row; columns are fields
        image_urls: ["https://example.org/ref.jpg"]

Everything wrong with a manifest is reported at once, each problem with its
file, line and field (a prompt file's problems with its file, line and row).
A job's identity (`Job.key`) is a hash of what is sent (model, input with
schema defaults filled) and its repeat index, so reordering jobs changes
nothing and editing a job re-runs that job alone.

Prompt files are streamed: loading checks every row once, and
`Manifest.iter_jobs` reads them again, so planning a 50,000-row file keeps
only job identities in memory, never the jobs.

A manifest may come from someone else's repository, so loading is bounded:
YAML aliases may copy at most `MAX_ALIAS_VALUES` values (a "billion laughs"
document is refused at its alias), values nest at most `MAX_DEPTH` deep, a
manifest expands to at most `MAX_JOBS` jobs (counted before expanding;
raised with ``max_jobs``, ``--max-jobs`` or ``BATCHER_MAX_JOBS``), and
prompt files and schema folders must lie inside the manifest's own folder,
symlinks followed (unless ``allow_outside`` or ``BATCHER_ALLOW_OUTSIDE_FILES=1``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .errors import ManifestError, Problem, UsageError
from .promptfile import KINDS, NO_ROW, PromptFile, Row, from_text
from .schema import ModelSchema, load_model_schema
from .template import placeholders, render

__all__ = ["Job", "Manifest", "job_key", "load_manifest", "set_max_jobs", "shard_of"]

TOP_LEVEL_KEYS = ("model", "schemas", "defaults", "jobs")
ROW_CONTROL_KEYS = ("id", "repeat", "model")
"""What a prompt-file column or a matrix variable may set besides input fields."""
ENTRY_CONTROL_KEYS = (*ROW_CONTROL_KEYS, "matrix", "from")
MAX_REPEAT = 10_000
MAX_COMBINATIONS = 100_000
MAX_PROBLEMS = 200
MAX_JOBS = 1_000_000
"""The most jobs a manifest may expand to, unless raised (`load_manifest`'s max_jobs)."""
MAX_ALIAS_VALUES = 1_000_000
"""The most values YAML aliases may copy, or `ALIAS_RATIO` times the values written out if more."""
ALIAS_RATIO = 10
MAX_DEPTH = 50
"""The deepest a value may nest (a manifest needs a handful); deeper would exhaust Python's stack."""
MAX_JOBS_ENV = "BATCHER_MAX_JOBS"
ALLOW_OUTSIDE_ENV = "BATCHER_ALLOW_OUTSIDE_FILES"
_DIGITS = re.compile(r"^[0-9]{1,9}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SLUG_DROP = re.compile(r"[^a-z0-9]+")

Path_ = tuple[str | int, ...]
# libyaml's loader where PyYAML was built with it: the same safe constructor, ~10x faster.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, slots=True)
class Job:
    """One generation to run: what to send, and how to name what comes back."""

    key: str
    """Content identity: the journal's key for this job."""
    name: str
    """Safe for a folder name: the manifest's ``id`` or a slug of the prompt."""
    model: str
    input: dict[str, Any] = field(hash=False, compare=False)
    repeat_index: int = 0
    line: int | None = None
    """Where the job comes from, for messages: a line of `source`."""
    source: str = ""
    """The manifest, or the prompt file holding the job's row."""

    @property
    def origin(self) -> str:
        """``file:line`` of the job's entry or row."""
        return f"{self.source}:{self.line}" if self.line is not None else self.source


@dataclass(frozen=True)
class Manifest:
    """A loaded, validated manifest.

    `jobs` holds every job in a list (a run needs them all); `iter_jobs`
    streams them for commands that look at each job once.
    """

    path: Path
    sha256: str
    """Of the manifest and every prompt file it reads."""
    model: str
    """The manifest's model, or its first job's when each job names one."""
    count: int
    """How many jobs the manifest expands to."""
    models: tuple[str, ...] = ()
    schema_dirs: tuple[Path, ...] = ()
    _expander: _Expander | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        """The manifest's file name without its suffix: the default output folder's name."""
        return self.path.stem

    shard: tuple[int, int] | None = None
    """``(K, N)`` when this is one slice of the manifest (see `only_shard`)."""

    def iter_jobs(self) -> Iterator[Job]:
        """Every job in manifest order, expanding matrices and reading prompt files as it goes."""
        if self._expander is None:
            return
        for job in self._expander.jobs(check=False):
            if self.shard is None or shard_of(job.key, self.shard[1]) == self.shard[0]:
                yield job

    def only_shard(self, part: int, shards: int) -> Manifest:
        """The same manifest cut to the part-th of shards slices of its jobs."""
        sliced = dataclasses.replace(self, shard=(part, shards))
        return dataclasses.replace(sliced, count=sum(1 for _ in sliced.iter_jobs()))

    @cached_property
    def jobs(self) -> list[Job]:
        return list(self.iter_jobs())


def job_key(model: str, payload: dict[str, Any], repeat_index: int) -> str:
    """The stable identity of a job; see the module docstring."""
    canonical = json.dumps(
        {"model": model, "input": payload, "repeat": repeat_index},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def shard_of(key: str, shards: int) -> int:
    """Which of `shards` slices (1-based) a job belongs to: by identity, so stable under reordering."""
    return int(key, 16) % shards + 1


def _slug(text: str, key: str) -> str:
    words = _SLUG_DROP.sub(" ", text.lower()).split()[:6]
    stem = "-".join(words)[:48].strip("-") or "job"
    return f"{stem}-{key[:12]}"


# --- YAML with line numbers -------------------------------------------------------------------


class _Located:
    """A YAML document turned into plain data, remembering each value's line.

    Built from the parser's events, not from a composed node tree: a tree of
    a 100,000-job file holds millions of nodes and marks at once, where the
    events pass one at a time. The top-level ``jobs`` list is not kept at all:
    it is skimmed (counted) on the first read and `items` parses it again
    one job at a time, so a long list costs no memory past the job at hand.
    (A list that uses YAML anchors or aliases is kept whole instead.)
    """

    def __init__(self, text: str, file: str) -> None:
        self.file = file
        self.text = text
        self.lines: dict[Path_, int] = {}
        self.problems: dict[tuple[str, int | None, str, str], Problem] = {}
        self.omitted = 0
        self._anchors: dict[str, _Anchor] = {}
        self._stream = True
        try:
            self.data = self._read()
        except _CannotStream:
            self._stream = False
            self.lines.clear()
            self.problems.clear()
            self._anchors.clear()
            self.data = self._read()

    def _read(self) -> Any:
        # What bounds alias expansion: values built (aliases at their expanded size), values
        # written out in the file, values copied by aliases, and the deepest path reached.
        self._built = self._written = self._copied = self._deepest = 0
        loader = _SafeLoader(self.text)
        try:
            loader.get_event()  # stream start
            if loader.check_event(yaml.StreamEndEvent):
                return None
            loader.get_event()  # document start
            data = self._value(loader, ())
            loader.get_event()  # document end
            if not loader.check_event(yaml.StreamEndEvent):
                mark = loader.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    "expected a single document", None, "but found another document", mark
                )
            return data
        finally:
            loader.dispose()

    def items(self, path: Path_) -> Iterator[tuple[int, Any]]:
        """The items of the list at path, each with its lines recorded while it is being looked at."""
        found = self.data
        for part in path:
            found = found[part]
        if not isinstance(found, _Skimmed):
            yield from enumerate(found)
            return
        loader = _SafeLoader(self.text)
        try:
            for _ in range(3):  # stream, document and top-level mapping starts
                loader.get_event()
            while True:  # to the list of the top-level "jobs" key the first read kept
                key = loader.get_event()
                start: Any = key.start_mark
                if isinstance(key, yaml.ScalarEvent) and key.value == "jobs" and start.line + 1 == found.key_line:
                    break
                self._skip(loader, refuse_anchors=False)
            loader.get_event()
            index = 0
            while not loader.check_event(yaml.SequenceEndEvent):
                before = set(self.lines)
                item = self._value(loader, (*path, index))
                yield index, item
                for added in set(self.lines) - before:
                    del self.lines[added]
                index += 1
        except yaml.YAMLError as exc:  # the first read skimmed this list: its errors surface here
            raise _invalid_yaml(self.file, exc) from exc
        finally:
            loader.dispose()

    @staticmethod
    def _skip(loader: Any, *, refuse_anchors: bool = True) -> int:
        """Consume one value's events; returns how many items a collection had."""
        depth = 0
        items = 0
        while True:
            event = loader.get_event()
            if refuse_anchors and getattr(event, "anchor", None) is not None:
                raise _CannotStream  # an anchor or alias: the list must be read whole
            if depth == 1 and not isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
                items += 1
            if isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
                depth += 1
            elif isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
                depth -= 1
            if depth == 0:
                return items

    def _value(self, loader: Any, path: Path_) -> Any:
        event = loader.get_event()
        start: Any = event.start_mark  # the C parser's marks are not yaml.Mark to the type stubs
        self.lines[path] = start.line + 1
        if len(path) > MAX_DEPTH:
            self._refuse(start, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(event, yaml.AliasEvent):
            return self._alias(str(event.anchor), len(path), start)
        if event.anchor is not None:  # measure the anchored value, for the aliases that will copy it
            outer_deepest, self._deepest = self._deepest, len(path)
            first = self._built
        self._built += 1
        self._written += 1
        self._deepest = max(self._deepest, len(path))
        if isinstance(event, yaml.ScalarEvent):
            value = self._scalar(loader, event, start)
        elif isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            plain = "tag:yaml.org,2002:seq" if isinstance(event, yaml.SequenceStartEvent) else "tag:yaml.org,2002:map"
            if event.tag not in (None, "!", plain, "tag:yaml.org,2002:omap"):
                # Safe loading: a tag like !!python/object is refused, never constructed.
                raise yaml.constructor.ConstructorError(None, None, f"unsupported YAML tag {event.tag!r}", start)
            value = self._sequence(loader, path) if plain.endswith("seq") else self._mapping(loader, path)
        else:  # pragma: no cover - the parser yields nothing else here
            raise yaml.composer.ComposerError(None, None, f"unexpected {event}", start)
        if event.anchor is not None:
            self._anchors[event.anchor] = _Anchor(value, self._built - first, self._deepest - len(path))
            self._deepest = max(outer_deepest, self._deepest)
        return value

    def _alias(self, name: str, depth: int, start: Any) -> Any:
        """A copy of the anchored value, unless copying it passes the alias budget or the depth limit."""
        anchor = self._anchors.get(name)
        if anchor is None:
            raise yaml.composer.ComposerError(None, None, f"found undefined alias {name!r}", start)
        # Counted before copying: a few hundred bytes of nested aliases can stand for billions of values.
        self._copied += anchor.size
        budget = max(MAX_ALIAS_VALUES, ALIAS_RATIO * self._written)
        if self._copied > budget:
            self._refuse(
                start,
                f"the alias *{name} would make aliases copy more than {budget:,} values, the most a manifest may "
                "(a 'billion laughs' document?); write the values out, or share fields through 'defaults'",
            )
        if depth + anchor.height > MAX_DEPTH:
            self._refuse(start, f"nested more than {MAX_DEPTH} levels deep (through the alias *{name})")
        self._built += anchor.size
        self._deepest = max(self._deepest, depth + anchor.height)
        return copy.deepcopy(anchor.value)

    def _refuse(self, start: Any, message: str) -> NoReturn:
        """Stop reading: the document is built to exhaust memory or the stack."""
        raise ManifestError([Problem(self.file, start.line + 1, "", message)])

    def _scalar(self, loader: Any, event: Any, start: Any) -> Any:
        node = self._scalar_node(loader, event)
        # The safe constructor's own table, called directly: construct_object would keep every node.
        construct = loader.yaml_constructors.get(node.tag)
        if construct is None:
            raise yaml.constructor.ConstructorError(None, None, f"unsupported YAML tag {node.tag!r}", start)
        try:
            return construct(loader, node)
        except (ValueError, TypeError, OverflowError) as exc:  # 5,000 digits, a 13th month: not a traceback
            kind = node.tag.rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {_short(event.value)} as {kind}", start
            ) from exc

    @staticmethod
    def _scalar_node(loader: Any, event: Any) -> yaml.ScalarNode:
        tag = event.tag
        if tag is None or tag == "!":
            tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
        return yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)

    def _sequence(self, loader: Any, path: Path_) -> list[Any]:
        items: list[Any] = []
        while not loader.check_event(yaml.SequenceEndEvent):
            items.append(self._value(loader, (*path, len(items))))
        loader.get_event()
        return items

    def _mapping(self, loader: Any, path: Path_) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        merged: list[dict[Any, Any]] = []
        while not loader.check_event(yaml.MappingEndEvent):
            head = loader.peek_event()
            line = head.start_mark.line + 1
            if isinstance(head, yaml.ScalarEvent) and self._scalar_node(loader, head).tag == "tag:yaml.org,2002:merge":
                loader.get_event()
                merged.extend(self._merge_source(loader, path, line))
                continue
            key = self._value(loader, (*path, "\0key"))
            del self.lines[(*path, "\0key")]
            if not isinstance(key, str | int) or isinstance(key, bool):
                self.add(Problem(self.file, line, "", f"keys must be text, got {key!r}"))
                self._value(loader, (*path, "\0skipped"))
                self.lines.pop((*path, "\0skipped"), None)
                continue
            if key in result:
                self.add(
                    Problem(
                        self.file,
                        line,
                        _field((*path, key)),
                        f"duplicate key (also on line {self.lines[(*path, key)]})",
                    )
                )
            if self._stream and path == () and key == "jobs" and loader.check_event(yaml.SequenceStartEvent):
                self.lines[("jobs",)] = loader.peek_event().start_mark.line + 1
                result[key] = _Skimmed(self._skip(loader), line)
                continue
            result[key] = self._value(loader, (*path, key))
        loader.get_event()
        for source in merged:  # "<<" merge keys: the mapping's own keys win, then earlier sources
            for key, value in source.items():
                result.setdefault(key, value)
        return result

    def _merge_source(self, loader: Any, path: Path_, line: int) -> list[dict[Any, Any]]:
        value = self._value(loader, (*path, "<<"))
        sources = value if isinstance(value, list) else [value]
        if not all(isinstance(source, dict) for source in sources):
            self.add(
                Problem(self.file, line, _field((*path, "<<")), "a merge key takes a mapping or a list of mappings")
            )
            return []
        return sources

    def line(self, path: Path_) -> int | None:
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path)

    def problem(self, path: Path_, message: str) -> None:
        self.add(Problem(self.file, self.line(path), _field(path), message))

    def add(self, problem: Problem) -> None:
        # A bad default or template repeats over thousands of rows: report it once.
        identity = (problem.file, problem.line, problem.field, problem.message)
        if identity in self.problems:
            return
        if len(self.problems) >= MAX_PROBLEMS:
            self.omitted += 1
            return
        self.problems[identity] = problem

    def fail_if_any(self) -> None:
        if self.problems:
            ordered = sorted(self.problems.values(), key=lambda p: (p.file != self.file, p.file, p.line or 0, p.field))
            raise ManifestError(ordered, omitted=self.omitted)


class _CannotStream(Exception):
    """The jobs list uses anchors or aliases: read it whole."""


@dataclass(frozen=True, slots=True)
class _Anchor:
    """An anchored value, with what each alias of it costs: its values counted, and its depth."""

    value: Any
    size: int
    height: int


@dataclass(frozen=True, slots=True)
class _Skimmed:
    """A list counted on the first read, to be parsed again item by item (`_Located.items`)."""

    count: int
    key_line: int


def _field(path: Path_) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else p for p in path).replace(".[", "[")


def _parse(path: Path) -> tuple[bytes, _Located]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        msg = f"no manifest at {path}"
        raise UsageError(msg) from exc
    except OSError as exc:
        msg = f"cannot read the manifest {path}: {exc.strerror}"
        raise UsageError(msg) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError([Problem(str(path), None, "", f"is not UTF-8 text ({exc.reason})")]) from exc
    try:
        return raw, _Located(text, str(path))
    except yaml.YAMLError as exc:
        raise _invalid_yaml(str(path), exc) from exc


def _invalid_yaml(file: str, exc: yaml.YAMLError) -> ManifestError:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        what = exc.problem or exc.context or "invalid YAML"
        return ManifestError([Problem(file, line, "", f"invalid YAML: {what}")])
    return ManifestError([Problem(file, None, "", f"invalid YAML: {exc}")])


def _short(value: object) -> str:
    """repr(value), cut to fit a message: a hostile value may be megabytes long."""
    shown = repr(value)
    return shown if len(shown) <= 40 else f"{shown[:30]}… ({len(str(value)):,} characters)"


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- expansion ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Combination:
    values: dict[str, Any]
    label: str


@dataclass(slots=True)
class _Entry:
    """One item of ``jobs:``, checked on its own: what it sets and where its variables come from."""

    path: Path_
    fields: dict[str, Any]
    id: Any
    repeat: Any
    model: Any
    combinations: list[_Combination] | None
    prompt_file: PromptFile | None
    placeholders: set[str]

    @property
    def templated(self) -> bool:
        return self.combinations is not None or self.prompt_file is not None


class _Expander:
    """Turns checked entries into jobs; `jobs(check=True)` also validates each one and records problems."""

    def __init__(
        self,
        doc: _Located,
        schema_dirs: Sequence[Path],
        model: str | None,
        defaults: dict[str, Any],
        entries: Callable[[], Iterator[_Entry]],
        *,
        max_jobs: int = MAX_JOBS,
        confined: _Confinement | None = None,
        own_schema_dirs: Sequence[Path] = (),
    ) -> None:
        self.doc = doc
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
        for entry in self.entries():
            if check and not self._within_cap(entry):
                return  # expanding on would only burn time and memory before the same refusal
            if check and entry.prompt_file is not None:
                self.prompt_files.append(entry.prompt_file)
            rows: Iterable[Row] = entry.prompt_file.rows() if entry.prompt_file else (NO_ROW,)
            combinations = entry.combinations or [_Combination({}, "")]
            for row in rows:
                if row.problem is not None:
                    if check:
                        assert entry.prompt_file is not None
                        where = f"row {row.number}" if row.number else ""
                        self.doc.add(Problem(entry.prompt_file.display, row.line, where, row.problem))
                    continue
                for combination in combinations:
                    yield from self._expand(entry, row, combination, check=check)

    def _within_cap(self, entry: _Entry) -> bool:
        """Counts entry's jobs before it is expanded; past the cap, reports it on the entry's line."""
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
        self.doc.problem(
            entry.path,
            f"{whole}, past the cap of {self.max_jobs:,} jobs a manifest may expand to; if you mean it, "
            f"raise the cap with --max-jobs N ({MAX_JOBS_ENV}=N, or load_manifest(max_jobs=N))",
        )
        return False

    def _expand(self, entry: _Entry, row: Row, combination: _Combination, *, check: bool) -> Iterator[Job]:
        variables = {**combination.values, **row.values}
        blame = _Blame(self.doc, entry, row, combination)

        model = variables.get("model", entry.model if entry.model is not None else self.model)
        if model is None:
            blame.control("model", "no model: give the manifest a 'model', or this job one")
            return
        if not isinstance(model, str) or not model:
            blame.control("model", f"expected a model id, got {model!r}")
            return
        schema, unknown = self.schema(model)
        if schema is None:
            if "model" in variables or entry.model is not None:
                blame.control("model", unknown)
            else:
                self.doc.problem(("model",), unknown)
            return

        from_variables: dict[str, Any] = {}
        for name, value in variables.items():
            if name in ROW_CONTROL_KEYS or (name in entry.placeholders and name not in schema.properties):
                continue
            if row.from_text and name in row.values:
                try:
                    value = from_text(value, schema.properties.get(name, {}))
                except ValueError as exc:
                    blame.variable(name, f"cannot read {value!r}: {exc}")
                    return
            from_variables[name] = value
        try:
            fields = render(entry.fields, variables) if entry.templated else entry.fields
            raw_id = render(entry.id, variables) if entry.templated and isinstance(entry.id, str) else entry.id
        except KeyError as exc:
            blame.whole(f"no value for the placeholder {{{exc.args[0]}}}")
            return
        raw_id = variables.get("id", raw_id)
        filled = schema.with_defaults({**self.defaults, **fields, **from_variables})

        failed = False
        if check:
            for error in schema.validate(filled):
                blame.field(error.field, error.message, fields, from_variables, self.defaults)
                failed = True
            if raw_id is not None and (not isinstance(raw_id, str) or not _JOB_ID.match(raw_id)):
                blame.control(
                    "id",
                    f"{raw_id!r} is not a usable job id: use 1-100 letters, digits, '.', '_' or '-', "
                    "starting with a letter or digit",
                )
                failed = True
        given = variables.get("repeat", entry.repeat)
        repeat = _repeats(given, from_text=row.from_text and "repeat" in row.values)
        if repeat is None:
            if check:
                blame.control("repeat", f"expected a whole number from 1 to {MAX_REPEAT:,}, got {_short(given)}")
            return
        if failed:
            return

        source, line = blame.origin()
        for repeat_index in range(repeat):
            key = job_key(model, filled, repeat_index)
            if raw_id:
                name = raw_id if repeat == 1 else f"{raw_id}-{repeat_index + 1}"
            else:
                name = _slug(str(filled.get("prompt", "")), key)
            if check:
                packed_key = int(key, 16)
                if packed_key in self._keys:
                    blame.whole(
                        f"same input as the job {self._at(self._keys[packed_key], source)}; "
                        "use 'repeat: N' for more generations of one input"
                    )
                    continue
                if raw_id and name in self._names:
                    blame.control("id", f"job id {name!r} is already used {self._at(self._names[name], source)}")
                    continue
                origin = self._sources.setdefault(source, len(self._sources)) << 32 | (line or 0)
                self._keys[packed_key] = origin
                if raw_id:  # a slug holds 12 characters of the key: unique as the key is
                    self._names[name] = origin
                self.models[model] = None
                self.count += 1
            yield Job(key, name, model, filled, repeat_index, line, source)

    def _at(self, origin: int, here: str) -> str:
        source = next(name for name, index in self._sources.items() if index == origin >> 32)
        line = origin & 0xFFFFFFFF
        return f"on line {line}" if source == here else f"at {source}:{line}"


def _repeats(value: Any, *, from_text: bool) -> int | None:
    """value as a number of generations (1 to MAX_REPEAT), or None when it is not one."""
    if from_text and isinstance(value, str) and _DIGITS.match(value.strip()):
        value = int(value)  # a CSV cell; no more than 9 ASCII digits, so never a 5,000-digit int()
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REPEAT:
        return None
    return value


def _planned_jobs(entry: _Entry, limit: int) -> tuple[int, bool]:
    """How many jobs entry expands to, counted without expanding it, and whether the count is exact.

    Rows of a prompt file are counted only until the count passes limit. A
    bad repeat counts nothing: it is reported, not expanded.
    """
    combinations = entry.combinations or [_Combination({}, "")]
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

    def __init__(self, doc: _Located, entry: _Entry, row: Row, combination: _Combination) -> None:
        self.doc = doc
        self.entry = entry
        self.row = row
        self.combination = combination

    def origin(self) -> tuple[str, int | None]:
        if self.row.line is not None and self.entry.prompt_file is not None:
            return self.entry.prompt_file.display, self.row.line
        return self.doc.file, self.doc.line(self.entry.path)

    def _suffix(self) -> str:
        return f" (matrix: {self.combination.label})" if self.combination.label else ""

    def _at_row(self, field_name: str, message: str) -> None:
        assert self.entry.prompt_file is not None
        where = f"row {self.row.number}" + (f": {field_name}" if field_name else "")
        self.doc.add(Problem(self.entry.prompt_file.display, self.row.line, where, message + self._suffix()))

    def whole(self, message: str) -> None:
        if self.row.line is not None:
            self._at_row("", message)
        else:
            self.doc.problem(self.entry.path, message + self._suffix())

    def variable(self, name: str, message: str) -> None:
        if name in self.row.values:
            self._at_row(name, message)
        else:
            self.doc.problem((*self.entry.path, "matrix", name), message + self._suffix())

    def control(self, name: str, message: str) -> None:
        if name in self.row.values or name in self.combination.values:
            self.variable(name, message)
        else:
            self.doc.problem((*self.entry.path, name), message + self._suffix())

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
                self.doc.problem((*self.entry.path, top), message + self._suffix())
        elif top in defaults:
            self.doc.problem(("defaults", top), message)
        else:
            self.whole(message)


# --- loading -----------------------------------------------------------------------------------


_max_jobs: ContextVar[int | None] = ContextVar("batcher_max_jobs", default=None)


def set_max_jobs(value: int | None) -> Callable[[], None]:
    """Cap the jobs of later `load_manifest` calls in this context that pass no max_jobs (the CLI's --max-jobs).

    Returns the function that puts the previous cap back.
    """
    token = _max_jobs.set(value)
    return lambda: _max_jobs.reset(token)


def load_manifest(
    path: str | Path,
    schema_dirs: Sequence[Path] = (),
    *,
    max_jobs: int | None = None,
    allow_outside: bool = False,
) -> Manifest:
    """Read, expand and validate a manifest.

    schema_dirs are searched for model schemas before the manifest's own
    ``schemas:`` folders and the bundled ones. A manifest expanding to more
    than max_jobs jobs is refused before it is expanded (default: the
    `set_max_jobs` cap, else env BATCHER_MAX_JOBS, else `MAX_JOBS`). Prompt
    files and schema folders must lie inside the manifest's folder, symlinks
    followed, unless allow_outside or env BATCHER_ALLOW_OUTSIDE_FILES=1.
    Raises ManifestError listing every problem found, or UsageError when the
    file cannot be read or the cap is not a number.
    """
    path = Path(path)
    cap = _job_cap(max_jobs)
    outside_ok = allow_outside or os.environ.get(ALLOW_OUTSIDE_ENV, "").strip().lower() in ("1", "true", "yes")
    raw, doc = _parse(path)
    data = doc.data
    if not isinstance(data, dict):
        doc.problem((), "a manifest is a mapping with 'model' and 'jobs' keys")
        doc.fail_if_any()
        raise AssertionError  # unreachable: fail_if_any raised
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            doc.problem(
                (key,),
                f"unknown key{_did_you_mean(str(key), TOP_LEVEL_KEYS)}; expected one of: {', '.join(TOP_LEVEL_KEYS)}",
            )

    folder = path.parent
    confined = None if outside_ok else _Confinement(folder.resolve())
    own = _schema_folders(doc, data.get("schemas"), folder, confined)
    directories = [*schema_dirs, *own]
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        doc.problem(("model",), "expected the RunComfy model id, e.g. openai/gpt-image-1-5/image-to-image")
        model = None

    defaults = data.get("defaults", {})
    if defaults is None:
        defaults = {}
    if not isinstance(defaults, dict):
        doc.problem(("defaults",), "expected a mapping of input fields")
        defaults = {}
    for control in ENTRY_CONTROL_KEYS:
        if control in defaults:
            doc.problem(("defaults", control), f"'{control}' belongs on a job, not in defaults")
            del defaults[control]

    items = data.get("jobs")
    if not (isinstance(items, list) and items) and not (isinstance(items, _Skimmed) and items.count):
        doc.problem(("jobs",), "expected a non-empty list of jobs")
        data["jobs"] = []

    def entries() -> Iterator[_Entry]:
        for index, item in doc.items(("jobs",)):
            entry = _entry(doc, index, item, folder, confined)
            if entry is not None:
                yield entry

    expander = _Expander(
        doc, directories, model, defaults, entries, max_jobs=cap, confined=confined, own_schema_dirs=own
    )
    digest = hashlib.sha256(raw)
    for _job in expander.jobs(check=True):
        pass
    for prompt_file in expander.prompt_files:
        digest.update(prompt_file.sha256().encode())
    if expander.count == 0 and not doc.problems:
        doc.problem(
            ("jobs",), "expands to no jobs (empty prompt files, or a matrix whose combinations are all excluded)"
        )
    doc.fail_if_any()
    models = tuple(expander.models)
    return Manifest(
        path=path,
        sha256=digest.hexdigest(),
        model=model or models[0],
        count=expander.count,
        models=models,
        schema_dirs=tuple(directories),
        _expander=expander,
    )


def _job_cap(max_jobs: int | None) -> int:
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


@dataclass(frozen=True, slots=True)
class _Confinement:
    """The manifest's folder tree, which its prompt files and schema folders must not leave."""

    root: Path
    """The manifest's folder, symlinks resolved."""

    def escapes(self, path: Path) -> bool:
        """Whether path leads outside the tree once symlinks (any part of it) are followed."""
        try:
            return not path.resolve().is_relative_to(self.root)
        except ValueError:  # a NUL in the name: no file can be opened by it, as the caller will find
            return False
        except (OSError, RuntimeError):  # a symlink loop: refused rather than followed
            return True

    def refusal(self, what: str) -> str:
        return (
            f"{what} leads outside the manifest's folder {self.root} (symlinks followed): a manifest reads files "
            f"only from its own folder; move it there or, if you trust this manifest, set {ALLOW_OUTSIDE_ENV}=1"
        )

    def schema_file(self, model: str, directories: Sequence[Path]) -> str | None:
        """Why the model's schema file in the manifest's own schema folders may not be read, or None.

        (Folders given on the command line are the user's, and trusted.)
        """
        parts = model.split("/")
        if len(parts) < 2 or ".." in parts:
            return None  # not a model id: load_model_schema says so
        for directory in directories:
            candidate = directory.joinpath(*parts[:-1], parts[-1] + ".input.json")  # as load_model_schema looks
            if candidate.is_file() and self.escapes(candidate):
                return self.refusal(f"the schema {candidate}")
        return None


def _schema_folders(doc: _Located, value: object, folder: Path, confined: _Confinement | None) -> list[Path]:
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        doc.problem(("schemas",), "expected a folder (or a list of folders) of model schemas")
        return []
    found = []
    for index, name in enumerate(names):
        directory = folder / name
        where: Path_ = ("schemas",) if isinstance(value, str) else ("schemas", index)
        if confined is not None and confined.escapes(directory):
            doc.problem(where, confined.refusal(repr(name)))
        elif directory.is_dir():
            found.append(directory)
        else:
            doc.problem(where, f"no folder {directory} (schema folders are relative to the manifest)")
    return found


def _entry(doc: _Located, index: int, item: object, folder: Path, confined: _Confinement | None) -> _Entry | None:
    where: Path_ = ("jobs", index)
    if not isinstance(item, dict):
        doc.problem(where, "expected a mapping with at least 'prompt' and 'image_urls' (or 'from' a prompt file)")
        return None
    fields = {k: v for k, v in item.items() if k not in ENTRY_CONTROL_KEYS}
    entry = _Entry(
        path=where,
        fields=fields,
        id=item.get("id"),
        repeat=item.get("repeat", 1),
        model=item.get("model"),
        combinations=_matrix(doc, (*where, "matrix"), item["matrix"]) if "matrix" in item else None,
        prompt_file=_prompt_file(doc, (*where, "from"), item["from"], folder, confined) if "from" in item else None,
        placeholders=set(),
    )
    if ("matrix" in item and entry.combinations is None) or ("from" in item and entry.prompt_file is None):
        return None  # reported above; expanding it anyway would only add noise about missing fields
    if not entry.templated:
        return entry

    variables: set[str] | None = set()
    if entry.combinations:
        variables = set().union(*(c.values for c in entry.combinations))
    header = entry.prompt_file.header() if entry.prompt_file else None
    if entry.prompt_file is not None and header is None:
        variables = None  # JSONL: each row names its own fields; placeholders are checked row by row
    elif header is not None and variables is not None:
        for clash in sorted(variables & set(header)):
            doc.problem((*where, "matrix", clash), f"{clash!r} is also a column of {entry.prompt_file.display}")  # type: ignore[union-attr]
        variables |= set(header)

    templated = {**fields, **({"id": entry.id} if isinstance(entry.id, str) else {})}
    sound = True
    for name, value in templated.items():
        used = placeholders(value)
        entry.placeholders |= used
        if variables is None:
            continue
        for unknown in sorted(used - variables):
            sound = False
            doc.problem(
                (*where, name),
                f"unknown placeholder {{{unknown}}}{_did_you_mean(unknown, variables)}; "
                f"the matrix and prompt file give: {', '.join(sorted(variables)) or 'nothing'}",
            )
    return entry if sound else None


def _matrix(doc: _Located, where: Path_, value: object) -> list[_Combination] | None:
    """Every combination of the matrix's lists, less `exclude`, plus `include` (as CI matrices do)."""
    if not isinstance(value, dict) or not value:
        doc.problem(where, "expected a mapping of names to lists of values, with optional 'include' and 'exclude'")
        return None
    axes: dict[str, list[Any]] = {}
    for name, values in value.items():
        if name in ("include", "exclude"):
            continue
        if not isinstance(name, str) or not _VARIABLE.match(name):
            doc.problem((*where, name), "a matrix name uses letters, digits and '_', not starting with a digit")
        elif not isinstance(values, list) or not values:
            doc.problem((*where, name), "expected a non-empty list of values")
        else:
            axes[name] = values
    extra: dict[str, list[dict[str, Any]]] = {}
    for special in ("include", "exclude"):
        listed = value.get(special, [])
        if not isinstance(listed, list) or not all(isinstance(e, dict) and e for e in listed):
            doc.problem((*where, special), "expected a list of mappings of matrix names to values")
            listed = []
        extra[special] = listed
    for index, excluded in enumerate(extra["exclude"]):
        for name in excluded:
            if name not in axes:
                doc.problem(
                    (*where, "exclude", index, name), f"{name!r} is not a matrix name{_did_you_mean(name, axes)}"
                )
    size = 1
    for values in axes.values():
        size *= len(values)
    if size > MAX_COMBINATIONS:
        doc.problem(where, f"expands to {size:,} combinations; more than {MAX_COMBINATIONS:,} belongs in a prompt file")
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
    return [_Combination(c, ", ".join(f"{k}={v}" for k, v in c.items())) for c in combinations]


def _matches(combination: dict[str, Any], pattern: dict[str, Any]) -> bool:
    return all(combination.get(k) == v for k, v in pattern.items())


def _prompt_file(
    doc: _Located, where: Path_, value: object, folder: Path, confined: _Confinement | None
) -> PromptFile | None:
    if not isinstance(value, str) or not value:
        doc.problem(where, "expected the path of a .csv or .jsonl prompt file, relative to the manifest")
        return None
    path = folder / value
    if path.suffix.lower() not in KINDS:
        doc.problem(where, f"{value!r}: a prompt file ends in .csv, .jsonl or .ndjson")
        return None
    if confined is not None and confined.escapes(path):  # checked first: whether it exists is none of its business
        doc.problem(where, confined.refusal(repr(value)))
        return None
    if not path.is_file():
        doc.problem(where, f"no prompt file {path} (prompt files are relative to the manifest)")
        return None
    try:
        path.open("rb").close()
    except OSError as exc:
        doc.problem(where, f"cannot read {path}: {exc.strerror}")
        return None
    display = str(path)
    prompt_file = PromptFile(path, display)
    for row in prompt_file.csv_rows(header_only=True) if prompt_file.kind == "csv" else ():
        if row.problem:
            doc.add(Problem(display, row.line, "", row.problem))
            return None
    return prompt_file
