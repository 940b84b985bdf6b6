"""What RunComfy says right now about the account and its models: the balance, and the live price.

Both are asked before a run's first submit (and by `plan` when a token is
set), each with a short timeout; when either cannot be had, the run goes on
with the bundled price table and says so.

- **The live price** is ``GET /v1/models/{id}`` on the API: ``base_price_usd``
  per ``price_unit`` at the model's default settings. The bundled table
  gives the price of each setting; the live price sets the level. The
  result is cached in the output folder as a price table of its own
  (``.prices/<model id>.pricing.json``, with its date and source), which
  `plan`, `status` and ``--max-cost`` read first.
- **The balance** is ``GET /balance`` on RunComfy's *other* host
  (``https://api.runcomfy.net/prod/v2``, as its CLI reads it; the sandbox
  serves it on a port of its own). Only that exact host, fixed here or
  by ``RUNCOMFY_BALANCE_BASE`` (or an in-process sandbox's own balance
  host), ever gets the token: never one taken from an answer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx2

from ..confined import write_atomically
from ..errors import ApiError, AuthError, BatcherError, OutputFolderError, UsageError
from ..manifest.cost import MAX_PRICE, PriceTable, forget_price_tables, load_price_table, scaled_prices
from ..manifest.schema import load_model_schema
from ..net.policy import is_loopback_host, scheme_refusal
from ..printable import printable
from .client import DEFAULT_API_BASE, RetryPolicy, RunComfyClient

__all__ = [
    "BALANCE_BASE_ENV",
    "DEFAULT_BALANCE_BASE",
    "LIVE_PRICES",
    "Account",
    "balance_base",
    "look_up",
    "price_dirs",
    "read_balance",
    "read_balances",
]

log = logging.getLogger(__name__)

BALANCE_BASE_ENV = "RUNCOMFY_BALANCE_BASE"
DEFAULT_BALANCE_BASE = "https://api.runcomfy.net/prod/v2"
LIVE_PRICES = ".prices"
"""The folder, inside the output folder, holding the live price tables a run fetched."""
_TIMEOUT = httpx2.Timeout(5.0, connect=5.0)


def price_dirs(output_dir: Path, schema_dirs: Sequence[Path]) -> tuple[Path, ...]:
    """Where prices are looked up for a run in output_dir: the live tables a run fetched, then the schema folders.

    The live tables are used only while each is a plain file that prices nothing below the table it was
    scaled from: a repository could commit ``.prices/`` with zeros, and estimates guard budgets
    (--max-cost, the balance check, --confirm-above).
    """
    live = output_dir / LIVE_PRICES
    if not live.is_dir() or live.is_symlink():
        return tuple(schema_dirs)
    found = sorted(live.rglob("*.pricing.json"))
    for path in found[:_MAX_LIVE_TABLES]:
        table = load_price_table(_model_of(path, live), [live]) if not path.is_symlink() else None
        base = load_price_table(table.model, schema_dirs) if table else None
        if table is None or (base is not None and not _not_lower(table.prices, base.prices)):
            log.warning("ignoring the live prices in %s: %s is not a table batcher wrote", live, path)
            return tuple(schema_dirs)
    if len(found) > _MAX_LIVE_TABLES:
        return tuple(schema_dirs)
    return (live, *schema_dirs)


_MAX_LIVE_TABLES = 100


def _model_of(path: Path, live: Path) -> str:
    return path.relative_to(live).as_posix().removesuffix(".pricing.json")


def _not_lower(live: object, base: object) -> bool:
    """True when every price in live is at least base's for the same settings (and every one is a number)."""
    if isinstance(live, dict) and isinstance(base, dict):
        return all(key in live and _not_lower(live[key], value) for key, value in base.items())
    if isinstance(base, int | float) and not isinstance(base, bool):
        return isinstance(live, int | float) and not isinstance(live, bool) and math.isfinite(live) and live >= base
    return True


