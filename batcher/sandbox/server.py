"""A local RunComfy-compatible server for rehearsals and tests.

It speaks the four calls of the Model API (submit, status, result, cancel)
plus model info, the catalog (`batcher.sandbox.catalog`), and the account balance on a host (port) of its own,
as RunComfy serves it; it runs jobs on a clock (queue delay,
then run delay), serves real, deterministic PNGs (MP4s for a video model), and injects faults at a
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
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import UsageError
from ..manifest.cost import load_price_table
from ..manifest.localimages import check_inline_images
from ..manifest.schema import load_model_schema
from .answers import BLOCKED, MODEL_FAILED, NOT_FOUND, error_response, fault_response, too_many
from .catalog import categories_answer, entry, is_video, models_answer
from .config import REFUSALS, SandboxSettings
from .dialects import Dialect, dialect_named, phase_word
from .mp4 import make_mp4
from .png import make_png
from .wire import Response, json_response, serve

__all__ = [
    "Sandbox",
    "SandboxConfig",
    "SubmitRecord",
]


_NOMINAL_BALANCE = 1_000_000.0
"""What the balance endpoint reports for an unlimited account (no `balance_usd` set)."""


_SANDBOX_ID = re.compile(r"^sbx-([0-9a-f]{1,16})-[0-9a-f]{12}$")


@dataclass(slots=True)
class SandboxConfig(SandboxSettings):
    """The sandbox's settings, and a way to serve them: a `batcher.engine.endpoint.LocalApi`."""

    balance_base: str | None = field(default=None, init=False, repr=False, compare=False)
    """Where the served sandbox's balance is read (``http://127.0.0.1:PORT/prod/v2``, a host of its own, as
    RunComfy's is), while `serve` lasts; None otherwise (`batcher.engine.endpoint.LocalApi`)."""

    def serve(self) -> AbstractAsyncContextManager[str]:
        """This sandbox served on loopback for as long as the block lasts (`batcher.engine.endpoint.LocalApi`)."""
        return self._served(Sandbox(self))

    @asynccontextmanager
    async def _served(self, sandbox: Sandbox) -> AsyncIterator[str]:
        async with sandbox.running() as url:
            self.balance_base = sandbox.balance_base
            try:
                yield url
            finally:
                self.balance_base = None


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
        self.answered_bytes: dict[str, int] = {}
        """Bytes of the answer bodies sent to status and result calls, by call: what polling costs the wire."""
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
        self.revoked: set[str] = set()
        """Tokens refused from now on with 400004 (HTTP 401), as RunComfy answers a revoked key: `revoke`."""
        self.port: int | None = None
        self.host = "127.0.0.1"
        self.balance_port: int | None = None
        """The balance host's port, while served (`balance_base`)."""

    # -- bookkeeping that tests read ------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "submits": len(self.submits),
            "jobs": len(self.jobs),
            "calls": dict(self.calls),
            "answered_bytes": dict(self.answered_bytes),
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

    def revoke(self, token: str) -> None:
        """Refuse token from now on (a key revoked on RunComfy's site mid-run); the other accounts go on."""
        self.revoked.add(token)

    def top_up(self, amount: float) -> None:
        """Add to a limited balance, as a user would on RunComfy's site."""
        if self.balance_usd is not None:
            self.balance_usd += amount

    @property
    def balance_base(self) -> str | None:
        """Where the balance is read while served: a host of its own, as RunComfy's (``GET /balance`` on
        ``https://api.runcomfy.net/prod/v2``, runcomfy-cli src/cmd/balance.rs and src/api.rs
        ``serverless_api_base``), never the Model API's host."""
        if self.balance_port is None:
            return None
        return f"http://{self.host}:{self.balance_port}/prod/v2"

    @property
    def dialect(self) -> Dialect:
        """The dialect in force (read each time: a test may switch it between runs)."""
        return dialect_named(self.config.dialect)

    def _refusal(self, status: int, code: int, message: str, detail: Any = None) -> Response:
        """RunComfy's error body with its HTTP status, or with 200 in the errors-as-200 dialect."""
        return error_response(200 if self.dialect.errors_as_200 else status, code, message, detail)

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

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Response:
        parts = urlsplit(target)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        segments = [s for s in path.split("/") if s]
        if segments[:1] == ["files"] and method == "GET":
            if "authorization" in headers:
                self.credentials_seen_by_file_host += 1
            expires = query.get("expires")
            if expires and float(expires[0]) < time.time():
                return Response(403, b"<Error>Request has expired</Error>", [("content-type", "application/xml")])
            return self._file(path)
        if segments[:1] == ["inputs"] and method in ("GET", "HEAD"):
            return self._input(segments[-1], method, headers)
        if segments[:1] == ["_sandbox"]:
            return json_response(200, self.stats())
        account, refused = self._authorize(headers, rate_limited=True)
        if refused is not None:
            return refused
        if segments == ["v1", "models"] and method == "GET":
            self._count("catalog")
            return json_response(*models_answer(query, self.config.schema_dirs, model_price=self.config.model_price))
        if segments == ["v1", "models", "categories"] and method == "GET":
            self._count("catalog")
            return json_response(*categories_answer(self.config.schema_dirs))
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
        return error_response(404, *NOT_FOUND)

    def _authorize(self, headers: dict[str, str], *, rate_limited: bool) -> tuple[str, Response | None]:
        """The account a call is from ("" with one account), and RunComfy's refusal of it if any: a token not
        `SandboxConfig.token` (or not among `accounts`) gets 401 with 401001 (docs.runcomfy.com error-codes);
        with no token set, any bearer token is taken (the embedded rehearsal's), a missing one is refused."""
        bearer = headers.get("authorization", "")
        account = bearer.removeprefix("Bearer ") if self.config.accounts else ""
        if self.config.accounts and account not in self.config.accounts:
            return account, self._refusal(401, 401001, "Invalid or missing API token")
        if rate_limited and self.config.rate_limit is not None and not self._take_token(account):
            return account, too_many("Rate limit exceeded", "1")
        if self.config.token is not None:
            if bearer != f"Bearer {self.config.token}":
                if self.config.auth_status == 403:
                    return account, json_response(403, {"error_message": "Forbidden"})
                return account, self._refusal(401, 401001, "Invalid or missing API token")
        elif not bearer.startswith("Bearer "):
            return account, self._refusal(401, 401001, "Missing API token")
        if self.config.refuse == "token" or (self.revoked and bearer.removeprefix("Bearer ") in self.revoked):
            return account, self._refusal(401, *REFUSALS["token"])
        return account, None

    def handle_balance(self, method: str, target: str, headers: dict[str, str], _body: bytes) -> Response:
        """The balance's own host (RunComfy's ``api.runcomfy.net``): ``GET /prod/v2/balance``, nothing else."""
        _, refused = self._authorize(headers, rate_limited=False)
        if refused is not None:
            return refused
        if [s for s in unquote(urlsplit(target).path).split("/") if s] == ["prod", "v2", "balance"] and method == "GET":
            return self._balance()
        return error_response(404, *NOT_FOUND)

    def _balance(self) -> Response:
        """RunComfy's balance endpoint, as its CLI reads it: ``GET /balance`` on the core API
        (``https://api.runcomfy.net/prod/v2``, src/cmd/balance.rs; one wallet pays for every product),
        answering ``balance_usd`` and ``currency``."""
        self._count("balance")
        left = self.balance_usd if self.balance_usd is not None else _NOMINAL_BALANCE
        return json_response(200, {"balance_usd": round(left, 6), "currency": "USD"})

    def _model_info(self, model: str) -> Response:
        """Model info as RunComfy's clients read it: its catalog entry (`batcher.sandbox.catalog`), with
        ``base_price_usd`` (at the schema's defaults), ``price_unit``, ``pricing_note`` and its input schema."""
        self._count("model")
        info = entry(model, self.config.schema_dirs, include_schema=True, model_price=self.config.model_price)
        if info is None:
            return self._refusal(400, 400001, f"Unknown model id {model!r}")
        return json_response(200, info)

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

    def _submit(self, model: str, body: bytes, account: str | None = None) -> Response:
        self._count("submit")
        fault = self._pick_fault("submit")
        if fault in ("429", "500", "503", "drop"):
            return fault_response(fault, retry_after=self.config.retry_after)
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict):
                raise ValueError("not an object")
        except ValueError:
            return error_response(422, 422001, "Body is not a JSON object")
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
            return too_many(
                f"Too many requests in flight for this account (limit {cap})", f"{self.config.retry_after:g}"
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
            return fault_response(fault, retry_after=self.config.retry_after, answer=self._submit_answer(request_id))
        return self._submit_answer(request_id)

    def _can_pay(self, price: float) -> bool:
        if self.config.refuse == "balance":
            return False
        # A hair of slack: the balance is a sum of float prices.
        return self.balance_usd is None or price <= self.balance_usd + 1e-9

    def _balance_refusal(self) -> Response:
        """400002 the way the dialect sends it: with its HTTP status and body, or a bare 402."""
        self.balance_refusals += 1
        dialect = self.dialect
        if not dialect.balance_body:
            return Response(402, b"Payment Required", [("content-type", "text/plain")])
        return self._refusal(dialect.balance_status, *REFUSALS["balance"])

    def _urls(self, request_id: str) -> dict[str, str]:
        """The URLs of a request, as RunComfy names them in its answers."""
        base = f"http://{self.host}:{self.port}/v1/requests/{request_id}"
        return {"status_url": f"{base}/status", "result_url": f"{base}/result"}

    def _submit_answer(self, request_id: str) -> Response:
        payload: dict[str, Any] = {"request_id": request_id}
        if self.dialect.urls:
            cancel = f"http://{self.host}:{self.port}/v1/requests/{request_id}/cancel"
            payload.update(self._urls(request_id), cancel_url=cancel)
        return json_response(200, payload)

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
            return phase_word(dialect.queued, job.record.accepted_at, job.run_at, now)
        if state == "in_progress":
            return phase_word(dialect.running, job.run_at, job.done_at, now)
        words = {"completed": dialect.completed, "failed": dialect.failed, "cancelled": dialect.cancelled}
        return words[state]

    def _look(self, request_id: str, *, with_output: bool, kind: str, cost: bool = False) -> Response:
        self._count(kind)
        fault = self._pick_fault(kind)
        if fault in ("429", "500", "503", "drop"):
            return fault_response(fault, retry_after=self.config.retry_after)
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
                message, code = BLOCKED if job.blocked else MODEL_FAILED
                payload["error"] = message if dialect.error_as_text else {"message": message, "code": code}
        if dialect.urls:
            payload.update(self._urls(request_id))
        response = json_response(200, payload)
        self.answered_bytes[kind] = self.answered_bytes.get(kind, 0) + len(response.body)
        if fault is not None:
            return fault_response(fault, retry_after=self.config.retry_after, answer=response)
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
        base = table.rate(defaults)
        if self.config.model_price is not None and base:
            price *= self.config.model_price / base  # a price change at RunComfy is what it charges too
        return price

    def _outputs(self, request_id: str, now: float) -> dict[str, Any]:
        expiry = f"?expires={now + self.config.url_ttl:.3f}" if self.config.url_ttl is not None else ""
        job = self.jobs.get(request_id)
        video = job is not None and is_video(job.model)  # RunComfy's video models answer output.video(s)
        urls = [
            f"{self.config.files_origin or f'http://{self.host}:{self.port}'}/files/{request_id}/{index}.{'mp4' if video else 'png'}{expiry}"
            for index in range(self.config.images_per_job)
        ]
        if video:
            return {"video": urls[0]} if len(urls) == 1 else {"videos": urls}
        return {"image": urls[0]} if len(urls) == 1 else {"images": urls}

    def _file(self, target: str) -> Response:
        self._count("file")
        fault = self._pick_fault("file")
        if fault in ("429", "500", "503", "drop"):
            return fault_response(fault, retry_after=self.config.retry_after)
        segments = [s for s in target.split("/") if s]
        if len(segments) != 3 or self._find(segments[1]) is None:
            return Response(404, b"not found", [("content-type", "text/plain")])
        if target.endswith(".mp4"):
            data = make_mp4(target)
            self.served[target] = hashlib.sha256(data).hexdigest()
            response = Response(200, data, [("content-type", "video/mp4")])
            return (
                fault_response(fault, retry_after=self.config.retry_after, answer=response)
                if fault is not None
                else response
            )
        return self._serve_png(target, fault)

    def _input(self, name: str, method: str, headers: dict[str, str]) -> Response:
        """Reference images for pre-flight rehearsals: ``/inputs/<name>.png`` is an image;
        ``huge-*`` announces 60 MB, ``nohead-*`` refuses HEAD, ``*.html`` is a web page."""
        if name.startswith("nohead-") and method == "HEAD":
            return Response(405, b"", [("content-type", "text/plain")])
        if name.endswith(".html"):
            body, kind = b"<html><body>Sign in to view this image</body></html>", "text/html"
        elif name.endswith(".png"):
            body, kind = make_png("/inputs/" + name, self.config.image_size), "image/png"
        else:
            return Response(404, b"not found", [("content-type", "text/plain")])
        size = 60 * 1024 * 1024 if name.startswith("huge-") else len(body)
        if method == "HEAD":
            return Response(200, b"", [("content-type", kind), ("content-length", str(size))])
        if headers.get("range") == "bytes=0-0":
            return Response(206, body[:1], [("content-type", kind), ("content-range", f"bytes 0-0/{size}")])
        return Response(200, body, [("content-type", kind)])

    def _serve_png(self, target: str, fault: str | None) -> Response:
        data = make_png(target, self.config.image_size)
        self.served[target] = hashlib.sha256(data).hexdigest()
        response = Response(200, data, [("content-type", "image/png")])
        if fault is not None:
            return fault_response(fault, retry_after=self.config.retry_after, answer=response)
        return response

    def _cancel(self, request_id: str) -> Response:
        self._count("cancel")
        job = self._find(request_id)
        if job is None:
            return self._refusal(404, 404001, "Request not found or expired")
        now = time.time()
        state = self._state(job, now)
        if state == "in_queue":
            job.cancelled = True
            dialect = self.dialect
            return json_response(
                200, {"request_id": request_id, "status": dialect.cancelled, "outcome": dialect.cancel_outcome}
            )
        return json_response(
            200, {"request_id": request_id, "status": self._word(job, state, now), "outcome": "not_cancellable"}
        )

    @asynccontextmanager
    async def running(self, host: str = "127.0.0.1", port: int = 0, balance_port: int = 0) -> AsyncIterator[str]:
        """Serve on host:port (0 picks a free port) inside the current event loop, the balance on host:balance_port
        (`balance_base`); yields the API's base URL."""
        self.host = host
        async with (
            serve(self.handle, self.config.slow_seconds, host, port) as (url, bound),
            serve(self.handle_balance, self.config.slow_seconds, host, balance_port) as (_, balance_bound),
        ):
            self.port, self.balance_port = bound, balance_bound
            try:
                yield url
            finally:
                self.balance_port = None
