"""What does RunComfy's live catalog say about its models, and how is a model's schema pinned from it?

The catalog is read as RunComfy's own CLI reads it (runcomfy-com/runcomfy-cli
``src/cmd/models.rs``): ``GET /v1/models`` with ``search``, ``category``,
``include_schema`` and ``limit``/``offset`` paging answers ``{"models": [...], "total": N}``;
``GET /v1/models/categories`` answers ``{"categories": [...]}``; ``GET /v1/models/{id}`` is
one model's entry. An entry has ``model_id``, ``display_name``, ``categories``,
``base_price_usd``, ``price_unit`` (``output``, or ``second`` for video, as RunComfy's nodes
read it), ``pricing_note``, ``kind`` and, asked for, ``input_schema``. Only ``model_id`` is
required here; a field no source shows the type of is kept optional.

Every call goes through `RunComfyClient`: answers capped in bytes
(`DEFAULT_MAX_ANSWER_BYTES`) and depth (`MAX_JSON_DEPTH`), each call within its
deadline, the token sent to the API base alone. An answer over a cap, not JSON,
or not of the shape above is a `CatalogError` (nothing is written from it); an
outage stays the client's error.

`pin` writes a model's entry into a schema folder, in the layout
`batcher.manifest.schema` reads (``<folder>/<vendor>/<model>/<mode>.input.json``),
with a price table beside it (``.pricing.json``, `batcher.manifest.cost`) and a
record of where and when it came from (``.source.json``), so a pulled model runs
from a manifest and stays reproducible in git.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import jsonschema

from ..errors import ApiError, CatalogError, RateLimitedError, TransientApiError, UnreachableError
from ..manifest.cost import MAX_PRICE, forget_price_tables, load_price_table, scaled_prices
from ..manifest.schema import ModelSchema
from ..net.retrying import RetryPolicy
from ..printable import printable
from .answers import Unreadable
from .client import RunComfyClient

__all__ = [
    "MAX_MODELS",
    "PAGE",
    "CatalogEntry",
    "catalog_client",
    "categories",
    "differences",
    "fetch_entry",
    "list_models",
    "pin",
]

PAGE = 50
"""Models asked for per page (RunComfy's own default and largest page are not documented)."""
MAX_MODELS = 5000
"""Models listed at most: a catalog that pages on past this is not believed."""
_TIMEOUT = httpx2.Timeout(20.0, connect=10.0)
_RETRY = RetryPolicy(attempts=2, base=0.2, cap=1.0)
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)+$")
_MAX_CATEGORIES = 50


def catalog_client(api_base: str, token: str, *, transport: httpx2.AsyncBaseTransport | None = None) -> RunComfyClient:
    """A client for catalog reads: a poll's timeouts, one retry, the usual caps."""
    return RunComfyClient(token, api_base, retry=_RETRY, transport=transport, poll_timeout=_TIMEOUT)


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One model as RunComfy's catalog states it."""

    model_id: str
    display_name: str = ""
    categories: tuple[str, ...] = ()
    kind: str = ""
    price: float | None = None
    """``base_price_usd``: per ``price_unit``, at the model's default settings."""
    price_unit: str = ""
    pricing_note: str = ""
    input_schema: dict[str, Any] | None = None

    def price_text(self) -> str:
        """``$0.034/output`` as RunComfy's CLI prints a price, ``-`` without one."""
        if self.price is None:
            return "-"
        return f"${self.price:g}/{self.price_unit}" if self.price_unit else f"${self.price:g}"


async def _read(client: RunComfyClient, part: str = "", params: dict[str, str] | None = None) -> dict[str, Any]:
    """One catalog call: what the client raises, but an answer batcher will not read is a CatalogError."""
    try:
        if part.startswith("model:"):
            return await client.model_info(part.removeprefix("model:"))
        return await client.catalog(part, params)
    except (RateLimitedError, UnreachableError):
        raise
    except TransientApiError as exc:
        hostile = isinstance(exc.__cause__, Unreadable) or (
            not isinstance(exc.__cause__, httpx2.HTTPError) and exc.status_code is None
        )
        if hostile:  # too big, too deep, trickled, not JSON: the same next time
            msg = f"RunComfy's catalog answer was not used: {exc}"
            raise CatalogError(msg, status_code=exc.status_code) from exc
        raise


def _text(value: object, name: str, where: str, limit: int = 200) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CatalogError(f"{where}: {name} is {type(value).__name__}, not text")
    return printable(value, limit)


