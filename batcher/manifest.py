"""Manifests: YAML in, a list of validated `Job`s out.

A manifest says what to generate::

    model: openai/gpt-image-1-5/image-to-image
    defaults:            # merged into every job's input
      quality: high
    jobs:
      - id: london-giant # optional: the job's name and output folder
        prompt: "..."
        image_urls: ["https://example.org/ref.jpg"]
        repeat: 3        # optional: independent generations of the same input

Everything wrong with a manifest is reported at once, each problem with its
file, line and field. A job's identity (`Job.key`) is a hash of what is
sent (model, input with schema defaults filled) and its repeat index, so
reordering jobs changes nothing and editing a job re-runs that job alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ManifestError, Problem, UsageError
from .schema import ModelSchema, load_model_schema

__all__ = ["Job", "Manifest", "job_key", "load_manifest"]

TOP_LEVEL_KEYS = ("model", "defaults", "jobs")
JOB_CONTROL_KEYS = ("id", "repeat")
MAX_REPEAT = 10_000
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SLUG_DROP = re.compile(r"[^a-z0-9]+")

Path_ = tuple[str | int, ...]
# libyaml's loader where PyYAML was built with it: the same safe constructor, ~10x faster.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:omap")


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
    """Where the job starts in the manifest, for messages."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """A loaded, validated manifest."""

    path: Path
    sha256: str
    model: str
    jobs: list[Job]

    @property
    def name(self) -> str:
        """The manifest's file name without its suffix: the default output folder's name."""
        return self.path.stem


def job_key(model: str, payload: dict[str, Any], repeat_index: int) -> str:
    """The stable identity of a job; see the module docstring."""
    canonical = json.dumps(
        {"model": model, "input": payload, "repeat": repeat_index},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _slug(text: str, key: str) -> str:
    words = _SLUG_DROP.sub(" ", text.lower()).split()[:6]
    stem = "-".join(words)[:48].strip("-") or "job"
    return f"{stem}-{key[:8]}"


class _Located:
    """A YAML document turned into plain data, remembering each value's line."""

    def __init__(self, text: str, file: str) -> None:
        self.file = file
        self.lines: dict[Path_, int] = {}
        self.problems: list[Problem] = []
        loader = _SafeLoader(text)
        try:
            node = loader.get_single_node()
            self.data = None if node is None else self._convert(loader, node, ())
        finally:
            loader.dispose()

    def _convert(self, loader: Any, node: yaml.Node, path: Path_) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.CollectionNode) and node.tag not in _PLAIN_TAGS:
            # Safe loading: a tag like !!python/object is refused, never constructed.
            raise yaml.constructor.ConstructorError(None, None, f"unsupported YAML tag {node.tag!r}", node.start_mark)
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)  # resolves "<<" merge keys
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node, deep=True)
                if not isinstance(key, str | int):
                    self.problems.append(
                        Problem(self.file, key_node.start_mark.line + 1, "", f"keys must be text, got {key!r}")
                    )
                    continue
                if key in result:
                    self.problems.append(
                        Problem(
                            self.file,
                            key_node.start_mark.line + 1,
                            _field((*path, key)),
                            f"duplicate key (also on line {self.lines[(*path, key)]})",
                        )
                    )
                result[key] = self._convert(loader, value_node, (*path, key))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self._convert(loader, item, (*path, i)) for i, item in enumerate(node.value)]
        return loader.construct_object(node, deep=True)

    def line(self, path: Path_) -> int | None:
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path)

    def problem(self, path: Path_, message: str) -> None:
        self.problems.append(Problem(self.file, self.line(path), _field(path), message))


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
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        what = exc.problem or exc.context or "invalid YAML"
        raise ManifestError([Problem(str(path), line, "", f"invalid YAML: {what}")]) from exc
    except yaml.YAMLError as exc:
        raise ManifestError([Problem(str(path), None, "", f"invalid YAML: {exc}")]) from exc


