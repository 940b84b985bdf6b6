"""Model input schemas: finding them by model id, filling defaults, validating.

Schemas are plain JSON files laid out by model id, so another RunComfy model
is a file away: ``<dir>/openai/gpt-image-1-5/image-to-image.input.json``.
The bundled ones ship inside the wheel (``batcher/_schemas``) and, in a
source checkout, live in the repository's top-level ``schemas/``.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema

from ..errors import UsageError
from .problems import did_you_mean, shorten

__all__ = ["IMAGE_FORMAT", "FieldError", "ModelSchema", "bundled_schema_dir", "load_model_schema"]

_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)+$")


def bundled_schema_dir() -> Path:
    """The folder holding the schemas that ship with batcher."""
    installed = Path(__file__).parent.parent / "_schemas"  # the wheel puts them beside the package root
    if installed.is_dir():
        return installed
    # A source checkout or an editable install: the repository's own folder.
    return Path(__file__).resolve().parents[2] / "schemas"


def _is_http_url(value: object) -> bool:
    if not isinstance(value, str):
        return True  # the "type" keyword reports non-strings
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


# An image sent inline, as RunComfy's own ComfyUI nodes send one ("data:image/png;base64,..."). Only the
# shape is checked here; whether the bytes decode to that type is the receiver's check (the sandbox's).
_IMAGE_DATA_URI = re.compile(r"data:image/(png|jpeg|webp|gif);base64,[A-Za-z0-9+/]*={0,2}", re.ASCII)


def _is_image_uri(value: object) -> bool:
    """An http(s) URL, or an image as a base64 data URI: what an ``image_uri`` field takes."""
    return _is_http_url(value) or (isinstance(value, str) and _IMAGE_DATA_URI.fullmatch(value) is not None)


IMAGE_FORMAT = "image_uri"
"""The schema format of a field holding an image: a URL, a data URI, or in a manifest a local file."""
_FORMATS = jsonschema.FormatChecker()
_FORMATS.checks(IMAGE_FORMAT)(_is_image_uri)
_FORMATS.checks("uri")(_is_http_url)


@dataclass(frozen=True, slots=True)
class FieldError:
    """One validation failure: ``field`` is a dotted path such as ``image_urls.0``."""

    field: str
    message: str


# Top-level keywords that per-field validation fully covers: with anything else
# (allOf, if/then, $ref, ...) the whole payload goes through jsonschema.
_PER_FIELD_KEYWORDS = {
    "$schema",
    "$id",
    "title",
    "description",
    "type",
    "properties",
    "required",
    "additionalProperties",
}
_CACHE_LIMIT = 20_000
_SHARED_LIMIT = 256
_UNSET = object()


@dataclass(frozen=True, slots=True)
class ModelSchema:
    """A model's input schema, with the operations the manifest needs."""

    model_id: str
    schema: dict[str, Any]
    source: Path
    _checks: _Checks = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_checks", _checks_for(self.schema))

    @property
    def properties(self) -> dict[str, Any]:
        props: dict[str, Any] = self.schema.get("properties", {})
        return props

    @property
    def image_fields(self) -> dict[str, bool]:
        """Fields holding images (format ``image_uri``, or a list of them): name → whether it is a list."""
        return self._checks.image_fields

    @property
    def required(self) -> list[str]:
        return list(self.schema.get("required", []))

    def with_defaults(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A copy of payload with every schema default filled in, so the journal shows exactly what was sent.

        Required fields keep no default: the seed schema gives the playground's
        example prompt as a "default", and silently sending it would be wrong.
        """
        # Shallow: jobs of one entry share its lists (memory flat over 50,000 rows); inputs are never mutated.
        filled = dict(payload)
        for name, default in self._checks.defaults.items():
            if name not in filled:
                filled[name] = copy.deepcopy(default) if isinstance(default, list | dict) else default
        return filled

    def validate(self, payload: dict[str, Any]) -> list[FieldError]:
        """Every problem with payload, sorted by field; an empty list means valid."""
        checks = self._checks
        names = payload.keys()
        problems = (
            []  # set comparisons in C first: this runs for every job of a 100,000-job manifest
            if names <= checks.known
            else [FieldError(name, self._unknown_field_message(name)) for name in payload if name not in checks.known]
        )
        if checks.by_field is None:
            for error in checks.whole.iter_errors(payload):
                if error.validator != "additionalProperties":  # reported above, with a hint
                    problems.append(FieldError(_dotted(error.absolute_path), _explain(error)))
        else:
            if not checks.required_set <= names:
                problems.extend(
                    FieldError("", f"{name!r} is required") for name in checks.required if name not in payload
                )
            by_field, field_errors, sound = checks.by_field, checks.field_errors, checks.sound_defaults
            for name, value in payload.items():
                # A default `with_defaults` filled in is that very object, checked once: most fields of most jobs.
                if name in by_field and value is not sound.get(name, _UNSET):
                    problems.extend(field_errors(name, value))
        return sorted(problems, key=lambda p: p.field) if problems else problems

    def _unknown_field_message(self, name: str) -> str:
        known = sorted(self.properties)
        close = difflib.get_close_matches(str(name), known, n=1)  # YAML keys may be numbers
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown field for {self.model_id}{hint}; expected one of: {', '.join(known)}"


class _Checks:
    """Compiled validators for one schema.

    Validation dominates loading a large manifest (~175 us a job through the
    whole schema). Checking field by field lets the values that repeat across
    thousands of jobs (image URLs, enums) be checked once: a bounded cache keyed
    by field and value. Unique values such as prompts are checked each time.
    """

    def __init__(self, schema: dict[str, Any]) -> None:
        self.whole = jsonschema.Draft202012Validator(schema, format_checker=_FORMATS)
        self.by_field: dict[str, jsonschema.protocols.Validator] | None = None
        if set(schema) <= _PER_FIELD_KEYWORDS and "$ref" not in json.dumps(schema):
            self.by_field = {
                name: jsonschema.Draft202012Validator(spec, format_checker=_FORMATS)
                for name, spec in schema.get("properties", {}).items()
            }
        required = set(schema.get("required", []))
        self.required = tuple(schema.get("required", []))
        self.required_set = frozenset(self.required)
        self.known = frozenset(schema.get("properties", {}))
        self.defaults = {
            name: spec["default"]
            for name, spec in schema.get("properties", {}).items()
            if name not in required and "default" in spec
        }
        self._seen: dict[tuple[str, Any], tuple[FieldError, ...]] = {}
        self._shared: dict[int, tuple[Any, str, tuple[FieldError, ...]]] = {}
        """What `field_errors` found of a list or object, by identity: jobs of one entry share theirs."""
        self.sound_defaults = {
            name: default
            for name, default in self.defaults.items()
            if self.by_field is not None and name in self.by_field and not any(self.by_field[name].iter_errors(default))
        }
        """The defaults that pass their own field's check, by identity in `ModelSchema.validate`."""
        self.plain_strings: dict[str, Callable[[Any], bool]] = {}
        """Fields whose valid values a few Python tests recognise (jsonschema still words any refusal)."""
        for name, spec in schema.get("properties", {}).items():
            accepts = _plain_string(spec)
            if accepts is not None:
                self.plain_strings[name] = accepts
        self.image_fields: dict[str, bool] = {}
        for name, spec in schema.get("properties", {}).items():
            if not isinstance(spec, dict):
                continue
            if spec.get("format") == IMAGE_FORMAT:
                self.image_fields[name] = False
            elif isinstance(spec.get("items"), dict) and spec["items"].get("format") == IMAGE_FORMAT:
                self.image_fields[name] = True

    def field_errors(self, name: str, value: Any) -> tuple[FieldError, ...]:
        assert self.by_field is not None
        accepts = self.plain_strings.get(name)
        if accepts is not None and accepts(value):
            return ()  # a prompt: unique each job, so the cache would only churn
        shared = type(value) is list or type(value) is dict
        if shared:
            known = self._shared.get(id(value))
            if known is not None and known[0] is value and known[1] == name:
                return known[2]
        cache_key = (name, _frozen(value))
        found = self._seen.get(cache_key)
        if found is None:
            found = tuple(
                FieldError(_dotted([name, *error.absolute_path]), _explain(error))
                for error in self.by_field[name].iter_errors(value)
            )
            if len(self._seen) >= _CACHE_LIMIT:
                self._seen.clear()
            self._seen[cache_key] = found
        if shared:  # the entry's list, in every job of its rows: by identity next time (kept alive)
            if len(self._shared) >= _SHARED_LIMIT:
                self._shared.clear()
            self._shared[id(value)] = (value, name, found)
        return found


_PLAIN_STRING_KEYWORDS = {"title", "description", "default", "examples", "type", "enum", "minLength", "maxLength"}


def _plain_string(spec: Any) -> Callable[[Any], bool] | None:
    """For a field that is a string with at most an enum and length bounds: a test that is true exactly
    of the values jsonschema accepts. None for any other field (jsonschema checks it)."""
    if not isinstance(spec, dict) or spec.get("type") != "string" or not set(spec) <= _PLAIN_STRING_KEYWORDS:
        return None
    enum = spec.get("enum")
    shortest = spec.get("minLength", 0)
    longest = spec.get("maxLength", math.inf)
    if enum is not None and not (isinstance(enum, list) and all(type(option) is str for option in enum)):
        return None
    if any(type(bound) is not int for bound in (shortest, longest) if bound is not math.inf):
        return None
    options = None if enum is None else frozenset(enum)

    def accepts(value: Any) -> bool:
        return type(value) is str and (options is None or value in options) and shortest <= len(value) <= longest

    return accepts


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a JSON value that tells 1, 1.0 and True apart."""
    if type(value) is list and all(type(item) is str for item in value):
        return ("strings", *value)  # image_urls: the common case, built without a call per item
    if isinstance(value, list):
        return ("list", *(_frozen(item) for item in value))
    if isinstance(value, dict):
        return ("dict", *sorted((str(k), _frozen(v)) for k, v in value.items()))
    return (type(value).__name__, value)


_compiled: dict[int, tuple[dict[str, Any], _Checks]] = {}


def _checks_for(schema: dict[str, Any]) -> _Checks:
    # Keyed by identity: schemas come from the cached _read_schema, one dict a file.
    entry = _compiled.get(id(schema))
    if entry is None or entry[0] is not schema:
        entry = _compiled[id(schema)] = (schema, _Checks(schema))
    return entry[1]


def _dotted(path: Iterable[str | int]) -> str:
    return ".".join(str(part) for part in path)


def _explain(error: jsonschema.ValidationError) -> str:
    """jsonschema's messages, reworded where they would puzzle a manifest author."""
    value = error.instance
    if error.validator == "enum":
        options = ", ".join(str(v) for v in error.validator_value)  # type: ignore[union-attr]
        return f"{value!r} is not allowed; expected one of: {options}"
    if error.validator == "required":
        return str(error.message).replace("is a required property", "is required")
    if error.validator == "format" and error.validator_value == IMAGE_FORMAT:
        return f"{shorten(value)} is not an http(s) URL, an image data: URI or a local image file"
    if error.validator == "format":
        return f"{value!r} is not an http(s) URL"
    if error.validator == "minItems":
        return f"needs at least {error.validator_value} item(s)"
    if error.validator == "maxItems":
        return f"takes at most {error.validator_value} items, got {len(value)}"  # type: ignore[arg-type]
    if error.validator == "type":
        return f"expected {error.validator_value}, got {type(value).__name__} {value!r}"
    return str(error.message)


def _schema_path(model_id: str, directory: Path) -> Path:
    return directory.joinpath(*model_id.split("/")).with_name(model_id.rsplit("/", 1)[1] + ".input.json")


def available_models(directories: Sequence[Path] = ()) -> list[str]:
    """Model ids with a schema in the given folders or bundled with batcher."""
    found: set[str] = set()
    for directory in [*directories, bundled_schema_dir()]:
        for path in directory.rglob("*.input.json"):
            relative = path.relative_to(directory).as_posix()
            found.add(relative.removesuffix(".input.json"))
    return sorted(found)


@cache
def _read_schema(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        msg = f"cannot read the schema {path}: {exc}"
        raise UsageError(msg) from exc
    if not isinstance(loaded, dict):
        msg = f"the schema {path} is not a JSON object"
        raise UsageError(msg)
    jsonschema.Draft202012Validator.check_schema(loaded)
    return loaded


def load_model_schema(model_id: str, directories: Sequence[Path] = ()) -> ModelSchema:
    """The input schema of model_id, from the given folders first, then the bundled ones.

    Raises UsageError when no schema is known for the model; the message lists
    the models that are.
    """
    if not _MODEL_ID.match(model_id) or ".." in model_id.split("/"):
        msg = f"{model_id!r} is not a model id like 'openai/gpt-image-1-5/image-to-image'"
        raise UsageError(msg)
    for directory in [*directories, bundled_schema_dir()]:
        path = _schema_path(model_id, directory)
        if path.is_file():
            return ModelSchema(model_id=model_id, schema=_read_schema(path), source=path)
    models = available_models(directories)
    known = ", ".join(models) or "none"
    msg = f"no input schema for model {model_id!r}{did_you_mean(model_id, models)}; known models: {known}"
    raise UsageError(msg)
