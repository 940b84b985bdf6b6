"""A local RunComfy-compatible server for rehearsals and tests.

It speaks the four calls of the Model API (submit, status, result, cancel)
plus model info, runs jobs on a clock (queue delay, then run delay), serves
real, deterministic PNGs, and injects faults at a chosen rate: 429 with
Retry-After, 500 with RunComfy's error body, bare 502 and 503, dropped
connections (before or after accepting a submit), answers slower than the
client's read timeout, and truncated bodies.

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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import anyio.abc
import h11

from .cost import load_price_table
from .errors import UsageError
from .schema import load_model_schema

__all__ = ["FAULT_KINDS", "Sandbox", "SandboxConfig", "SandboxThread", "SubmitRecord", "make_png"]

FAULT_KINDS = ("429", "500", "502", "503", "drop", "drop_after_accept", "slow", "truncate")
"""Fault names for `SandboxConfig.faults`.

429                answer 429 with Retry-After; nothing happens
500                RunComfy's 500001 error body; nothing happens
502                bare gateway 502; a submit *was* accepted behind it
503                bare 503; nothing happens
drop               reset the connection before doing anything
drop_after_accept  accept the submit (or do the call), then reset without answering
slow               do the call, then answer after `slow_seconds` (past a client's read timeout)
truncate           announce the full length, send half the body, close
"""


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
    faults: tuple[str, ...] = ("429", "500", "502", "503", "drop", "drop_after_accept", "slow", "truncate")
    slow_seconds: float = 5.0
    retry_after: float = 1.0
    image_size: int = 64
    images_per_job: int = 1
    url_ttl: float | None = None
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

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULT_KINDS)
        if unknown:
            msg = f"unknown sandbox fault(s): {', '.join(sorted(unknown))}; known: {', '.join(FAULT_KINDS)}"
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
        self._bucket = 0.0
        self._bucket_at = 0.0
        self.account_refusals = 0
        """Submits refused with 429 because max_in_flight jobs were queued or running."""
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
            "rate_calls_at": self.api_calls_at,
            "rate_limited_at": self.rate_limited_at,
        }

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
        if self.config.rate_limit is not None and not self._take_token():
            return _json(429, {"error_message": "Rate limit exceeded"}, [("retry-after", "1")])
        if self.config.require_token is not None:
            if headers.get("authorization") != f"Bearer {self.config.require_token}":
                if self.config.auth_status == 403:
                    return _json(403, {"error_message": "Forbidden"})
                return _error(401, 401001, "Invalid or missing API token")
        elif not headers.get("authorization", "").startswith("Bearer "):
            return _error(401, 401001, "Missing API token")
        if segments[:2] == ["v1", "models"] and len(segments) > 2:
            model = "/".join(segments[2:])
            if method == "POST":
                return self._submit(model, body)
            if method == "GET":
                return _json(200, {"model_id": model, "base_price_usd": 0.133, "price_unit": "image"})
        if segments[:2] == ["v1", "requests"] and len(segments) == 4:
            request_id, action = segments[2], segments[3]
            if action == "status" and method == "GET":
                return self._look(request_id, with_output=False, kind="status")
            if action == "result" and method == "GET":
                return self._look(
                    request_id, with_output=True, kind="result", cost="true" in query.get("include_cost", [])
                )
            if action == "cancel" and method == "POST":
                return self._cancel(request_id)
        return _error(404, 404000, f"no route for {method} {path}")

    def _take_token(self) -> bool:
        assert self.config.rate_limit is not None
        now = time.monotonic()
        self.api_calls_at.append(now)
        rate = self.config.rate_limit
        self._bucket = min(rate, self._bucket + (now - self._bucket_at) * rate) if self._bucket_at else rate
        self._bucket_at = now
        if self._bucket >= 1:
            self._bucket -= 1
            return True
        self.rate_limited_at.append(now)
        return False

    def _count(self, kind: str) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def _submit(self, model: str, body: bytes) -> _Response:
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
            return _error(400, 400001, f"Unknown model id {model!r}")
        problems = schema.validate(payload)
        if problems:
            detail = [{"loc": p.field, "msg": p.message} for p in problems]
            return _error(422, 422001, "Validation failed", detail)
        now = time.time()
        cap = self.config.max_in_flight
        if (
            cap is not None
            and sum(self._state(j, now) in ("in_queue", "in_progress") for j in self.jobs.values()) >= cap
        ):
            self.account_refusals += 1
            return _json(
                429,
                {"error_message": f"Too many requests in flight for this account (limit {cap})"},
                [("retry-after", f"{self.config.retry_after:g}")],
            )
        request_id = f"sbx-{int(now * 1000):x}-{self.rng.getrandbits(48):012x}"
        record = SubmitRecord(request_id, payload, now, answered=fault is None)
        self.jobs[request_id] = job = self._job_for(record)
        job.model = model
        self.submits.append(record)
        if fault is not None:
            return self._fault_response(fault, answer=self._submit_answer(request_id))
        return self._submit_answer(request_id)

    def _submit_answer(self, request_id: str) -> _Response:
        base = f"http://{self.host}:{self.port}/v1/requests/{request_id}"
        return _json(
            200,
            {
                "request_id": request_id,
                "status_url": f"{base}/status",
                "result_url": f"{base}/result",
                "cancel_url": f"{base}/cancel",
            },
        )

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
        return _Job(record, run_at, run_at + duration, will_fail=fate < self.config.fail_rate)

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

    def _look(self, request_id: str, *, with_output: bool, kind: str, cost: bool = False) -> _Response:
        self._count(kind)
        fault = self._pick_fault(kind)
        if fault in ("429", "500", "503", "drop"):
            return self._fault_response(fault)
        job = self._find(request_id)
        now = time.time()
        if job is None or now < job.record.accepted_at + self.config.unknown_window:
            return _error(404, 404001, "Request not found or expired")
        state = self._state(job, now)
        payload: dict[str, Any] = {"request_id": request_id, "status": state}
        if state == "in_queue":
            payload["queue_position"] = sum(1 for j in self.jobs.values() if self._state(j, now) == "in_queue")
        if with_output:
            payload.update(output=None, error=None, created_at=job.record.accepted_at, finished_at=None)
            if state == "completed":
                payload["output"] = self._outputs(request_id, now)
                payload["finished_at"] = job.done_at
                if cost:
                    payload["cost"] = self._price(job) * self.config.images_per_job
            elif state == "failed":
                payload["error"] = {"message": "sandbox: the model failed on this input", "code": "generation_failed"}
        response = _json(200, payload)
        if fault is not None:
            return self._fault_response(fault, answer=response)
        return response

    def _price(self, job: _Job) -> float:
        """What the real service would charge, from the bundled price table (0 when unknown)."""
        table = load_price_table(job.model) if job.model else None
        price = table.price(job.record.body) if table else None
        return price or 0.0

    def _outputs(self, request_id: str, now: float) -> dict[str, Any]:
        expiry = f"?expires={now + self.config.url_ttl:.3f}" if self.config.url_ttl is not None else ""
        urls = [
            f"http://{self.host}:{self.port}/files/{request_id}/{index}.png{expiry}"
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
            return _error(404, 404001, "Request not found or expired")
        state = self._state(job, time.time())
        if state == "in_queue":
            job.cancelled = True
            return _json(200, {"request_id": request_id, "status": "cancelled", "outcome": "cancelled"})
        return _json(200, {"request_id": request_id, "status": state, "outcome": "not_cancellable"})

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
                body = b""
                while True:
                    event = await _next_event(connection, stream)
                    if isinstance(event, h11.Data):
                        body += bytes(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                headers = {k.decode().lower(): v.decode() for k, v in request.headers}
                response = self.handle(request.method.decode(), request.target.decode(), headers, body)
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
