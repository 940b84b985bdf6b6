"""What did RunComfy answer about a job, as batcher keeps it?

The typed views of the API's answers (`Submission`, `RequestResult`,
`CancelOutcome`) and the bounds on what is taken from them: at most
`MAX_OUTPUTS` output URLs of at most `MAX_URL_CHARS` characters, a cost
within 0 to `MAX_COST_USD`, a sane queue position, and a bounded,
JSON-safe view of each answer for the journal (`RequestResult.for_journal`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..lifecycle import JobState
from ..printable import printable
from .answers import MAX_JSON_DEPTH, TEXT_LIMIT, WORD_LIMIT, safe_text

__all__ = [
    "MAX_COST_USD",
    "MAX_OUTPUTS",
    "MAX_URL_CHARS",
    "CancelOutcome",
    "RequestResult",
    "Submission",
    "collect_output_urls",
    "queue_position",
    "sane_cost",
]

log = logging.getLogger(__name__)

MAX_OUTPUTS = 1000
"""The most output URLs one result may name; the rest are dropped with a warning."""
MAX_URL_CHARS = 4096
"""The longest output URL taken (signed URLs run to 2 KiB); longer ones are dropped with a warning."""
MAX_COST_USD = 10_000.0
"""A reported cost above this (or negative, or not finite) is recorded as unknown."""


_OUTPUT_KEYS = ("image", "images", "video", "videos")
_MAX_QUEUE_POSITION = 10_000_000
_JOURNAL_EXTRA_CHARS = 4096
_JOURNAL_CORE = frozenset({"request_id", "status", "created_at", "finished_at", "cost", "error", "batcher_dropped"})


def collect_output_urls(output: object, *, limit: int = MAX_OUTPUTS, max_chars: int = MAX_URL_CHARS) -> list[str]:
    """Every file URL in a result's ``output``, known fields first, in order, once each.

    Other models use other field names, so any string or list of strings that
    looks like a URL counts too. At most ``limit`` URLs of at most
    ``max_chars`` characters are taken; the rest are dropped with a warning
    (every URL taken is downloaded, and a result naming 200,000 is broken).
    """
    found: dict[str, None] = {}  # ordered, and a membership test in O(1): a list made this quadratic
    too_long = too_many = 0
    for value in _url_candidates(output):
        if "://" not in value or value in found:
            continue
        if len(value) > max_chars:
            too_long += 1
        elif len(found) >= limit:
            too_many += 1
        else:
            found[value] = None
    if too_long or too_many:
        log.warning(
            "a result named output URLs batcher does not take: %d longer than %d characters, %d past the first %d",
            too_long,
            max_chars,
            too_many,
            limit,
        )
    return list(found)


def _url_candidates(output: object) -> Iterator[str]:
    if isinstance(output, dict):
        for key in _OUTPUT_KEYS:
            yield from _strings(output.get(key))
        for key, value in output.items():
            if key not in _OUTPUT_KEYS:
                yield from _strings(value)
    else:
        yield from _strings(output)


def _strings(value: object, depth: int = 0) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif depth >= MAX_JSON_DEPTH:
        return
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, depth + 1)
    elif isinstance(value, dict):
        yield from _strings(value.get("url"), depth + 1)


@dataclass(frozen=True, slots=True)
class Submission:
    """What RunComfy answered to a submit."""

    request_id: str
    raw: dict[str, Any] = field(compare=False)


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One look at a request: its state and, once completed, its outputs."""

    request_id: str
    state: JobState
    raw_status: str
    outputs: list[str]
    error: str | None
    cost: float | None
    queue_position: int | None
    raw: dict[str, Any] = field(compare=False)

    def for_journal(self) -> dict[str, Any]:
        """What of this answer the journal keeps: bounded (a few KiB at most) and safe to write as JSON.

        ``request_id``, ``status``, ``created_at``, ``finished_at``, ``cost``
        and ``error`` are always there when known (what the journal's fold and
        a person reading it need); every other field of the answer follows, in
        order, while they fit in 4 KiB together. Fields that did not fit are
        named under ``batcher_dropped`` (``count``, the first 20 ``fields``).
        No NaN, infinity or lone surrogate survives.
        """
        view: dict[str, Any] = {
            "request_id": printable(self.request_id, 200),
            "status": printable(self.raw_status, WORD_LIMIT),
        }
        for key in ("created_at", "finished_at"):
            stamp = _stamp(self.raw.get(key))
            if stamp is not None:
                view[key] = stamp
        if self.cost is not None and math.isfinite(self.cost):
            view["cost"] = self.cost
        if self.error is not None:
            view["error"] = printable(self.error, TEXT_LIMIT)
        room = _JOURNAL_EXTRA_CHARS
        dropped: list[str] = []
        for key, value in self.raw.items():
            name = safe_text(str(key))
            if name in _JOURNAL_CORE:
                continue
            safe = _json_safe(value)
            size = len(json.dumps(name)) + len(json.dumps(safe)) + 2  # ASCII-escaped: never fewer than its bytes
            if size > room:
                dropped.append(name)
                continue
            view[name] = safe
            room -= size
        if dropped:
            view["batcher_dropped"] = {"count": len(dropped), "fields": [printable(k, 64) for k in dropped[:20]]}
        return view


def _json_safe(value: object, depth: int = 0) -> object:
    """A copy of value that json.dumps(allow_nan=False) writes: no NaN, no infinity, no 4,000-digit integer."""
    if isinstance(value, str):
        return safe_text(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 63 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= MAX_JSON_DEPTH:
        return None
    if isinstance(value, dict):
        return {safe_text(str(k)): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item, depth + 1) for item in value]
    return printable(value, WORD_LIMIT)


def _stamp(value: object) -> int | float | str | None:
    """A created_at or finished_at as the journal keeps it, or None when it is no timestamp at all."""
    if isinstance(value, str):
        return safe_text(value) if len(value) <= 64 else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        safe = _json_safe(value)
        return safe if isinstance(safe, int | float) else None
    return None


@dataclass(frozen=True, slots=True)
class CancelOutcome:
    """The answer to a cancel: ``cancelled`` or ``not_cancellable`` (already running or done)."""

    request_id: str
    outcome: str
    state: JobState


def _number(value: object) -> float | None:
    """value as a finite float (a number, or a numeric string of sane length), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    if isinstance(value, str) and len(value) > 40:
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def sane_cost(value: object, request_id: str) -> float | None:
    """The cost RunComfy reported, in USD; None when absent, or (with a warning) not a sane amount."""
    if isinstance(value, dict):
        value = next((value[k] for k in ("total", "amount", "usd") if value.get(k) is not None), None)
    if value is None:
        return None
    number = _number(value)
    if number is not None and 0 <= number <= MAX_COST_USD:
        return number
    log.warning(
        "RunComfy reported a cost batcher cannot use for request %s (%s); it is recorded as unknown",
        request_id,
        printable(repr(value), 60),
    )
    return None


def queue_position(value: object, request_id: str) -> int | None:
    """The queue position RunComfy reported; None when absent, or (with a warning) not a sane count."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_QUEUE_POSITION:
        return value
    if value is not None:
        log.warning(
            "RunComfy reported a queue position batcher cannot use for request %s (%s)",
            request_id,
            printable(repr(value), 60),
        )
    return None