def balance_base(api_base: str, given: str | None = None) -> str | None:
    """Where the balance of the account behind api_base's token is read; None when batcher does not know.

    given (an in-process sandbox's own balance host) wins, then ``RUNCOMFY_BALANCE_BASE``; RunComfy's API has
    its balance on RunComfy's other host; for another loopback API, the same server under ``/prod/v2``
    (`batcher sandbox` serves it on a host of its own, as RunComfy does, and prints the
    ``RUNCOMFY_BALANCE_BASE`` to give); any other host is not guessed at, so the token goes nowhere new.
    """
    if given:
        return given.rstrip("/")
    explicit = os.environ.get(BALANCE_BASE_ENV, "").strip().rstrip("/")
    if explicit:
        refusal = scheme_refusal(explicit)
        if refusal:
            msg = f"bad {BALANCE_BASE_ENV}: {refusal}"
            raise UsageError(msg)
        return explicit
    if api_base.rstrip("/") == DEFAULT_API_BASE:
        return DEFAULT_BALANCE_BASE
    if is_loopback_host(urlsplit(api_base).hostname or ""):
        return api_base.rstrip("/") + "/prod/v2"
    return None


@dataclass(slots=True)
class Account:
    """What RunComfy said: the balance (None: not known) and the live price folder used, if any."""

    balance: float | None = None
    prices: Path | None = None
    """The folder of live price tables (pass it first wherever prices are looked up); None: bundled only."""
    said: list[str] = field(default_factory=list)
    """One line per model on the price used, and why."""


async def look_up(
    api_base: str,
    token: str,
    models: Sequence[str],
    output_dir: Path,
    *,
    schema_dirs: Sequence[Path] = (),
    transport: httpx2.AsyncBaseTransport | None = None,
    balance: str | None = None,
) -> Account:
    """Ask RunComfy for the balance and each model's live price; never raises for want of an answer,
    but raises AuthError when RunComfy refuses the token (better now than at the first submit)."""
    account = Account()
    quick = RetryPolicy(attempts=1)
    async with RunComfyClient(token, api_base, retry=quick, transport=transport, poll_timeout=_TIMEOUT) as client:
        for model in models:
            account.said.append(await _live_price(client, model, output_dir, schema_dirs, _whose(api_base)))
    forget_price_tables()
    if any((output_dir / LIVE_PRICES).glob("**/*.pricing.json")):
        account.prices = output_dir / LIVE_PRICES
    account.balance = await read_balance(api_base, token, transport=transport, balance=balance)
    return account


async def read_balance(
    api_base: str, token: str, *, transport: httpx2.AsyncBaseTransport | None = None, balance: str | None = None
) -> float | None:
    """The balance of the account behind token, or None when it cannot be had (never raises for want of one);
    balance: the balance host's base when the caller knows it (`balance_base`)."""
    base = balance_base(api_base, balance)
    if base is None:
        return None
    quick = RetryPolicy(attempts=1)
    async with RunComfyClient(token, base, retry=quick, transport=transport, poll_timeout=_TIMEOUT) as client:
        try:
            answer = await client.balance()
        except (ApiError, BatcherError) as exc:
            log.info("balance not known: %s", exc)
            return None
    value = answer.get("balance_usd")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


BALANCES_AT_ONCE = 8
"""Balances read together at most (one account each): a long token list must not open a connection per token."""


async def read_balances(
    api_base: str,
    tokens: Sequence[str],
    *,
    transport: httpx2.AsyncBaseTransport | None = None,
    balance: str | None = None,
) -> list[float | None]:
    """Each token's balance (None: not known), in tokens' order, read together (`BALANCES_AT_ONCE` at a
    time): each waits up to its own timeout, so one slow answer no longer adds up over the accounts."""
    balance_base(api_base, balance)  # a bad RUNCOMFY_BALANCE_BASE says so here, not from inside the task group
    found: list[float | None] = [None] * len(tokens)
    room = anyio.CapacityLimiter(BALANCES_AT_ONCE)

    async def read(index: int, token: str) -> None:
        async with room:
            found[index] = await read_balance(api_base, token, transport=transport, balance=balance)

    async with anyio.create_task_group() as group:
        for index, token in enumerate(tokens):
            group.start_soon(read, index, token)
    return found


