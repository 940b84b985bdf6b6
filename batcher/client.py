"""RunComfy's Model API: submit, result, status, cancel.

One `RunComfyClient` per run keeps one pooled `httpx.AsyncClient`. GET and
cancel calls are retried with exponential backoff and full jitter on 429,
5xx and connection faults, honouring ``Retry-After``. Submits cost money and
the API has no idempotency key, so a submit is retried only when it certainly
was not accepted (the connection never opened, 429, 503, or a RunComfy error
body refusing it); when its fate is unknown it raises `UncertainSubmitError`
and the caller must not send it again on its own.

Whatever answers at the API base is read as untrusted bytes: an answer is
read only up to ``max_answer_bytes`` (decompressed or not), within a
deadline, as JSON no deeper than `MAX_JSON_DEPTH`; numbers must be finite and
sane, the token is masked in raw and decoded text, server text that reaches
messages is made printable, and a redirect is an error, never followed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import time
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import anyio
import httpx

from . import __version__
from .errors import (
    ApiError,
    ApiValidationError,
    AuthError,
    BalanceError,
    RateLimitedError,
    RequestGoneError,
    TransientApiError,
    UncertainSubmitError,
    UnreachableError,
    UsageError,
)
from .netpolicy import scheme_refusal
from .printable import printable

__all__ = [
    "DEFAULT_API_BASE",
    "DEFAULT_MAX_ANSWER_BYTES",
    "MAX_COST_USD",
    "MAX_JSON_DEPTH",
    "MAX_OUTPUTS",
    "MAX_URL_CHARS",
    "CancelOutcome",
    "JobState",
    "RateLimiter",
    "RequestResult",
    "RetryPolicy",
    "RunComfyClient",
    "Submission",
    "api_base_from_env",
    "collect_output_urls",
    "normalize_state",
    "token_from_env",
]

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://model-api.runcomfy.net"
DEFAULT_MAX_ANSWER_BYTES = 1 << 20
"""The largest API answer read, in bytes after any decompression: RunComfy's are a few KiB."""
MAX_JSON_DEPTH = 64
"""Deeper JSON is not an answer batcher can use (and 1,000 levels exhaust Python's recursion)."""
MAX_OUTPUTS = 1000
"""The most output URLs one result may name; the rest are dropped with a warning."""
MAX_URL_CHARS = 4096
"""The longest output URL taken (signed URLs run to 2 KiB); longer ones are dropped with a warning."""
MAX_COST_USD = 10_000.0
"""A reported cost above this (or negative, or not finite) is recorded as unknown."""
TOKEN_ENV = "RUNCOMFY_API_TOKEN"
BASE_ENV = "RUNCOMFY_API_BASE"

JobState = Literal["in_queue", "in_progress", "completed", "failed", "cancelled", "unknown"]
TERMINAL_STATES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

_STATE_WORDS: dict[str, JobState] = {
    # What RunComfy documents.
    "in_queue": "in_queue",
    "in_progress": "in_progress",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
    # Terminal for RunComfy's CLI too (src/poll.rs `inference_is_terminal`, src/cmd/mod.rs
    # `finish_inference_result`): "succeeded" is its success, "canceled" its cancellation.
    "succeeded": "completed",
    "canceled": "cancelled",
    # Not finished for RunComfy's ComfyUI nodes (runcomfy/execution.py), which say "Waiting in
    # queue." for pending and waiting and "Generating..." for starting and processing: so the first
    # two are queued (cancellable, --queue-timeout) and the last two running (--job-timeout).
    "pending": "in_queue",
    "waiting": "in_queue",
    "starting": "in_progress",
    "processing": "in_progress",
    # Generic words for the same two states; harmless, since neither ends a job.
    "queued": "in_queue",
    "running": "in_progress",
}
"""Every state word batcher reads. A word ends a job only when RunComfy's own clients end it there:
a wrong "failed" could lead --retry-failed to pay for a job still running, while an unknown word
costs only polls (it is logged and polled on). So "success" and "error" are not read as ends."""

