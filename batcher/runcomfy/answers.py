"""How is an answer from the API read? As untrusted bytes, into bounded, masked, checked JSON.

Whatever answers at the API base may be hostile or broken: an answer is read
only up to a byte cap (decompressed or not), within a deadline, as a JSON
object no deeper than `MAX_JSON_DEPTH`; numbers that are not finite or run
past 40 digits read as null; the API token is masked in the raw bytes and
in every decoded string and key; the free text of error bodies is made
printable and capped. What a usable answer means is `batcher.runcomfy.client`'s
question; what of it is kept, `batcher.runcomfy.results`'.
"""

from __future__ import annotations

import json
import logging
import math
import re
import zlib
from typing import Any

import httpx2

from ..printable import printable

__all__ = [
    "DEFAULT_MAX_ANSWER_BYTES",
    "MAX_JSON_DEPTH",
    "TEXT_LIMIT",
    "WORD_LIMIT",
    "Unreadable",
    "call_deadline",
    "json_body",
    "read_answer",
    "safe_text",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_ANSWER_BYTES = 1 << 20
"""The largest API answer read, in bytes after any decompression: RunComfy's are a few KiB."""
MAX_JSON_DEPTH = 64
"""Deeper JSON is not an answer batcher can use (and 1,000 levels exhaust Python's recursion)."""
TEXT_LIMIT = 1000
"""Characters of server text (an error message, a reason) kept in messages and results."""
WORD_LIMIT = 100
"""Characters of a server's one-word answer (a status, an outcome) kept."""
_MESSAGE_FIELDS = ("error_message", "message", "detail")
"""Free text of RunComfy's error bodies, which error messages quote verbatim."""
_INFLATABLE = ("gzip", "x-gzip", "deflate")
_SURROGATE = re.compile("[\ud800-\udfff]")


class Unreadable(Exception):
    """An answer came, but batcher will not read it whole (too large, oddly encoded, trickled out). The
    message is a predicate ("was over ..."): the caller says whose answer, and what that means for the call."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class _TooDeep(Exception):
    """Internal: JSON nested deeper than MAX_JSON_DEPTH."""


def _cap_words(limit: int) -> str:
    size = f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit:,} bytes"
    return f"over batcher's {size} cap on API answers"


async def read_answer(response: httpx2.Response, limit: int) -> bytes:
    """The body of an answer, at most ``limit`` bytes both as sent and decompressed; Unreadable past that.

    Identity is asked for; gzip and deflate (a proxy may compress anyway) are
    decompressed no further than the cap, any other encoding is refused unread.
    """
    status = response.status_code
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity", *_INFLATABLE):
        raise Unreadable(f"came {printable(encoding, 40)}-encoded, which batcher does not read", status)
    declared = response.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise Unreadable(f"announced {int(declared):,} bytes, {_cap_words(limit)}", status)
    if response.is_stream_consumed:
        # An in-process transport (tests) hands over a body httpx2 has already read and decoded.
        content = response.content
        if len(content) > limit:
            raise Unreadable(f"was {_cap_words(limit)}", status)
        return content
    raw = bytearray()
    async for chunk in response.aiter_raw():  # raw: httpx2's own decoder would inflate without a bound
        raw += chunk
        if len(raw) > limit:
            raise Unreadable(f"was {_cap_words(limit)}", status)
    return _inflate(bytes(raw), encoding, limit, status) if encoding in _INFLATABLE else bytes(raw)


def _inflate(data: bytes, encoding: str, limit: int, status: int) -> bytes:
    # deflate is zlib-wrapped by the standard and raw by some servers: httpx2 tries both, so do we.
    for wbits in (31,) if "gzip" in encoding else (15, -15):
        inflater = zlib.decompressobj(wbits)
        try:
            content = inflater.decompress(data, limit + 1)  # a bomb stops here, at the cap
        except zlib.error:
            continue
        if len(content) > limit:
            raise Unreadable(f"was {_cap_words(limit)} once decompressed", status)
        return content
    raise Unreadable(f"came {encoding}-encoded but does not decompress", status)


def call_deadline(timeout: httpx2.Timeout) -> float | None:
    """The most a whole call may take: every one of its time limits together.

    httpx2 bounds each read, not the answer: a server sending a byte every few
    seconds would hold a call for days. Each phase within its own limit fits in
    their sum, so only an answer trickled out (or a request trickled in) hits it.
    """
    parts = (timeout.connect, timeout.read, timeout.write, timeout.pool)
    known = [part for part in parts if part is not None]
    return sum(known) if known else None


def json_body(content: bytes, secret: str) -> dict[str, Any] | None:
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
    if _plain(content, secret):
        # Nothing to scrub (RunComfy's usual answer): see `_plain`.
        cleaned: object = body
    else:
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
            cleaned[name] = printable(cleaned[name], TEXT_LIMIT)
    return cleaned


def _plain(content: bytes, secret: str) -> bool:
    """True when `_scrubbed` would change nothing in the JSON of content, known from its bytes alone.

    UTF-8 without an escape (no backslash) and without NUL (UTF-16 and UTF-32 have them): every string
    json.loads decodes, key or value, is then a piece of these bytes, which hold no token and cannot hold
    a lone surrogate (not UTF-8); and with at most MAX_JSON_DEPTH brackets in all, none nests that deep.
    """
    if b"\\" in content or b"\0" in content or content.count(b"{") + content.count(b"[") > MAX_JSON_DEPTH:
        return False
    return not secret or secret.encode() not in content


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
    return safe_text(text)


def safe_text(text: str) -> str:
    """text that any JSON writer and UTF-8 encoder accepts: lone surrogates replaced."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text
