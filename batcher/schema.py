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
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema

from .errors import UsageError

__all__ = ["FieldError", "ModelSchema", "bundled_schema_dir", "load_model_schema"]

_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)+$")


def bundled_schema_dir() -> Path:
    """The folder holding the schemas that ship with batcher."""
    installed = Path(__file__).parent / "_schemas"
    if installed.is_dir():
        return installed
    # A source checkout or an editable install: the repository's own folder.
    return Path(__file__).resolve().parent.parent / "schemas"


def _is_http_url(value: object) -> bool:
    if not isinstance(value, str):
        return True  # the "type" keyword reports non-strings
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


_FORMATS = jsonschema.FormatChecker()
_FORMATS.checks("image_uri")(_is_http_url)
_FORMATS.checks("uri")(_is_http_url)


@dataclass(frozen=True, slots=True)
class FieldError:
    """One validation failure: ``field`` is a dotted path such as ``image_urls.0``."""

    field: str
    message: str


@dataclass(frozen=True, slots=True)
class ModelSchema:
    """A model's input schema, with the operations the manifest needs."""

    model_id: str
    schema: dict[str, Any]
    source: Path

    @property
    def properties(self) -> dict[str, Any]:
        props: dict[str, Any] = self.schema.get("properties", {})
        return props

    @property
    def required(self) -> list[str]:
        return list(self.schema.get("required", []))

    def with_defaults(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A copy of payload with every schema default filled in, so the journal shows exactly what was sent.

        Required fields keep no default: the seed schema gives the playground's
        example prompt as a "default", and silently sending it would be wrong.
        """
        filled = copy.deepcopy(payload)
        required = set(self.required)
        for name, spec in self.properties.items():
            if name not in filled and name not in required and "default" in spec:
                filled[name] = copy.deepcopy(spec["default"])
        return filled

    def validate(self, payload: dict[str, Any]) -> list[FieldError]:
        """Every problem with payload, sorted by field; an empty list means valid."""
        problems: list[FieldError] = []
        for name in payload:
            if name not in self.properties:
                problems.append(FieldError(name, self._unknown_field_message(name)))
        validator = jsonschema.Draft202012Validator(self.schema, format_checker=_FORMATS)
        for error in validator.iter_errors(payload):
            problems.append(FieldError(_dotted(error.absolute_path), _explain(error)))
        return sorted(problems, key=lambda p: p.field)

    def _unknown_field_message(self, name: str) -> str:
        known = sorted(self.properties)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown field for {self.model_id}{hint}; expected one of: {', '.join(known)}"


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
    known = ", ".join(available_models(directories)) or "none"
    msg = f"no input schema for model {model_id!r}; known models: {known}"
    raise UsageError(msg)