def _entry(value: object, where: str) -> CatalogEntry:
    """An entry, checked field by field; CatalogError names the first field of the wrong type."""
    if not isinstance(value, dict):
        raise CatalogError(f"{where} is {type(value).__name__}, not a model entry (a JSON object)")
    model_id = value.get("model_id")
    if not isinstance(model_id, str) or len(model_id) > 300 or not _MODEL_ID.match(model_id) or ".." in model_id:
        raise CatalogError(
            f"{where}: model_id {printable(repr(model_id), 80)} is not a model id like 'vendor/model/mode'"
        )
    where = f"{where} ({model_id})"
    raw_categories = value.get("categories")
    if raw_categories is None:
        raw_categories = value.get("category")  # a single word, as some pages name it
    if isinstance(raw_categories, str):
        raw_categories = [raw_categories]
    if raw_categories is None:
        raw_categories = []
    if not isinstance(raw_categories, list) or len(raw_categories) > _MAX_CATEGORIES:
        raise CatalogError(f"{where}: categories is not a list of at most {_MAX_CATEGORIES} words")
    found_categories = tuple(_text(word, "a category", where, 80) for word in raw_categories)
    price = value.get("base_price_usd")
    if price is not None and (
        not isinstance(price, int | float) or isinstance(price, bool) or not math.isfinite(price) or price < 0
    ):
        raise CatalogError(f"{where}: base_price_usd {printable(repr(price), 40)} is not a price")
    schema = value.get("input_schema")
    if schema is not None:
        if not isinstance(schema, dict) or not isinstance(schema.get("properties", {}), dict):
            raise CatalogError(f"{where}: input_schema is not a JSON Schema object with properties")
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise CatalogError(f"{where}: input_schema is not a JSON Schema: {printable(exc.message, 300)}") from exc
    return CatalogEntry(
        model_id=model_id,
        display_name=_text(value.get("display_name"), "display_name", where),
        categories=found_categories,
        kind=_text(value.get("kind"), "kind", where, 40),
        price=None if price is None else float(price),
        price_unit=_text(value.get("price_unit"), "price_unit", where, 40),
        pricing_note=_text(value.get("pricing_note"), "pricing_note", where, 300),
        input_schema=schema,
    )


async def list_models(
    client: RunComfyClient,
    search: str | None = None,
    category: str | None = None,
    *,
    include_schema: bool = False,
    most: int = MAX_MODELS,
) -> tuple[list[CatalogEntry], int]:
    """The models matching search and category, page after page (at most ``most``), and the total the catalog states."""
    found: list[CatalogEntry] = []
    total = 0
    offset = 0
    while len(found) < most:
        params = {"limit": str(min(PAGE, most - len(found))), "offset": str(offset)}
        if search and search.strip():
            params["search"] = search.strip()
        if category and category.strip():
            params["category"] = category.strip()
        if include_schema:
            params["include_schema"] = "true"
        answer = await _read(client, "", params)
        page = answer.get("models")
        if not isinstance(page, list):
            raise CatalogError(f"RunComfy's catalog answer has no list of models (models is {type(page).__name__})")
        stated = answer.get("total", len(found) + len(page))
        if not isinstance(stated, int) or isinstance(stated, bool) or stated < 0:
            raise CatalogError(f"RunComfy's catalog answer states a total of {printable(repr(stated), 40)}")
        total = stated
        found.extend(_entry(item, f"model {offset + number + 1} of the catalog") for number, item in enumerate(page))
        offset += len(page)
        if not page or offset >= total:
            break
    return found[:most], total


async def categories(client: RunComfyClient) -> list[str]:
    """The catalog's categories (``GET /v1/models/categories``)."""
    answer = await _read(client, "categories")
    words = answer.get("categories")
    if not isinstance(words, list) or len(words) > 1000:
        raise CatalogError("RunComfy's categories answer is not a list of words")
    return [_text(word, "a category", "the categories answer", 80) for word in words]


async def fetch_entry(client: RunComfyClient, model_id: str) -> CatalogEntry:
    """model_id's entry with its input schema: ``GET /v1/models/{id}``, else the catalog asked with include_schema."""
    if len(model_id) > 300 or not _MODEL_ID.match(model_id) or ".." in model_id.split("/"):
        # Before any request: the id becomes a URL path here and a file path in `pin`.
        msg = f"{model_id!r} is not a RunComfy model id (vendor/model/mode, e.g. openai/gpt-image-1-5/image-to-image)"
        raise CatalogError(msg)
    try:
        found = _entry(await _read(client, f"model:{model_id}"), f"RunComfy's entry for {model_id}")
    except CatalogError:
        raise
    except ApiError as exc:
        # 400001 is RunComfy's unknown model; a 404 (404001) on the model's own path says the same.
        if exc.error_code in (400001, 404001) or exc.status_code == 404:
            raise CatalogError(f"RunComfy's catalog does not know the model {model_id!r}: {exc}") from exc
        raise
    if found.model_id != model_id:
        raise CatalogError(f"asked RunComfy's catalog for {model_id}; it answered with the entry of {found.model_id}")
    if found.input_schema is None:
        listed, _ = await list_models(client, model_id, include_schema=True, most=PAGE)
        same = [entry for entry in listed if entry.model_id == model_id and entry.input_schema is not None]
        if not same:
            raise CatalogError(f"RunComfy's catalog gives no input schema for {model_id}")
        found = same[0]
    return found