def _whose(api_base: str) -> str:
    """Whose price a table fetched from api_base holds, as every view labels it: a loopback API is a sandbox's
    (its price is the bundled table's, and nothing is charged), never RunComfy's."""
    return (
        "the sandbox's live price" if is_loopback_host(urlsplit(api_base).hostname or "") else "RunComfy's live price"
    )


async def _live_price(
    client: RunComfyClient,
    model: str,
    output_dir: Path,
    schema_dirs: Sequence[Path],
    whose: str = "RunComfy's live price",
) -> str:
    """Fetch model's live price and save it as a price table in the output folder; a line saying what is used."""
    table = load_price_table(model, schema_dirs)
    try:
        info = await client.model_info(model)
    except AuthError:
        raise  # a refused token, found before the first submit: the run stops here, nothing sent
    except ApiError as exc:
        cached = load_price_table(model, [output_dir / LIVE_PRICES])
        if cached is not None:
            return f"{model}: RunComfy's live price could not be read ({exc}); using the one fetched {cached.as_of}"
        where = f"the bundled table ({table.source}, as of {table.as_of})" if table else "no price table"
        return f"{model}: RunComfy's live price could not be read; using {where}"
    live = info.get("base_price_usd")
    if not isinstance(live, int | float) or isinstance(live, bool) or not 0 < live <= MAX_PRICE:
        return f"{model}: RunComfy gave no usable live price; using the bundled table"
    # Server text, shown on a terminal and kept in a file that is shown again: made printable, short.
    unit = printable(info.get("price_unit") or "output", 40)
    note = printable(info.get("pricing_note") or "", 300)
    default = _default_price(model, table, schema_dirs)
    if table is None or not default:
        return f"{model}: RunComfy's live price is ${live:g} per {unit}; no table says how settings change it"
    if live < default:
        # Estimates guard budgets (--max-cost, the balance check, --confirm-above): a lower live price, or a
        # hostile 0, must never lower them. A price cut only leaves the estimates on the safe side.
        return (
            f"{model}: the API's live price at the default settings is ${live:g} per {unit}, below the bundled "
            f"table's ${default:g}: the estimates keep the bundled (higher) prices"
        )
    factor = float(live) / default
    today = time.strftime("%Y-%m-%d")
    scaled = {
        "model": model,
        "keys": list(table.keys),
        "prices": scaled_prices(table.prices, factor),
        **({"per": table.per} if table.per else {}),
        "unit": unit,
        "note": note or table.note,
        "source": f"{whose} (GET /v1/models/{model}: ${live:g} per {unit} at the default settings), "
        f"with the bundled table's ratios between settings",
        "as_of": today,
    }
    relative = f"{LIVE_PRICES}/{model}.pricing.json"
    try:
        write_atomically(output_dir, relative, json.dumps(scaled, indent=2).encode() + b"\n", create_dirs=True)
    except (OSError, OutputFolderError) as exc:
        return f"{model}: RunComfy's live price is ${live:g} per {unit}, but it could not be saved ({exc})"
    if abs(factor - 1) < 1e-9:
        return f"{model}: the API's live price at the default settings (${live:g} per {unit}) agrees with the bundled table"
    return (
        f"{model}: the API's live price at the default settings is ${live:g} per {unit}, the bundled table says "
        f"${default:g}: using the live one"
    )


def _default_price(model: str, table: PriceTable | None, schema_dirs: Sequence[Path]) -> float | None:
    """The bundled price per unit at the model's default settings (what base_price_usd prices: a job,
    or a second of video for a table with ``per``)."""
    if table is None:
        return None
    try:
        schema = load_model_schema(model, schema_dirs)
    except BatcherError:
        return None
    return table.rate(schema.with_defaults({}))
