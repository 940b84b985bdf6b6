"""Price estimates from a bundled, per-model price table.

A table is a JSON file beside the model's input schema
(``<model>.pricing.json``): ``keys`` names the input fields that set the
price, and ``prices`` nests one level per key. ``source``, ``as_of``,
``unit`` (RunComfy's ``price_unit``, ``output`` for an image) and ``note``
say where the numbers come from; other fields (``provenance``) are for
people and ignored. A model priced per second (``unit: second``, a video)
names in ``per`` the input field holding the seconds (``duration``): a job
costs the price found by ``keys`` times that field's value. With no
``keys``, ``prices`` is the one price itself. Where a table prices a field the service may resolve
either way, it should give the upper bound.

Prices change: a folder named by ``BATCHER_PRICES``, laid out the same way
(``openai/gpt-image-1-5/image-to-image.pricing.json``), overrides the
bundled tables.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from .job import Job
from .schema import bundled_schema_dir

__all__ = [
    "MAX_PRICE",
    "PRICES_ENV",
    "PriceTable",
    "estimate",
    "estimator",
    "forget_price_tables",
    "load_price_table",
    "scaled_prices",
]

MAX_PRICE = 1000.0
"""A live price above this many dollars a unit is not believed (kept out of every estimate and every pinned table)."""

PRICES_ENV = "BATCHER_PRICES"


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Prices for one model, with where they came from."""

    model: str
    keys: tuple[str, ...]
    prices: Any
    """One level of nesting per key (a dict), down to numbers; with no keys, the number itself."""
    source: str
    as_of: str
    unit: str = "output"
    """RunComfy's ``price_unit`` (``output`` for an image model, ``second`` for video)."""
    note: str = ""
    """One line on how the prices go, as RunComfy's ``pricing_note``."""
    per: str | None = None
    """The input field whose value multiplies the price (``duration`` for a price per second); None: per job."""

    def rate(self, payload: dict[str, Any]) -> float | None:
        """The price per ``unit`` (what RunComfy's ``base_price_usd`` states) for this input, or None."""
        level: Any = self.prices
        for key in self.keys:
            if not isinstance(level, dict):
                return None
            level = level.get(str(payload.get(key)))
        if not isinstance(level, int | float) or isinstance(level, bool) or not math.isfinite(level):
            return None
        return float(level)

    def price(self, payload: dict[str, Any]) -> float | None:
        """The price of one job with this input, or None when the table does not say."""
        rate = self.rate(payload)
        if rate is None or self.per is None:
            return rate
        amount = payload.get(self.per)  # "5" as some schemas spell seconds; "auto" is not a number of them
        if isinstance(amount, str) and amount.isdigit():
            amount = int(amount)
        if not isinstance(amount, int | float) or isinstance(amount, bool) or not 0 < amount < 100_000:
            return None
        return rate * float(amount)


@cache
def _load(path: Path) -> PriceTable | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return PriceTable(
            model=data["model"],
            keys=tuple(data["keys"]),
            prices=data["prices"],
            source=data.get("source", ""),
            as_of=data.get("as_of", ""),
            unit=str(data.get("unit") or "output"),
            note=str(data.get("note") or ""),
            per=str(data["per"]) if data.get("per") else None,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_price_table(model_id: str, directories: Sequence[Path] = ()) -> PriceTable | None:
    """The price table for model_id from the given folders, then BATCHER_PRICES, then the bundled ones."""
    return _find(model_id, tuple(directories), os.environ.get(PRICES_ENV))


def estimate(job: Job, directories: Sequence[Path] = ()) -> float | None:
    """One job's price, or None when no table says; directories are the manifest's schema folders."""
    table = load_price_table(job.model, directories)
    return table.price(job.input) if table else None


def estimator(directories: Sequence[Path] = ()) -> Callable[[Job], float | None]:
    """`estimate`, for one pass over many jobs: each model's table looked up once (not the environment and
    the folders for every job), and the price of an input many jobs share (the load's table of them:
    `batcher.manifest.jobtable`) computed once, by identity."""
    tables: dict[str, PriceTable | None] = {}
    shared: dict[int, tuple[dict[str, Any], str, float | None]] = {}

    def price(job: Job) -> float | None:
        known = shared.get(id(job.input))
        if known is not None and known[0] is job.input and known[1] == job.model:
            return known[2]
        if job.model not in tables:
            tables[job.model] = load_price_table(job.model, directories)
        table = tables[job.model]
        found = table.price(job.input) if table else None
        if len(shared) >= 256:
            shared.clear()
        shared[id(job.input)] = (job.input, job.model, found)  # kept alive: its id names it alone
        return found

    return price


def forget_price_tables() -> None:
    """Drop the cached tables: a run just wrote a new one (the live price) where they are looked up."""
    _find.cache_clear()
    _load.cache_clear()


@cache
def _find(model_id: str, directories: tuple[Path, ...], override: str | None) -> PriceTable | None:
    # Cached: estimates run once per job, and a file system look-up per job adds up at 100,000.
    name = model_id.rsplit("/", 1)[-1] + ".pricing.json"
    for directory in [*directories, *([Path(override)] if override else []), bundled_schema_dir()]:
        path = directory.joinpath(*model_id.split("/")).with_name(name)
        if path.is_file():
            return _load(path)
    return None


def scaled_prices(prices: object, factor: float) -> object:
    """A price table's nested prices, each times factor: a bundled table's ratios between settings, set to the
    level of a live price."""
    if isinstance(prices, dict):
        return {key: scaled_prices(value, factor) for key, value in prices.items()}
    if isinstance(prices, int | float) and not isinstance(prices, bool):
        return round(float(prices) * factor, 6)
    return prices
