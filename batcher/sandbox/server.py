"""A local RunComfy-compatible server for rehearsals and tests.

It speaks the four calls of the Model API (submit, status, result, cancel)
plus model info and the account balance, runs jobs on a clock (queue delay,
then run delay), serves real, deterministic PNGs, and injects faults at a
chosen rate: 429 with Retry-After, 500 with RunComfy's error body, bare 502
and 503, dropped connections (before or after accepting a submit), answers
slower than the client's read timeout, and truncated bodies.

It speaks RunComfy's dialect by default (see `DIALECTS`), and on request
each variant that RunComfy's own clients show they meet: other state words,
other timestamp formats, errors sent with HTTP 200. It can refuse as the
real service does (`REFUSALS`): a balance that runs out, a token refused
with 400004, another user's request.

It is a small HTTP/1.1 server on h11 and anyio rather than an ASGI app,
because the faults worth rehearsing live below HTTP: a reset with no answer,
a body cut short of its Content-Length. It keeps its own records
(`Sandbox.submits`, `Sandbox.served`) so that tests can check, from the
server's side, that nothing was submitted twice and every byte arrived.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import anyio.abc
import h11

from ..errors import UsageError
from ..manifest.cost import load_price_table
from ..manifest.localimages import check_inline_images
from ..manifest.schema import load_model_schema

__all__ = [
    "DEFAULT_FAULTS",
    "DIALECTS",
    "FAULT_KINDS",
    "REFUSALS",
    "Sandbox",
    "SandboxConfig",
    "SandboxThread",
    "SubmitRecord",
    "make_png",
]

DEFAULT_FAULTS = ("429", "500", "502", "503", "drop", "drop_after_accept", "slow", "truncate")
"""The faults drawn from unless told otherwise (`SandboxConfig.faults`, ``batcher sandbox --faults``)."""
FAULT_KINDS = (*DEFAULT_FAULTS, "accept_503", "accept_500001", "accept_empty", "accept_list", "accept_no_id")
"""Fault names for `SandboxConfig.faults`.