_OUTPUT_KEYS = ("image", "images", "video", "videos")
_MAX_QUEUE_POSITION = 10_000_000
_TEXT_LIMIT = 1000
"""Characters of server text (an error message, a reason) kept in messages and results."""
_WORD_LIMIT = 100
"""Characters of a server's one-word answer (a status, an outcome) kept."""
_MESSAGE_FIELDS = ("error_message", "message", "detail")
"""Free text of RunComfy's error bodies, which error messages quote verbatim."""
_JOURNAL_EXTRA_CHARS = 4096
_JOURNAL_CORE = frozenset({"request_id", "status", "created_at", "finished_at", "cost", "error", "batcher_dropped"})
_INFLATABLE = ("gzip", "x-gzip", "deflate")
_SURROGATE = re.compile("[\ud800-\udfff]")
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")
"""What a request id may look like: it goes into URLs, the journal and the terminal."""


def token_from_env() -> str:
    """The API token from RUNCOMFY_API_TOKEN; UsageError when it is not set."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        msg = (
            f"no API token: set {TOKEN_ENV} (RunComfy profile > API keys), "
            "or add --sandbox to rehearse the run locally without one"
        )
        raise UsageError(msg)
    return token


def api_base_from_env(flag: str | None) -> str:
    """The API base: the flag, then RUNCOMFY_API_BASE, then RunComfy's own."""
    base = (flag or os.environ.get(BASE_ENV) or DEFAULT_API_BASE).rstrip("/")
    refusal = scheme_refusal(base)
    if refusal:
        msg = f"bad API base: {refusal}"
        raise UsageError(msg)
    return base


def normalize_state(word: object) -> JobState:
    """RunComfy's state words, spelled one way; ``unknown`` for anything new (still polled).

    Case and surrounding space are ignored, as RunComfy's CLI and MCP server lower-case the word.
    """
    return _STATE_WORDS.get(str(word).strip().lower(), "unknown")


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
            "status": printable(self.raw_status, _WORD_LIMIT),
        }
        for key in ("created_at", "finished_at"):
            stamp = _stamp(self.raw.get(key))
            if stamp is not None:
                view[key] = stamp
        if self.cost is not None and math.isfinite(self.cost):
            view["cost"] = self.cost
        if self.error is not None:
            view["error"] = printable(self.error, _TEXT_LIMIT)
        room = _JOURNAL_EXTRA_CHARS
        dropped: list[str] = []
        for key, value in self.raw.items():
            name = _safe_text(str(key))
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