def load_manifest(path: str | Path, schema_dirs: Sequence[Path] = ()) -> Manifest:
    """Read, expand and validate a manifest.

    Raises ManifestError listing every problem found, or UsageError when the
    file cannot be read.
    """
    path = Path(path)
    raw, doc = _parse(path)
    data = doc.data
    if not isinstance(data, dict):
        doc.problem((), "a manifest is a mapping with 'model' and 'jobs' keys")
        raise ManifestError(doc.problems)

    for key in data:
        if key not in TOP_LEVEL_KEYS:
            doc.problem((key,), f"unknown key; expected one of: {', '.join(TOP_LEVEL_KEYS)}")

    schema = _model_schema(doc, data.get("model"), schema_dirs)
    defaults = data.get("defaults", {})
    if defaults is None:
        defaults = {}
    if not isinstance(defaults, dict):
        doc.problem(("defaults",), "expected a mapping of input fields")
        defaults = {}
    for control in JOB_CONTROL_KEYS:
        if control in defaults:
            doc.problem(("defaults", control), f"'{control}' belongs on a job, not in defaults")

    entries = data.get("jobs")
    if not isinstance(entries, list) or not entries:
        doc.problem(("jobs",), "expected a non-empty list of jobs")
        entries = []

    jobs: list[Job] = []
    if schema is not None:
        jobs = _expand(doc, schema, defaults, entries)
    if doc.problems:
        unique = {(p.line, p.field, p.message): p for p in doc.problems}
        raise ManifestError(sorted(unique.values(), key=lambda p: (p.line or 0, p.field)))
    return Manifest(path=path, sha256=hashlib.sha256(raw).hexdigest(), model=schema.model_id, jobs=jobs)  # type: ignore[union-attr]


def _model_schema(doc: _Located, model: object, schema_dirs: Sequence[Path]) -> ModelSchema | None:
    if not isinstance(model, str) or not model:
        doc.problem(("model",), "required: the RunComfy model id, e.g. openai/gpt-image-1-5/image-to-image")
        return None
    try:
        return load_model_schema(model, schema_dirs)
    except UsageError as exc:
        doc.problem(("model",), str(exc))
        return None


def _expand(doc: _Located, schema: ModelSchema, defaults: dict[str, Any], entries: list[Any]) -> list[Job]:
    jobs: list[Job] = []
    by_key: dict[str, int | None] = {}
    by_name: dict[str, int | None] = {}
    for index, entry in enumerate(entries):
        where: Path_ = ("jobs", index)
        if not isinstance(entry, dict):
            doc.problem(where, "expected a mapping with at least 'prompt' and 'image_urls'")
            continue
        payload = {**defaults, **{k: v for k, v in entry.items() if k not in JOB_CONTROL_KEYS}}
        filled = schema.with_defaults(payload)
        errors = schema.validate(filled)
        for error in errors:
            top = error.field.split(".")[0]
            origin: Path_ = (*where, top) if top in entry else ("defaults", top) if top in defaults else where
            doc.problem(origin, error.message)

        user_id = entry.get("id")
        if user_id is not None and (not isinstance(user_id, str) or not _JOB_ID.match(user_id)):
            doc.problem(
                (*where, "id"),
                f"{user_id!r} is not a usable job id: use 1-100 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit",
            )
            user_id = None
        repeat = entry.get("repeat", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= MAX_REPEAT:
            doc.problem((*where, "repeat"), f"expected a whole number from 1 to {MAX_REPEAT}, got {repeat!r}")
            repeat = 1
        if errors:
            continue

        line = doc.line(where)
        for repeat_index in range(repeat):
            key = job_key(schema.model_id, filled, repeat_index)
            if user_id:
                name = user_id if repeat == 1 else f"{user_id}-{repeat_index + 1}"
            else:
                name = _slug(str(filled.get("prompt", "")), key)
            if key in by_key:
                doc.problem(
                    where,
                    f"same input as the job on line {by_key[key]}; use 'repeat: N' for more generations of one input",
                )
                continue
            if name in by_name:
                doc.problem((*where, "id"), f"job id {name!r} is already used on line {by_name[name]}")
                continue
            by_key[key] = line
            by_name[name] = line
            jobs.append(Job(key, name, schema.model_id, filled, repeat_index, line))
    return jobs
