"""What does the sandbox's catalog say? RunComfy's ``GET /v1/models`` and ``/v1/models/categories``, from the schemas.

Pure: every answer is built from the model schemas the sandbox knows (the bundled
ones and `SandboxSettings.schema_dirs`) and their price tables; nothing is kept.

The wire shape is the one RunComfy's own clients read:

- its CLI (runcomfy-com/runcomfy-cli ``src/cmd/models.rs``) asks
  ``GET /v1/models?search=&category=&kind=&include_schema=&limit=&offset=`` and reads
  ``{"models": [...], "total": N}``, each entry's ``model_id``, ``display_name``,
  ``categories``, ``base_price_usd`` and ``price_unit``; ``GET /v1/models/categories``
  answers ``{"categories": [...]}``; ``GET /v1/models/{id}`` the entry itself;
- its ComfyUI nodes (``scripts/update_model_catalog.py``, ``runcomfy/pricing.py``) read an
  entry's ``kind`` (``"model"``), ``categories`` (a list; the output kind is its ending:
  ``…-video``), ``price_unit`` (``output`` or ``second``), ``pricing_note`` and, with
  ``include_schema=true``, ``input_schema``.

Not shown by any of them, so chosen here and optional on batcher's side: how ``search``
matches (a case-insensitive substring of the id, name or a category), the default and
largest page (`DEFAULT_LIMIT`, `MAX_LIMIT`), that ``total`` counts the matches before
paging, and that the model's own entry carries its schema (the CLI's ``models get``
prints it as "the useful part").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..manifest.cost import load_price_table
from ..manifest.schema import available_models, load_model_schema

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "Answer",
    "categories_answer",
    "entry",
    "is_video",
    "models_answer",
]

DEFAULT_LIMIT = 20
MAX_LIMIT = 100

Answer = tuple[int, dict[str, Any]]
"""An HTTP status and a JSON body."""

_NAMES = {
    "openai/gpt-image-1-5/image-to-image": "GPT Image 1.5 Image to Image",
    "wan-ai/wan-3.0/image-to-video": "Wan 3.0 Image to Video",
}
"""Display names of the bundled models; any other is named from its id."""


def _display_name(model: str) -> str:
    if model in _NAMES:
        return _NAMES[model]
    _, *rest = model.split("/")
    return " ".join(part.replace("-", " ").title() for part in rest)


def _categories(model: str) -> list[str]:
    """The model's category, from the last part of its id as RunComfy spells modes (``image-to-video``)."""
    return [model.rsplit("/", 1)[-1]]


def is_video(model: str) -> bool:
    """The model's outputs are videos (a category ending in ``video``, as RunComfy's nodes read it)."""
    return any(category.endswith("video") for category in _categories(model))


def entry(
    model: str, schema_dirs: Sequence[Path], *, include_schema: bool, model_price: float | None = None
) -> dict[str, Any] | None:
    """The catalog entry of model, or None when the sandbox has no schema for it."""
    try:
        schema = load_model_schema(model, schema_dirs)
    except UsageError:
        return None
    found: dict[str, Any] = {
        "model_id": model,
        "display_name": _display_name(model),
        "categories": _categories(model),
        "kind": "model",
    }
    table = load_price_table(model, schema_dirs)
    price = table.rate(schema.with_defaults({})) if table else None
    if model_price is not None:
        price = model_price  # a price change at RunComfy, for rehearsals and tests
    if table is not None and price is not None:
        found.update(base_price_usd=price, price_unit=table.unit, pricing_note=table.note, currency="USD")
    if include_schema:
        found["input_schema"] = schema.schema
    return found


def _flag(query: Mapping[str, list[str]], name: str) -> bool:
    return query.get(name, [""])[-1].strip().lower() in ("true", "1")


def _count(query: Mapping[str, list[str]], name: str, default: int, largest: int) -> int | str:
    """A paging number from the query, or the refusal's text."""
    given = query.get(name, [""])[-1].strip()
    if not given:
        return default
    if not given.isdigit() or int(given) > largest:
        return f"{name} must be a whole number from 0 to {largest}"
    return int(given)


def models_answer(
    query: Mapping[str, list[str]], schema_dirs: Sequence[Path], *, model_price: float | None = None
) -> Answer:
    """``GET /v1/models``: the models matching search, category and kind, one page of them."""
    limit = _count(query, "limit", DEFAULT_LIMIT, MAX_LIMIT)
    offset = _count(query, "offset", 0, 1_000_000)
    problems = [problem for problem in (limit, offset) if isinstance(problem, str)]
    if problems or limit == 0:
        detail = [{"loc": "query", "msg": problem} for problem in problems or ["limit must be at least 1"]]
        return 422, {"error_code": 422001, "error_message": "Validation failed", "detail": detail}
    assert isinstance(limit, int) and isinstance(offset, int)
    search = query.get("search", [""])[-1].strip().lower()
    category = query.get("category", [""])[-1].strip()
    kind = query.get("kind", [""])[-1].strip()
    include_schema = _flag(query, "include_schema")
    matched = []
    for model in available_models(schema_dirs):
        found = entry(model, schema_dirs, include_schema=include_schema, model_price=model_price)
        if found is None:
            continue
        words = [model, found["display_name"], *found["categories"]]
        if search and not any(search in word.lower() for word in words):
            continue
        if category and category not in found["categories"]:
            continue
        if kind and kind != found["kind"]:
            continue
        matched.append(found)
    return 200, {"models": matched[offset : offset + limit], "total": len(matched)}


def categories_answer(schema_dirs: Sequence[Path]) -> Answer:
    """``GET /v1/models/categories``: every category of the sandbox's models, each once."""
    found = sorted({category for model in available_models(schema_dirs) for category in _categories(model)})
    return 200, {"categories": found}