def differences(pinned: dict[str, Any], live: dict[str, Any]) -> list[str]:
    """How live differs from pinned, one phrase per field (or per top-level keyword); empty: the same."""
    said: list[str] = []
    old, new = pinned.get("properties") or {}, live.get("properties") or {}
    said += [f"{name!r} is only in the live one" for name in new if name not in old]
    said += [f"{name!r} is only in the pinned one" for name in old if name not in new]
    said += [f"{name!r} changed" for name in old if name in new and old[name] != new[name]]
    if sorted(pinned.get("required") or []) != sorted(live.get("required") or []):
        said.append("the required fields changed")
    ignored = {"properties", "required", "title", "description"}
    said += [
        f"{key!r} changed" for key in sorted((set(pinned) | set(live)) - ignored) if pinned.get(key) != live.get(key)
    ]
    return said


def _file_stem(folder: Path, model_id: str) -> Path:
    """folder/<vendor>/<model>/<mode> (each pin's files add their own suffix), as the schema loader lays them."""
    return folder.joinpath(*model_id.split("/"))


def _dumped(value: object) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()


@dataclass(frozen=True, slots=True)
class Pinned:
    """What `pin` wrote, and what it could not say."""

    schema: Path
    source: Path
    pricing: Path | None
    said: list[str]


def pin(entry: CatalogEntry, folder: Path, source_url: str, *, source: str, schema_dirs: Sequence[Path] = ()) -> Pinned:
    """Write entry's input schema, price table and source record under folder; what was written.

    A price table already known for the model (in folder, schema_dirs or bundled) that prices
    settings differently keeps its ratios, scaled to the live price; otherwise the table is the
    live price itself (per ``second`` of ``duration`` for a video). No price, or a unit batcher
    cannot use: no table, and the lines say so.
    """
    assert entry.input_schema is not None
    stem = _file_stem(folder, entry.model_id)
    stem.parent.mkdir(parents=True, exist_ok=True)
    mode = stem.name
    schema_path = stem.with_name(f"{mode}.input.json")
    schema_bytes = _dumped(entry.input_schema)
    today = time.strftime("%Y-%m-%d")
    said: list[str] = []
    known = load_price_table(entry.model_id, [folder, *schema_dirs])
    pricing: dict[str, Any] | None = None
    if entry.price is None:
        said.append("the catalog states no price for it: plan and the spend prompt will show '?'")
    elif not 0 < entry.price <= MAX_PRICE:
        # A table of zeros would price every job at $0, and --max-cost could never stop a run: not believed.
        said.append(
            f"its catalog price ${entry.price:g} is not believed (not above $0, at most ${MAX_PRICE:g}): no table written"
        )
    elif entry.price_unit not in ("output", "second", ""):
        said.append(
            f"its price is per {entry.price_unit!r}, a unit batcher cannot turn into a job's price: no table written"
        )
    else:
        unit = entry.price_unit or "output"
        where = f"RunComfy's catalog ({source}): ${entry.price:g} per {unit} at the default settings"
        pricing = {
            "model": entry.model_id,
            "currency": "USD",
            "unit": unit,
            "keys": [],
            "prices": entry.price,
            "source": where,
            "source_url": source_url,
            "as_of": today,
            "note": entry.pricing_note,
        }
        if unit == "second":
            pricing["per"] = "duration"
        defaults = ModelSchema(entry.model_id, entry.input_schema, schema_path).with_defaults({})
        rate = known.rate(defaults) if known is not None and known.keys and known.unit == unit else None
        if known is not None and rate:
            pricing.update(
                keys=list(known.keys),
                prices=scaled_prices(known.prices, entry.price / rate),
                source=f"{where}, with the ratios between settings of {known.source}",
                **({"per": known.per} if known.per else {}),
            )
    source_record = {
        "model_id": entry.model_id,
        "display_name": entry.display_name,
        "categories": list(entry.categories),
        "source": source,
        "source_url": source_url,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_price_usd": entry.price,
        "price_unit": entry.price_unit or None,
        "pricing_note": entry.pricing_note,
        "input_schema_sha256": hashlib.sha256(schema_bytes).hexdigest(),
    }
    schema_path.write_bytes(schema_bytes)
    source_path = stem.with_name(f"{mode}.source.json")
    source_path.write_bytes(_dumped(source_record))
    pricing_path = None
    if pricing is not None:
        pricing_path = stem.with_name(f"{mode}.pricing.json")
        pricing_path.write_bytes(_dumped(pricing))
        forget_price_tables()
    return Pinned(schema_path, source_path, pricing_path, said)