429                answer 429 with Retry-After; nothing happens
500                RunComfy's 500001 error body; nothing happens
502                bare gateway 502; a submit *was* accepted behind it
503                bare 503; nothing happens
drop               reset the connection before doing anything
drop_after_accept  accept the submit (or do the call), then reset without answering
slow               do the call, then answer after `slow_seconds` (past a client's read timeout)
truncate           announce the full length, send half the body, close
accept_503         accept the submit (or do the call), then answer a bare 503
accept_500001      accept the submit (or do the call), then answer 500 with RunComfy's 500001 body
accept_empty       accept the submit (or do the call), then answer 200 with an empty body
accept_list        accept the submit (or do the call), then answer 200 with ``[]``
accept_no_id       accept the submit (or do the call), then answer 200 with an object without request_id

The accept_* kinds are a server that takes (and charges) the job and answers as if it had not: a client
that reads such an answer as "not accepted" pays twice. Not among `DEFAULT_FAULTS`.
"""


DIALECTS = ("runcomfy", "cli", "nodes", "errors-as-200", "epoch-ms")
"""Names for `SandboxConfig.dialect`: how the sandbox words its answers.

runcomfy       (default) what RunComfy documents and its clients read: in_queue, in_progress,
               completed, failed, cancelled; created_at/finished_at as ISO 8601 strings in UTC
               with "Z" and milliseconds; status_url and result_url in every answer;
               error bodies with their HTTP status (402 for 400002, a low balance)
cli            the words RunComfy's CLI also ends on (src/poll.rs): succeeded, canceled; timestamps
               with a +00:00 offset and microseconds; a failure's error as a string; 400002 with
               HTTP 400 (the CLI reads 400 and 422 alike, so only the code tells)
nodes          the words RunComfy's ComfyUI nodes wait through (runcomfy/execution.py): pending,
               waiting (queued), starting, processing (running); timestamps without a zone (UTC);
               a submit answer with the request_id alone and no URLs anywhere; a low balance as a
               bare 402 (what the nodes' client checks); cancel's outcome cancellation_requested
errors-as-200  RunComfy's error bodies (400001/400002/400004/401001/403001/404001/422001) with
               HTTP 200 and a top-level error_code, as RunComfy's MCP server warns some APIs do
epoch-ms       timestamps as epoch milliseconds (numbers); otherwise as runcomfy

RunComfy does not document its timestamp format (its CLI only declares them strings), so
the dialects between them cover what a server is likely to send.
"""

REFUSALS = {
    "balance": (400002, "Insufficient balance. Please top up your account."),
    "token": (400004, "Invalid or expired API token, or the account is inactive."),
    "other-user": (403001, "This request belongs to another user."),
}
"""Names for `SandboxConfig.refuse`: RunComfy's refusal to give, and where.

balance     every submit: 400002 (a low balance; see also `SandboxConfig.balance_usd`)
token       every API call: 400004 with HTTP 401
other-user  every status, result and cancel: 403001 with HTTP 403
"""

_NOMINAL_BALANCE = 1_000_000.0
"""What the balance endpoint reports for an unlimited account (no `balance_usd` set)."""


def _iso_z(moment: float) -> str:
    """2026-11-26T10:00:00.123Z"""
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _iso_offset(moment: float) -> str:
    """2026-11-26T10:00:00.123456+00:00"""
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="microseconds")


def _iso_naive(moment: float) -> str:
    """2026-11-26T10:00:00.123456 (UTC, though it does not say so)"""
    return datetime.fromtimestamp(moment, UTC).replace(tzinfo=None).isoformat(timespec="microseconds")


def _epoch_ms(moment: float) -> int:
    return round(moment * 1000)


@dataclass(frozen=True, slots=True)
class _Dialect:
    """How one dialect words its answers (see `DIALECTS`)."""

    queued: tuple[str, ...] = ("in_queue",)
    """Words said while a job waits, each for an equal share of the queue delay, in order."""
    running: tuple[str, ...] = ("in_progress",)
    """Words said while a job runs, each for an equal share of the run delay, in order."""
    completed: str = "completed"
    failed: str = "failed"
    cancelled: str = "cancelled"
    cancel_outcome: str = "cancelled"
    stamp: Callable[[float], str | int] = _iso_z
    urls: bool = True
    """status_url and result_url in every answer, cancel_url too in a submit's."""
    error_as_text: bool = False
    """A failed job's error as a string rather than an object."""
    errors_as_200: bool = False
    balance_status: int = 402
    balance_body: bool = True


_DIALECTS: dict[str, _Dialect] = {
    "runcomfy": _Dialect(),
    "cli": _Dialect(
        completed="succeeded", cancelled="canceled", stamp=_iso_offset, error_as_text=True, balance_status=400
    ),
    "nodes": _Dialect(
        queued=("pending", "waiting"),
        running=("starting", "processing"),
        cancel_outcome="cancellation_requested",
        stamp=_iso_naive,
        urls=False,
        error_as_text=True,
        balance_body=False,
    ),
    "errors-as-200": _Dialect(errors_as_200=True),
    "epoch-ms": _Dialect(stamp=_epoch_ms),
}


_MODEL_FAILED = ("sandbox: the model failed on this input", "generation_failed")
_BLOCKED = (
    "Your request was rejected by the safety system. It may contain content that is not allowed.",
    "moderation_blocked",
)
"""A failed job's error: the model's own failure, or a content-policy block worded as gpt-image words it."""

_SANDBOX_ID = re.compile(r"^sbx-([0-9a-f]{1,16})-[0-9a-f]{12}$")


def make_png(seed: str, size: int = 64) -> bytes:
    """A small, valid RGB PNG whose pixels depend on seed."""
    digest = hashlib.sha256(seed.encode()).digest()
    rows = []
    for y in range(size):
        row = bytearray(b"\x00")
        for x in range(size):
            row += bytes(((digest[0] + x * 3) % 256, (digest[1] + y * 3) % 256, digest[2 + (x * y) % 30]))
        rows.append(bytes(row))
    raw = b"".join(rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@dataclass(slots=True)
class SandboxConfig:
    """How the sandbox behaves. Rates are fractions from 0 to 1."""

    queue_delay: float = 0.3
    run_delay: float = 0.7
    run_delay_max: float | None = None
    """When set, each job runs for a duration drawn between run_delay and this (stable per job)."""
    fail_rate: float = 0.0
    fault_rate: float = 0.0
    faults: tuple[str, ...] = DEFAULT_FAULTS
    slow_seconds: float = 5.0
    retry_after: float = 1.0
    image_size: int = 64
    images_per_job: int = 1
    url_ttl: float | None = None
    files_origin: str | None = None
    """The ``scheme://host:port`` output URLs name, to rehearse outputs on another host; default: the sandbox's own."""
    """Seconds an output URL stays valid; None for ever."""
    require_token: str | None = None
    auth_status: int = 401
    """How a wrong token is refused: 401 with RunComfy's 401001 body, or 403 with a bare message."""
    max_in_flight: int | None = None
    """An account's cap on jobs queued or running: a submit past it gets 429 (nothing accepted)."""
    unknown_window: float = 0.0
    """Seconds after a submit during which the request is not known yet (404001), like a replica lagging."""
    rate_limit: float | None = None
    """API requests a second (a token bucket of one second's burst); more get 429 with Retry-After."""
    seed: int | None = None
    fault_paths: tuple[str, ...] = ("submit", "result", "status", "cancel", "file")
    schema_dirs: tuple[Path, ...] = ()
    """Folders of user model schemas, so the sandbox validates (and accepts) those models too."""
    dialect: str = "runcomfy"
    """How answers are worded: one of `DIALECTS`."""
    balance_usd: float | None = None
    """The account's starting balance: each accepted submit is debited its price (from the
    bundled price table), and a submit it cannot pay for is refused with 400002. None: unlimited."""
    model_price: float | None = None
    """``base_price_usd`` to answer for every model (default: the bundled table's, at the defaults)."""
    refuse: str | None = None
    """Refuse with one of `REFUSALS` (balance, token, other-user), as RunComfy would."""
    accounts: tuple[str, ...] = ()
    """Tokens of several accounts: each its own jobs, in-flight cap (max_in_flight) and request rate
    (rate_limit); any other token is refused (401001), and a request asked about with another account's
    token gets 403001, as RunComfy answers. Empty: one account, any bearer token."""
    blocked_words: tuple[str, ...] = ()
    """A job whose prompt holds one of these (any case) is accepted, runs, and fails with a content-policy
    error, as gpt-image's moderation answers (``moderation_blocked``)."""

    def serve(self) -> AbstractAsyncContextManager[str]:
        """This sandbox served on loopback for as long as the block lasts (`batcher.engine.endpoint.LocalApi`)."""
        return Sandbox(self).running()

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULT_KINDS)
        if unknown:
            msg = f"unknown sandbox fault(s): {', '.join(sorted(unknown))}; known: {', '.join(FAULT_KINDS)}"
            raise UsageError(msg)
        if self.dialect not in DIALECTS:
            msg = f"unknown sandbox dialect {self.dialect!r}; known: {', '.join(DIALECTS)}"
            raise UsageError(msg)
        if self.refuse is not None and self.refuse not in REFUSALS:
            msg = f"unknown sandbox refusal {self.refuse!r}; known: {', '.join(REFUSALS)}"
            raise UsageError(msg)


@dataclass(slots=True)
class SubmitRecord:
    """One submit the sandbox accepted, as the server saw it."""

    request_id: str
    body: dict[str, Any]
    accepted_at: float
    answered: bool = True
    """False when a fault swallowed the answer: the client cannot know this id."""


@dataclass(slots=True)
class _Job:
    record: SubmitRecord
    run_at: float
    done_at: float
    will_fail: bool
    model: str = ""
    account: str | None = None
    """The token that submitted it (with `SandboxConfig.accounts`); None: anyone may ask."""
    blocked: bool = False
    """It fails on a content-policy block (`SandboxConfig.blocked_words`)."""
    cancelled: bool = False
    started_at: float | None = None


@dataclass(slots=True)
class _Response:
    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    fault: str | None = None


def _json(status: int, payload: dict[str, Any], headers: list[tuple[str, str]] | None = None) -> _Response:
    return _Response(status, json.dumps(payload).encode(), [("content-type", "application/json"), *(headers or [])])


def _error(status: int, code: int, message: str, detail: Any = None) -> _Response:
    payload: dict[str, Any] = {"error_code": code, "error_message": message}
    if detail is not None:
        payload["detail"] = detail
    return _json(status, payload)


class Sandbox:
    """The server's state and request handling; serve it with `running()` or `SandboxThread`."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.rng = random.Random(self.config.seed)
        self.jobs: dict[str, _Job] = {}
        self.submits: list[SubmitRecord] = []
        self.served: dict[str, str] = {}
        """Output path -> sha256 of the bytes it serves."""
        self.faults_injected: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.api_calls_at: list[float] = []
        self.rate_limited_at: list[float] = []
        self._buckets: dict[str, tuple[float, float]] = {}
        """Per account: tokens left in its rate bucket, and when it was last filled."""
        self.submits_by_account: dict[int, int] = {}
        """Accepted submits per account, by its place in `SandboxConfig.accounts` (1, 2, …): never a token."""
        self.account_refusals_by_account: dict[int, int] = {}
        self.other_user_refusals = 0
        """Requests refused with 403001 because another account submitted them: must stay 0 for batcher."""
        self.account_refusals = 0
        """Submits refused with 429 because max_in_flight jobs were queued or running."""
        self.balance_usd = self.config.balance_usd
        """What is left of the account's balance (None: unlimited); `top_up` adds to it."""
        self.balance_refusals = 0
        """Submits refused with 400002 (the balance could not pay, or refuse="balance")."""
        self.credentials_seen_by_file_host = 0
        """File requests that carried an Authorization header: must stay 0."""
        self.port: int | None = None
        self.host = "127.0.0.1"

    # -- bookkeeping that tests read ------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "submits": len(self.submits),
            "jobs": len(self.jobs),
            "calls": dict(self.calls),
            "faults": dict(self.faults_injected),
            "unanswered_submits": sum(1 for s in self.submits if not s.answered),
            "account_refusals": self.account_refusals,
            "balance_refusals": self.balance_refusals,
            "balance_usd": self.balance_usd,
            "rate_calls_at": self.api_calls_at,
            "rate_limited_at": self.rate_limited_at,
            "submits_by_account": dict(self.submits_by_account),
            "account_refusals_by_account": dict(self.account_refusals_by_account),
            "other_user_refusals": self.other_user_refusals,
        }

    def top_up(self, amount: float) -> None:
        """Add to a limited balance, as a user would on RunComfy's site."""
        if self.balance_usd is not None:
            self.balance_usd += amount

    @property
    def dialect(self) -> _Dialect:
        """The dialect in force (read each time: a test may switch it between runs)."""
        return _DIALECTS[self.config.dialect]

    def _refusal(self, status: int, code: int, message: str, detail: Any = None) -> _Response:
        """RunComfy's error body with its HTTP status, or with 200 in the errors-as-200 dialect."""
        return _error(200 if self.dialect.errors_as_200 else status, code, message, detail)

    def _pick_fault(self, kind: str) -> str | None:
        config = self.config
        if config.fault_rate <= 0 or kind not in config.fault_paths or not config.faults:
            return None
        if self.rng.random() >= config.fault_rate:
            return None
        fault = self.rng.choice(config.faults)
        if kind != "submit" and fault == "502":
            fault = "503"
        self.faults_injected[fault] = self.faults_injected.get(fault, 0) + 1
        return fault

    # -- the API ---------------------------------------------------------------

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> _Response:
        parts = urlsplit(target)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        segments = [s for s in path.split("/") if s]
        if segments[:1] == ["files"] and method == "GET":
            if "authorization" in headers:
                self.credentials_seen_by_file_host += 1
            expires = query.get("expires")
            if expires and float(expires[0]) < time.time():
                return _Response(403, b"<Error>Request has expired</Error>", [("content-type", "application/xml")])
            return self._file(path)
        if segments[:1] == ["inputs"] and method in ("GET", "HEAD"):
            return self._input(segments[-1], method, headers)
        if segments[:1] == ["_sandbox"]:
            return _json(200, self.stats())
        bearer = headers.get("authorization", "")
        account = bearer.removeprefix("Bearer ") if self.config.accounts else ""
        if self.config.accounts and account not in self.config.accounts:
            return self._refusal(401, 401001, "Invalid or missing API token")
        if self.config.rate_limit is not None and not self._take_token(account):
            return _json(429, {"error_message": "Rate limit exceeded"}, [("retry-after", "1")])
        if self.config.require_token is not None:
            if headers.get("authorization") != f"Bearer {self.config.require_token}":
                if self.config.auth_status == 403:
                    return _json(403, {"error_message": "Forbidden"})
                return self._refusal(401, 401001, "Invalid or missing API token")
        elif not headers.get("authorization", "").startswith("Bearer "):
            return self._refusal(401, 401001, "Missing API token")
        if self.config.refuse == "token":
            return self._refusal(401, *REFUSALS["token"])
        if segments == ["prod", "v2", "balance"] and method == "GET":
            return self._balance()
        if segments[:2] == ["v1", "models"] and len(segments) > 2:
            model = "/".join(segments[2:])
            if method == "POST":
                return self._submit(model, body, account or None)
            if method == "GET":
                return self._model_info(model)
        if segments[:2] == ["v1", "requests"] and len(segments) == 4:
            request_id, action = segments[2], segments[3]
            if self.config.refuse == "other-user" and action in ("status", "result", "cancel"):
                return self._refusal(403, *REFUSALS["other-user"])
            job = self.jobs.get(request_id)
            if job is not None and job.account is not None and job.account != account:
                self.other_user_refusals += 1
                return self._refusal(403, *REFUSALS["other-user"])
            if action == "status" and method == "GET":
                return self._look(request_id, with_output=False, kind="status")
            if action == "result" and method == "GET":
                return self._look(
                    request_id, with_output=True, kind="result", cost="true" in query.get("include_cost", [])
                )
            if action == "cancel" and method == "POST":
                return self._cancel(request_id)
        return _error(404, 404000, f"no route for {method} {path}")

    def _balance(self) -> _Response:
        """RunComfy's balance endpoint, as its CLI reads it: GET /prod/v2/balance on the core API
        (api.runcomfy.net; one wallet pays for every product), answering ``balance_usd``."""
        self._count("balance")
        left = self.balance_usd if self.balance_usd is not None else _NOMINAL_BALANCE
        return _json(200, {"balance_usd": round(left, 6), "currency": "USD"})

    def _model_info(self, model: str) -> _Response:
        """Model info as RunComfy's clients read it: ``base_price_usd`` (at the schema's defaults),
        ``price_unit`` and ``pricing_note``, from the bundled price table."""
        self._count("model")
        try:
            schema = load_model_schema(model, self.config.schema_dirs)
        except UsageError:
            return self._refusal(400, 400001, f"Unknown model id {model!r}")
        info: dict[str, Any] = {"model_id": model}
        table = load_price_table(model, self.config.schema_dirs)
        price = table.price(schema.with_defaults({})) if table else None
        if self.config.model_price is not None:
            price = self.config.model_price  # a price change at RunComfy, for rehearsals and tests
        if table is not None and price is not None:
            info.update(base_price_usd=price, price_unit=table.unit, pricing_note=table.note, currency="USD")
        return _json(200, info)

    def _take_token(self, account: str) -> bool:
        """One request from account's bucket (each account has its own rate)."""
        assert self.config.rate_limit is not None
        now = time.monotonic()
        self.api_calls_at.append(now)
        rate = self.config.rate_limit
        left, filled_at = self._buckets.get(account, (rate, now))
        left = min(rate, left + (now - filled_at) * rate)
        if left >= 1:
            self._buckets[account] = (left - 1, now)
            return True
        self._buckets[account] = (left, now)
        self.rate_limited_at.append(now)
        return False

    def _account_number(self, account: str | None) -> int:
        return self.config.accounts.index(account) + 1 if account in self.config.accounts else 1

    def _count(self, kind: str) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def _submit(self, model: str, body: bytes, account: str | None = None) -> _Response:
        self._count("submit")
        fault = self._pick_fault("submit")
        if fault in ("429", "500", "503", "drop"):
            return self._fault_response(fault)
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict):
                raise ValueError("not an object")
        except ValueError:
            return _error(422, 422001, "Body is not a JSON object")
        try:
            schema = load_model_schema(model, self.config.schema_dirs)
        except UsageError:
            return self._refusal(400, 400001, f"Unknown model id {model!r}")
        # Inline images (data: URIs, as RunComfy's nodes send local files) are decoded and judged here;
        # the schema then sees each as a short stand-in, never megabytes of base64.
        stood_in, problems = check_inline_images(schema, payload)
        problems = sorted([*problems, *schema.validate(stood_in)], key=lambda p: p.field)
        if problems:
            detail = [{"loc": p.field, "msg": p.message} for p in problems]
            return self._refusal(422, 422001, "Validation failed", detail)
        price = self._price_of(model, payload)
        if not self._can_pay(price):
            return self._balance_refusal()
        now = time.time()
        cap = self.config.max_in_flight
        if (
            cap is not None
            and sum(
                j.account == account and self._state(j, now) in ("in_queue", "in_progress") for j in self.jobs.values()
            )
            >= cap
        ):
            self.account_refusals += 1
            number = self._account_number(account)
            self.account_refusals_by_account[number] = self.account_refusals_by_account.get(number, 0) + 1
            return _json(
                429,
                {"error_message": f"Too many requests in flight for this account (limit {cap})"},
                [("retry-after", f"{self.config.retry_after:g}")],
            )
        request_id = f"sbx-{int(now * 1000):x}-{self.rng.getrandbits(48):012x}"
        record = SubmitRecord(request_id, payload, now, answered=fault is None)
        self.jobs[request_id] = job = self._job_for(record)
        job.model = model
        job.account = account
        number = self._account_number(account)
        self.submits_by_account[number] = self.submits_by_account.get(number, 0) + 1
        self.submits.append(record)
        if self.balance_usd is not None:
            self.balance_usd -= price  # debited when accepted: a hold, as a card payment would be
        if fault is not None:
            return self._fault_response(fault, answer=self._submit_answer(request_id))
        return self._submit_answer(request_id)

    def _can_pay(self, price: float) -> bool:
        if self.config.refuse == "balance":
            return False
        # A hair of slack: the balance is a sum of float prices.
        return self.balance_usd is None or price <= self.balance_usd + 1e-9

    def _balance_refusal(self) -> _Response:
        """400002 the way the dialect sends it: with its HTTP status and body, or a bare 402."""
        self.balance_refusals += 1
        dialect = self.dialect
        if not dialect.balance_body:
            return _Response(402, b"Payment Required", [("content-type", "text/plain")])
        return self._refusal(dialect.balance_status, *REFUSALS["balance"])

    def _urls(self, request_id: str) -> dict[str, str]:
        """The URLs of a request, as RunComfy names them in its answers."""
        base = f"http://{self.host}:{self.port}/v1/requests/{request_id}"
        return {"status_url": f"{base}/status", "result_url": f"{base}/result"}

    def _submit_answer(self, request_id: str) -> _Response:
        payload: dict[str, Any] = {"request_id": request_id}
        if self.dialect.urls:
            cancel = f"http://{self.host}:{self.port}/v1/requests/{request_id}/cancel"
            payload.update(self._urls(request_id), cancel_url=cancel)
        return _json(200, payload)

    def _job_for(self, record: SubmitRecord) -> _Job:
        run_at = record.accepted_at + self.config.queue_delay
        # Fate by hash, not by the RNG, so that a job looks the same to every sandbox instance.
        # From the id's random part only (drawn from the seeded RNG), not its clock part:
        # the same --seed then gives the same fates.
        digest = hashlib.sha256(record.request_id.rsplit("-", 1)[-1].encode()).digest()
        fate = int.from_bytes(digest[:4]) / 0xFFFFFFFF
        duration = self.config.run_delay
        if self.config.run_delay_max is not None:
            spread = int.from_bytes(digest[4:8]) / 0xFFFFFFFF
            duration += spread * (self.config.run_delay_max - self.config.run_delay)
        prompt = str(record.body.get("prompt", "")).lower()
        blocked = any(word.lower() in prompt for word in self.config.blocked_words)
        return _Job(
            record, run_at, run_at + duration, will_fail=blocked or fate < self.config.fail_rate, blocked=blocked
        )

    def _find(self, request_id: str) -> _Job | None:
        """A job by id; ids minted by an earlier sandbox (a resumed --sandbox run) are rebuilt from the id."""
        job = self.jobs.get(request_id)
        if job is None:
            match = _SANDBOX_ID.match(request_id)
            if match is None:
                return None
            record = SubmitRecord(request_id, {}, int(match.group(1), 16) / 1000)
            job = self.jobs[request_id] = self._job_for(record)
        return job

    def _state(self, job: _Job, now: float) -> str:
        if job.cancelled:
            return "cancelled"
        if now < job.run_at:
            return "in_queue"
        if now < job.done_at:
            return "in_progress"
        return "failed" if job.will_fail else "completed"

    def _word(self, job: _Job, state: str, now: float) -> str:
        """The dialect's word for a job's state; a phase with several words says each in turn."""
        dialect = self.dialect
        if state == "in_queue":
            return _phase_word(dialect.queued, job.record.accepted_at, job.run_at, now)
        if state == "in_progress":
            return _phase_word(dialect.running, job.run_at, job.done_at, now)
        words = {"completed": dialect.completed, "failed": dialect.failed, "cancelled": dialect.cancelled}
        return words[state]

    def _look(self, request_id: str, *, with_output: bool, kind: str, cost: bool = False) -> _Response:
        self._count(kind)
        fault = self._pick_fault(kind)
        if fault in ("429", "500", "503", "drop"):
            return self._fault_response(fault)
        job = self._find(request_id)
        now = time.time()
        if job is None or now < job.record.accepted_at + self.config.unknown_window:
            return self._refusal(404, 404001, "Request not found or expired")
        state = self._state(job, now)
        dialect = self.dialect
        payload: dict[str, Any] = {"request_id": request_id, "status": self._word(job, state, now)}
        if state == "in_queue":
            payload["queue_position"] = sum(1 for j in self.jobs.values() if self._state(j, now) == "in_queue")
        if with_output:
            if job.model:
                payload["model_id"] = job.model  # RunComfy's nodes check it when it is there
            payload.update(output=None, error=None, created_at=dialect.stamp(job.record.accepted_at), finished_at=None)
            if state == "completed":
                payload["output"] = self._outputs(request_id, now)
                payload["finished_at"] = dialect.stamp(job.done_at)
                if cost:
                    payload["cost"] = self._price(job) * self.config.images_per_job
            elif state == "failed":
                message, code = _BLOCKED if job.blocked else _MODEL_FAILED
                payload["error"] = message if dialect.error_as_text else {"message": message, "code": code}
        if dialect.urls:
            payload.update(self._urls(request_id))
        response = _json(200, payload)
        if fault is not None:
            return self._fault_response(fault, answer=response)
        return response

    def _price(self, job: _Job) -> float:
        """What the real service would charge for job (0 when unknown)."""
        return self._price_of(job.model, job.record.body) if job.model else 0.0

    def _price_of(self, model: str, payload: dict[str, Any]) -> float:
        """What the real service would charge for this input, from the price table (0 when unknown).

        Defaults are filled first: a body without ``quality`` is charged at the default quality.
        """
        table = load_price_table(model, self.config.schema_dirs)
        if table is None:
            return 0.0
        defaults: dict[str, Any] = {}
        with suppress(UsageError):  # no schema: price the body as sent
            schema = load_model_schema(model, self.config.schema_dirs)
            payload, defaults = schema.with_defaults(payload), schema.with_defaults({})
        price = table.price(payload) or 0.0
        base = table.price(defaults)
        if self.config.model_price is not None and base:
            price *= self.config.model_price / base  # a price change at RunComfy is what it charges too
        return price

    def _outputs(self, request_id: str, now: float) -> dict[str, Any]:
        expiry = f"?expires={now + self.config.url_ttl:.3f}" if self.config.url_ttl is not None else ""
        urls = [
            f"{self.config.files_origin or f'http://{self.host}:{self.port}'}/files/{request_id}/{index}.png{expiry}"
            for index in range(self.config.images_per_job)
        ]
        return {"image": urls[0]} if len(urls) == 1 else {"images": urls}

    def _file(self, target: str) -> _Response:
        self._count("file")
        fault = self._pick_fault("file")
        if fault in ("429", "500", "503", "drop"):
            return self._fault_response(fault)
        segments = [s for s in target.split("/") if s]
        if len(segments) != 3 or self._find(segments[1]) is None:
            return _Response(404, b"not found", [("content-type", "text/plain")])
        return self._serve_png(target, fault)

    def _input(self, name: str, method: str, headers: dict[str, str]) -> _Response:
        """Reference images for pre-flight rehearsals: ``/inputs/<name>.png`` is an image;
        ``huge-*`` announces 60 MB, ``nohead-*`` refuses HEAD, ``*.html`` is a web page."""
        if name.startswith("nohead-") and method == "HEAD":
            return _Response(405, b"", [("content-type", "text/plain")])
        if name.endswith(".html"):
            body, kind = b"<html><body>Sign in to view this image</body></html>", "text/html"
        elif name.endswith(".png"):
            body, kind = make_png("/inputs/" + name, self.config.image_size), "image/png"
        else:
            return _Response(404, b"not found", [("content-type", "text/plain")])
        size = 60 * 1024 * 1024 if name.startswith("huge-") else len(body)
        if method == "HEAD":
            return _Response(200, b"", [("content-type", kind), ("content-length", str(size))])
        if headers.get("range") == "bytes=0-0":
            return _Response(206, body[:1], [("content-type", kind), ("content-range", f"bytes 0-0/{size}")])
        return _Response(200, body, [("content-type", kind)])

    def _serve_png(self, target: str, fault: str | None) -> _Response:
        data = make_png(target, self.config.image_size)
        self.served[target] = hashlib.sha256(data).hexdigest()
        response = _Response(200, data, [("content-type", "image/png")])
        if fault is not None:
            return self._fault_response(fault, answer=response)
        return response

    def _cancel(self, request_id: str) -> _Response:
        self._count("cancel")
        job = self._find(request_id)
        if job is None:
            return self._refusal(404, 404001, "Request not found or expired")
        now = time.time()
        state = self._state(job, now)
        if state == "in_queue":
            job.cancelled = True
            dialect = self.dialect
            return _json(
                200, {"request_id": request_id, "status": dialect.cancelled, "outcome": dialect.cancel_outcome}
            )
        return _json(
            200, {"request_id": request_id, "status": self._word(job, state, now), "outcome": "not_cancellable"}
        )

    def _fault_response(self, fault: str, answer: _Response | None = None) -> _Response:
        if fault == "429":
            return _json(
                429,
                {"error_message": "Too many requests"},
                [("retry-after", f"{self.config.retry_after:g}")],
            )
        if fault == "500":
            return _error(500, 500001, "Internal server error, please retry")
        if fault in ("502", "503"):
            status = int(fault)
            return _Response(status, b"<html><body>Bad gateway</body></html>", [("content-type", "text/html")])
        if fault == "drop":
            return _Response(0, b"", fault="drop")
        if answer is None:
            return _Response(0, b"", fault="drop")
        if fault == "drop_after_accept":
            return _Response(0, b"", fault="drop")
        if fault in _ACCEPTED_ANSWERS:
            status, body = _ACCEPTED_ANSWERS[fault]
            return _Response(status, body, [("content-type", "application/json")] if body else [])
        answer.fault = fault  # slow or truncate: applied while sending
        return answer

    # -- the server ------------------------------------------------------------

    async def _serve_connection(self, stream: anyio.abc.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while True:
                request = await _next_event(connection, stream)
                if not isinstance(request, h11.Request):
                    return
                body = bytearray()  # appended in place: a 60 MB submit of inline images arrives in 64 KiB pieces
                while True:
                    event = await _next_event(connection, stream)
                    if isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                headers = {k.decode().lower(): v.decode() for k, v in request.headers}
                response = self.handle(request.method.decode(), request.target.decode(), headers, bytes(body))
                if not await self._send(connection, stream, response):
                    return
                if connection.our_state is h11.MUST_CLOSE or connection.their_state is h11.MUST_CLOSE:
                    return
                connection.start_next_cycle()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, h11.ProtocolError, OSError):
            return
        finally:
            with suppress(Exception):
                await stream.aclose()

    async def _send(self, connection: h11.Connection, stream: anyio.abc.SocketStream, response: _Response) -> bool:
        if response.fault == "drop":
            sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            # SO_LINGER 0: close with RST, the way a crashed proxy would.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if response.fault == "slow":
            await anyio.sleep(self.config.slow_seconds)
        headers = list(response.headers)
        if not any(name == "content-length" for name, _ in headers):  # a HEAD answer gives its own
            headers.append(("content-length", str(len(response.body))))
        await stream.send(connection.send(h11.Response(status_code=response.status, headers=headers)))
        if response.fault == "truncate":
            await stream.send(connection.send(h11.Data(data=response.body[: len(response.body) // 2])))
            return False
        await stream.send(connection.send(h11.Data(data=response.body)) + connection.send(h11.EndOfMessage()))
        return True

    @asynccontextmanager
    async def running(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve on host:port (0 picks a free port) inside the current event loop; yields the base URL."""
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=False)
        self.host = host
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(listener.serve, self._serve_connection)
                try:
                    yield f"http://{host}:{self.port}"
                finally:
                    group.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The caller's own error, raised while we served: give it back as it was raised.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from group.exceptions[0].__cause__
            raise
        finally:
            await listener.aclose()


_ACCEPTED_ANSWERS: dict[str, tuple[int, bytes]] = {
    "accept_503": (503, b""),
    "accept_500001": (500, b'{"error_code": 500001, "error_message": "Internal server error, please retry"}'),
    "accept_empty": (200, b""),
    "accept_list": (200, b"[]"),
    "accept_no_id": (200, b'{"status": "in_queue"}'),
}
"""What each accept_* fault answers once the call was done (see `FAULT_KINDS`)."""


def _phase_word(words: tuple[str, ...], start: float, end: float, now: float) -> str:
    """Of words said in turn from start to end, the one said at now."""
    if len(words) == 1 or end <= start:
        return words[0]
    share = (now - start) / (end - start)
    return words[min(len(words) - 1, max(0, int(share * len(words))))]


async def _next_event(connection: h11.Connection, stream: anyio.abc.SocketStream) -> Any:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                data = b""
            connection.receive_data(data)
            continue
        return event


class SandboxThread:
    """The sandbox on a thread of its own, for tests and for driving a run from another process."""

    def __init__(self, sandbox: Sandbox | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sandbox = sandbox or Sandbox()
        self._host = host
        self._port = port
        self._ready = threading.Event()
        self._stop: anyio.Event | None = None
        self._portal_token: Any = None
        self._thread = threading.Thread(target=self._main, name="batcher-sandbox", daemon=True)
        self.url = ""
        self._error: BaseException | None = None

    def _main(self) -> None:
        async def serve() -> None:
            self._stop = anyio.Event()
            self._portal_token = anyio.lowlevel.current_token()
            async with self.sandbox.running(self._host, self._port) as url:
                self.url = url
                self._ready.set()
                await self._stop.wait()

        try:
            anyio.run(serve)
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    def start(self) -> SandboxThread:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None or not self.url:
            msg = f"the sandbox did not start: {self._error!r}"
            raise UsageError(msg)
        return self

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            anyio.from_thread.run_sync(self._stop.set, token=self._portal_token)
        self._thread.join(10)

    def __enter__(self) -> SandboxThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