def _safe_text(text: str) -> str:
    """text that any JSON writer and UTF-8 encoder accepts: lone surrogates replaced."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def _json_safe(value: object, depth: int = 0) -> object:
    """A copy of value that json.dumps(allow_nan=False) writes: no NaN, no infinity, no 4,000-digit integer."""
    if isinstance(value, str):
        return _safe_text(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 63 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= MAX_JSON_DEPTH:
        return None
    if isinstance(value, dict):
        return {_safe_text(str(k)): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item, depth + 1) for item in value]
    return printable(value, _WORD_LIMIT)


def _stamp(value: object) -> int | float | str | None:
    """A created_at or finished_at as the journal keeps it, or None when it is no timestamp at all."""
    if isinstance(value, str):
        return _safe_text(value) if len(value) <= 64 else None
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


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter; `Retry-After` wins when the server sends one."""

    attempts: int = 6
    base: float = 0.5
    cap: float = 30.0
    max_retry_after: float = 120.0

    def delays(self) -> Iterator[float]:
        """Upper bounds of each wait between attempts (attempts - 1 of them)."""
        for attempt in range(self.attempts - 1):
            yield min(self.cap, self.base * 2**attempt)

    def wait(self, bound: float, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        return random.uniform(0, bound)


class RateLimiter:
    """Paces every call of a run; slows down when refused, then recovers (AIMD).

    ``rate`` is the ceiling in requests a second (None: no limit until the
    service objects). A 429 halves the pace (from the rate actually observed
    when there was no limit), at most once a second, so that the burst of
    429s from requests already in flight counts as one signal; every second
    without one, the pace grows by `recovery` until it is back at the
    ceiling, or, with no ceiling, at twice the pace that was refused, where
    the limit is lifted again. It grows only while it actually holds calls
    back, so an idle spell does not build up a pace the service would refuse.
    """

    def __init__(self, rate: float | None = None, *, floor: float = 0.2, recovery: float = 1.05) -> None:
        self.ceiling = rate
        self.rate = rate
        self.floor = floor
        self.recovery = recovery
        self.refusals = 0
        self._next = 0.0
        self._cut_at = -math.inf
        self._tick_at = 0.0
        self._lift_at: float | None = None
        self._held_back = False
        self._recent: deque[float] = deque(maxlen=4096)

    async def wait(self) -> None:
        now = time.monotonic()
        self._recent.append(now)
        if self.rate is None:
            return
        self._recover(now)
        if self.rate is None:
            return
        slot = max(now, self._next)
        self._next = slot + 1.0 / self.rate
        if slot > now:
            self._held_back = True
            await anyio.sleep(slot - now)

    def refused(self) -> None:
        """Count a 429 against the pace."""
        now = time.monotonic()
        self.refusals += 1
        if now - self._cut_at < 1.0:
            return
        observed = sum(1 for t in self._recent if now - t <= 1.0)
        current = self.rate if self.rate is not None else float(max(observed, 1))
        if self.ceiling is None:
            self._lift_at = 2 * current
        self.rate = max(self.floor, current / 2)
        # Two clocks: sharing one with the recovery tick below let that tick, every
        # second, hide the 429s that followed it, so the pace never came down.
        self._cut_at = self._tick_at = now

    def _recover(self, now: float) -> None:
        assert self.rate is not None
        elapsed = now - self._tick_at
        if elapsed < 1.0:
            return
        if self._held_back:
            # Grow only while the pace is what holds calls back: a pace far above the
            # real demand would let the next burst through unchecked.
            self.rate *= self.recovery ** int(elapsed)
        self._held_back = False
        self._tick_at = now
        if self.ceiling is not None:
            self.rate = min(self.rate, self.ceiling)
        elif self._lift_at is not None and self.rate >= self._lift_at:
            self.rate = None


class _Retry(Exception):
    """Internal: this attempt failed in a way worth another try."""

    def __init__(self, error: ApiError, retry_after: float | None = None) -> None:
        self.error = error
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare enough to fall back on our own backoff


class _Unreadable(Exception):
    """Internal: an answer came, but batcher will not read it whole. The message is a predicate
    ("was over ..."): the caller says whose answer, and what that means for the call."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class _TooDeep(Exception):
    """Internal: JSON nested deeper than MAX_JSON_DEPTH."""


def _cap_words(limit: int) -> str:
    size = f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit:,} bytes"
    return f"over batcher's {size} cap on API answers"


async def _read_answer(response: httpx.Response, limit: int) -> bytes:
    """The body of an answer, at most ``limit`` bytes both as sent and decompressed; _Unreadable past that.

    Identity is asked for; gzip and deflate (a proxy may compress anyway) are
    decompressed no further than the cap, any other encoding is refused unread.
    """
    status = response.status_code
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity", *_INFLATABLE):
        raise _Unreadable(f"came {printable(encoding, 40)}-encoded, which batcher does not read", status)
    declared = response.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise _Unreadable(f"announced {int(declared):,} bytes, {_cap_words(limit)}", status)
    if response.is_stream_consumed:
        # An in-process transport (tests) hands over a body httpx has already read and decoded.
        content = response.content
        if len(content) > limit:
            raise _Unreadable(f"was {_cap_words(limit)}", status)
        return content
    raw = bytearray()
    async for chunk in response.aiter_raw():  # raw: httpx's own decoder would inflate without a bound
        raw += chunk
        if len(raw) > limit:
            raise _Unreadable(f"was {_cap_words(limit)}", status)
    return _inflate(bytes(raw), encoding, limit, status) if encoding in _INFLATABLE else bytes(raw)


def _inflate(data: bytes, encoding: str, limit: int, status: int) -> bytes:
    # deflate is zlib-wrapped by the standard and raw by some servers: httpx tries both, so do we.
    for wbits in (31,) if "gzip" in encoding else (15, -15):
        inflater = zlib.decompressobj(wbits)
        try:
            content = inflater.decompress(data, limit + 1)  # a bomb stops here, at the cap
        except zlib.error:
            continue
        if len(content) > limit:
            raise _Unreadable(f"was {_cap_words(limit)} once decompressed", status)
        return content
    raise _Unreadable(f"came {encoding}-encoded but does not decompress", status)


def _deadline(timeout: httpx.Timeout) -> float | None:
    """The most a whole call may take: every one of its time limits together.

    httpx bounds each read, not the answer: a server sending a byte every few
    seconds would hold a call for days. Each phase within its own limit fits in
    their sum, so only an answer trickled out (or a request trickled in) hits it.
    """
    parts = (timeout.connect, timeout.read, timeout.write, timeout.pool)
    known = [part for part in parts if part is not None]
    return sum(known) if known else None


def _json_body(content: bytes, secret: str) -> dict[str, Any] | None:
    """The answer as a JSON object, or None: not JSON, not an object, or nested past MAX_JSON_DEPTH.

    A server that echoes our headers back (some gateways do, in error pages)
    must not put the token into our messages, logs or journal, so it is masked
    here, where every answer comes in: in the raw bytes, and again in every
    decoded string and key (an echo may be written as JSON escapes). Numbers
    that are not finite (NaN, Infinity, 1e999) or run past 40 digits are read
    as null, with a warning. The free text of error bodies (`_MESSAGE_FIELDS`),
    which messages quote verbatim, is made printable and capped.
    """
    if secret and secret.encode() in content:
        content = content.replace(secret.encode(), b"[token]")
    numbers = _OddNumbers()
    try:
        body = json.loads(content, parse_constant=numbers.constant, parse_float=numbers.real, parse_int=numbers.integer)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: ~1,000 levels
        return None
    if not isinstance(body, dict):
        return None
    try:
        cleaned = _scrubbed(body, secret, 0)
    except _TooDeep:
        return None
    assert isinstance(cleaned, dict)
    if numbers.count:
        log.warning(
            "RunComfy's answer held %d number(s) batcher cannot use (NaN, Infinity, 1e999, 40+ digits): read as unknown",
            numbers.count,
        )
    for name in _MESSAGE_FIELDS:
        if isinstance(cleaned.get(name), str):
            cleaned[name] = printable(cleaned[name], _TEXT_LIMIT)
    return cleaned


class _OddNumbers:
    """json.loads hooks that read a number batcher cannot use as null, and count them."""

    def __init__(self) -> None:
        self.count = 0

    def constant(self, name: str) -> None:
        self.count += 1  # NaN, Infinity, -Infinity: not JSON, yet Python's json reads them

    def real(self, text: str) -> float | None:
        value = float(text)
        if math.isfinite(value):
            return value
        self.count += 1
        return None

    def integer(self, text: str) -> int | None:
        if len(text) <= 40:
            return int(text)
        self.count += 1  # past 4,300 digits int() refuses; long before that no field of ours makes sense
        return None


def _scrubbed(value: object, secret: str, depth: int) -> object:
    """value with the token masked in every string and key, and lone surrogates replaced."""
    if isinstance(value, str):
        return _masked(value, secret)
    if isinstance(value, dict | list) and depth >= MAX_JSON_DEPTH:  # depth: the containers around value
        raise _TooDeep
    if isinstance(value, dict):
        return {_masked(k, secret): _scrubbed(v, secret, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(item, secret, depth + 1) for item in value]
    return value


def _masked(text: str, secret: str) -> str:
    if secret and secret in text:
        text = text.replace(secret, "[token]")
    return _safe_text(text)


_HELD_LOCATION = "x-batcher-held-location"


async def _hold_redirect(response: httpx.Response) -> None:
    """Hide a redirect's Location from httpx, which parses it even when following none: a Location
    it cannot parse became a protocol error, that is a transient fault, and the poll went on all night."""
    if 300 <= response.status_code < 400 and "location" in response.headers:
        response.headers[_HELD_LOCATION] = response.headers.pop("location")


def _redirect_error(response: httpx.Response, doing: str) -> ApiError:
    """A 3xx from the API: never followed (it would carry the token elsewhere), and never worth repeating."""
    location = response.headers.get(_HELD_LOCATION, "")
    try:
        host = httpx.URL(location).host or "the same host"  # a relative Location stays on this host
    except (httpx.InvalidURL, ValueError):
        host = location
    where = f"to {printable(host, 100)}" if location else "without a Location"
    msg = (
        f"RunComfy answered a redirect (HTTP {response.status_code}) {where} while {doing}; "
        "batcher follows no redirects from the API — check --api-base"
    )
    return ApiError(msg, status_code=response.status_code)


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


def _sane_cost(value: object, request_id: str) -> float | None:
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


def _queue_position(value: object, request_id: str) -> int | None:
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


def _checked_request_id(value: object, status: int) -> str:
    """The request_id of a submit's answer, or UncertainSubmitError when it cannot be used.

    The job may well have been accepted, so an id we cannot use is held as
    uncertain, never dropped (which would pay twice on the next run).
    """
    if isinstance(value, str) and _REQUEST_ID.fullmatch(value):
        return value
    shown = repr(value)[:80] if isinstance(value, str | int | float) else type(value).__name__
    msg = (
        f"RunComfy answered HTTP {status} to a submit with a request_id batcher cannot use ({shown}); "
        "it may have accepted the job"
    )
    raise UncertainSubmitError(msg, status_code=status)


def _error_code(body: Mapping[str, Any] | None) -> int | None:
    if not body:
        return None
    code = body.get("error_code")
    if code is None:
        return None
    try:
        return int(code)
    except (TypeError, ValueError):
        return -1


def _refusal(response: httpx.Response, body: Mapping[str, Any] | None, doing: str) -> ApiError:
    """Turn an error answer into the error a user can act on."""
    status = response.status_code
    code = _error_code(body)
    text = str(body.get("error_message") or body.get("message") or "") if body else ""
    detail = body.get("detail") if body else None
    said = f": {text}" if text else ""
    tag = f"HTTP {status}" + (f", error {code}" if code is not None else "")
    kwargs: dict[str, Any] = {"status_code": status, "error_code": code, "detail": detail}
    if code in (400004, 401001, 403001) or status in (401, 403):
        # 403001 is "another user's request": with the token that submitted it that cannot
        # happen, so every one of these means the token is wrong for this work. Certain, and final.
        msg = (
            f"RunComfy refused the API token while {doing} ({tag}){said}. Check {TOKEN_ENV}: it may be "
            "missing, expired, the account inactive, or not the account that submitted this run's jobs"
        )
        return AuthError(msg, **kwargs)
    if code == 400002 or status == 402:
        msg = f"RunComfy says the balance is insufficient while {doing} ({tag}){said}. Top up the account, then run again: nothing is lost."
        return BalanceError(msg, **kwargs)
    if code == 404001:
        msg = f"RunComfy does not know this request ({tag}){said}: not found or expired."
        return RequestGoneError(msg, **kwargs)
    if status == 404:
        # A 404 without RunComfy's body is a proxy or a replica that has not seen the request yet.
        msg = f"RunComfy answered HTTP 404 without its error body while {doing}{said}"
        return TransientApiError(msg, **kwargs)
    if code == 422001 or status == 422:
        extra = f" ({json.dumps(detail)[:500]})" if detail else ""
        msg = f"RunComfy rejected the input ({tag}){said}{extra}"
        return ApiValidationError(msg, **kwargs)
    if code == 400001:
        msg = f"RunComfy does not know this model ({tag}){said}"
        return ApiError(msg, **kwargs)
    if code == 500001 or status == 429 or status >= 500:
        msg = f"RunComfy had trouble while {doing} ({tag}){said}"
        return TransientApiError(msg, **kwargs)
    msg = f"RunComfy answered an error while {doing} ({tag}){said}"
    return ApiError(msg, **kwargs)


class RunComfyClient:
    """An async client for RunComfy's Model API; use it as an async context manager.

    ``transport`` is the seam for tests that need no server.
    """

    def __init__(
        self,
        token: str,
        base_url: str = DEFAULT_API_BASE,
        *,
        retry: RetryPolicy | None = None,
        rate_limiter: RateLimiter | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        submit_timeout: httpx.Timeout | None = None,
        poll_timeout: httpx.Timeout | None = None,
        max_connections: int = 100,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
    ) -> None:
        if not token:
            msg = f"no API token: set {TOKEN_ENV}"
            raise UsageError(msg)
        refusal = scheme_refusal(base_url)
        if refusal:
            msg = f"bad API base: {refusal}"
            raise UsageError(msg)
        if max_answer_bytes < 1:
            msg = f"the cap on API answers must be at least 1 byte, not {max_answer_bytes}"
            raise UsageError(msg)
        self.base_url = base_url.rstrip("/")
        # Masked in anything the server says back; too short a token would mask innocent text.
        self._secret = token if len(token) >= 8 else ""
        self.max_answer_bytes = max_answer_bytes
        self.retry = retry or RetryPolicy()
        self.rate_limiter = rate_limiter or RateLimiter()
        # RunComfy's own clients: connect 10 s, read 90 s for submits, 20 s for polls.
        self.submit_timeout = submit_timeout or httpx.Timeout(90.0, connect=10.0)
        self.poll_timeout = poll_timeout or httpx.Timeout(20.0, connect=10.0)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            # identity: a compressed answer could expand far past the cap before anyone looks at it.
            headers={
                "Authorization": f"Bearer {token}",
                "User-Agent": f"batcher/{__version__}",
                "Accept-Encoding": "identity",
            },
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            follow_redirects=False,
            event_hooks={"response": [_hold_redirect]},
        )

    async def __aenter__(self) -> RunComfyClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _pace(self) -> None:
        await self.rate_limiter.wait()

    def _note(self, response: httpx.Response) -> None:
        if response.status_code == 429:
            self.rate_limiter.refused()

    async def _exchange(
        self, method: str, path: str, limits: httpx.Timeout, *, read_redirects: bool = True, **options: Any
    ) -> tuple[httpx.Response, bytes]:
        """Send one request and read its answer: at most max_answer_bytes, within the call's deadline.

        Raises what httpx raises (the caller knows what each fault means for
        its call), and _Unreadable once an answer came that batcher will not
        read whole: too large, oddly encoded, or trickled past the deadline.
        Without ``read_redirects`` a 3xx answer comes back with an empty body, unread.
        """
        deadline = _deadline(limits)
        with anyio.move_on_after(deadline):
            async with self._http.stream(method, path, timeout=limits, **options) as response:
                self._note(response)
                if not read_redirects and 300 <= response.status_code < 400:
                    return response, b""
                content = await _read_answer(response, self.max_answer_bytes)
            return response, content
        msg = f"took longer than {deadline:g} s in all (its time limits together)"
        raise _Unreadable(msg)

    # -- submit -------------------------------------------------------------

    async def submit(self, model_id: str, payload: Mapping[str, Any]) -> Submission:
        """Send one job. Retries only what certainly was not accepted.

        Raises UncertainSubmitError when the job may have been accepted, a
        subclass of ApiError when RunComfy refused it, TransientApiError when
        the retries ran out on faults that certainly left nothing behind.
        """
        path = f"/v1/models/{quote(model_id, safe='/')}"
        doing = f"submitting to {model_id}"
        last: ApiError | None = None
        for bound in [*self.retry.delays(), None]:
            try:
                return await self._submit_once(path, payload, doing)
            except _Retry as retry:
                last = retry.error
                if bound is None:
                    break
                await anyio.sleep(self.retry.wait(bound, retry.retry_after))
        assert last is not None
        kind = type(last) if isinstance(last, RateLimitedError | UnreachableError) else TransientApiError
        raise kind(
            f"{last} (gave up after {self.retry.attempts} attempts; the job was not accepted)",
            status_code=last.status_code,
            error_code=last.error_code,
        )

    async def _submit_once(self, path: str, payload: Mapping[str, Any], doing: str) -> Submission:
        await self._pace()
        try:
            response, content = await self._exchange("POST", path, self.submit_timeout, json=payload)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # The request never left this machine: safe to send again.
            raise _Retry(UnreachableError(f"cannot reach RunComfy while {doing}: {type(exc).__name__}")) from exc
        except httpx.TransportError as exc:
            msg = (
                f"the connection failed after the submit was sent ({type(exc).__name__}); RunComfy may have accepted it"
            )
            raise UncertainSubmitError(msg) from exc
        except _Unreadable as exc:
            # The request was sent and something answered: what it said is lost, so is the job's fate.
            msg = f"RunComfy's answer to a submit {exc}; RunComfy may have accepted the job"
            raise UncertainSubmitError(msg, status_code=exc.status_code) from exc
        body = _json_body(content, self._secret)
        status = response.status_code
        # A request_id in any answer means RunComfy has the job, whatever else the answer says:
        # it is journalled and polled, never thrown away (throwing it away pays twice).
        if body is not None and body.get("request_id") is not None:
            return Submission(request_id=_checked_request_id(body["request_id"], status), raw=body)
        code = _error_code(body)
        if status == 429 or (status == 503 and code is None):
            # Refused before any work: 429 by definition, a bare 503 by the gateway.
            error = _refusal(response, body, doing)
            raise _Retry(RateLimitedError(str(error), status_code=status, error_code=code), _retry_after(response))
        if status in (502, 504) or 300 <= status < 400:
            # A gateway that lost the upstream's answer, or a redirect we do not follow: the
            # job may be running behind it, whatever error body the gateway chose to add.
            msg = f"RunComfy answered HTTP {status} to a submit without a request_id; it may have accepted the job"
            raise UncertainSubmitError(msg, status_code=status, error_code=code)
        if 400 <= status < 500 or (status == 200 and code is not None):
            # A client error (or RunComfy's error body on a 200) and no request_id: refused before any work.
            raise _refusal(response, body, doing)
        if status >= 500 and code == 500001:
            # RunComfy's own error body says it failed before taking the job; its docs say retry.
            raise _Retry(_refusal(response, body, doing), _retry_after(response))
        msg = f"RunComfy answered HTTP {status} to a submit without a request_id; it may have accepted the job"
        raise UncertainSubmitError(msg, status_code=status, error_code=code)

    async def reachable(self, model_id: str) -> bool:
        """True when RunComfy answers at all (any HTTP status, body unread): for waiting out an outage."""
        await self._pace()
        try:
            async with self._http.stream(
                "GET", f"/v1/models/{quote(model_id, safe='/')}", timeout=self.poll_timeout
            ) as response:
                self._note(response)
        except httpx.TransportError:
            return False
        return True

    # -- calls that may be repeated -------------------------------------------

    async def _call(self, method: str, path: str, doing: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        last: ApiError | None = None
        for bound in [*self.retry.delays(), None]:
            retry_after: float | None = None
            await self._pace()
            try:
                # A redirect is an error whatever its body says (even a huge one): not read.
                response, content = await self._exchange(
                    method, path, self.poll_timeout, read_redirects=False, params=params
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                last = UnreachableError(f"cannot reach RunComfy while {doing}: {type(exc).__name__}")
            except httpx.TransportError as exc:
                last = TransientApiError(f"connection trouble while {doing}: {type(exc).__name__}")
            except _Unreadable as exc:
                last = TransientApiError(f"RunComfy's answer {exc} while {doing}", status_code=exc.status_code)
            else:
                if 300 <= response.status_code < 400:
                    raise _redirect_error(response, doing)
                body = _json_body(content, self._secret)
                code = _error_code(body)
                if code is None and response.is_success and body is not None:
                    return body
                if body is None and response.is_success:
                    last = TransientApiError(f"RunComfy answered something that is not a JSON object while {doing}")
                else:
                    error = _refusal(response, body, doing)
                    if not isinstance(error, TransientApiError):
                        raise error
                    last, retry_after = error, _retry_after(response)
            if bound is None:
                break
            await anyio.sleep(self.retry.wait(bound, retry_after))
        assert last is not None
        raise last

    def _request_path(self, request_id: str, action: str) -> str:
        if not _REQUEST_ID.fullmatch(request_id):
            # An old journal may hold one from before ids were checked at submit.
            msg = f"the request id {request_id[:80]!r} is malformed; batcher cannot ask RunComfy about it"
            raise ApiError(msg)
        return f"/v1/requests/{quote(request_id, safe='')}/{action}"

    async def result(self, request_id: str) -> RequestResult:
        """The request's current state, and its outputs once completed (with cost where offered)."""
        body = await self._call(
            "GET", self._request_path(request_id, "result"), "polling a result", {"include_cost": "true"}
        )
        return _parse_result(request_id, body)

    async def status(self, request_id: str) -> RequestResult:
        """The request's state only (no outputs)."""
        body = await self._call("GET", self._request_path(request_id, "status"), "checking a status")
        return _parse_result(request_id, body)

    async def cancel(self, request_id: str) -> CancelOutcome:
        """Ask RunComfy to cancel a queued request; in-progress ones answer ``not_cancellable``."""
        body = await self._call("POST", self._request_path(request_id, "cancel"), "cancelling a request")
        return CancelOutcome(
            request_id=request_id,
            outcome=printable(body.get("outcome", ""), _WORD_LIMIT),
            state=normalize_state(body.get("status", "")),
        )


def _parse_result(request_id: str, body: dict[str, Any]) -> RequestResult:
    """One answer about request_id; server text in it (state word, error) made printable, numbers checked."""
    raw_status = printable(body.get("status", ""), _WORD_LIMIT)
    state = normalize_state(raw_status)
    error = body.get("error")
    error_text = None
    if error not in (None, "", {}):
        error_text = printable(error if isinstance(error, str) else json.dumps(error), _TEXT_LIMIT)
    if error_text and state not in ("failed", "cancelled") and state != "completed":
        state = "failed"
    return RequestResult(
        # The id asked about, not one the answer names: that one was never checked.
        request_id=request_id,
        state=state,
        raw_status=raw_status,
        outputs=collect_output_urls(body.get("output")) if state == "completed" else [],
        error=error_text,
        cost=_sane_cost(body.get("cost"), request_id),
        queue_position=_queue_position(body.get("queue_position"), request_id),
        raw=body,
    )
