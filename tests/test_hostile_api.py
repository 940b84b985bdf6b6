"""A hostile API: a raw-socket server on loopback that sends exactly the bytes it chooses.

Bombs, endless bodies, deep nesting, escaped echoes of the token, terminal
escapes, numbers that are not numbers, and redirects: each must end as a
bounded, clean answer or an error of the right kind, never as memory, hangs,
tracebacks or poison in the journal.
"""

from __future__ import annotations

import gzip
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import anyio
import httpx2
import pytest

from batcher import (
    ApiError,
    ApiValidationError,
    AuthError,
    RetryPolicy,
    RunComfyClient,
    TransientApiError,
    UncertainSubmitError,
)
from batcher.printable import printable
from batcher.runcomfy.client import collect_output_urls
from batcher.runcomfy.polling import remote_duration

from .conftest import TOKEN

MODEL = "openai/gpt-image-1-5/image-to-image"
FAST = RetryPolicy(attempts=2, base=0.001, cap=0.002, max_retry_after=0.01)
MiB = 1 << 20
NOW = time.time()

Answer = Callable[[bytes], Iterable[bytes]]
"""Given the raw request, the bytes to send back, in chunks (the connection is closed after)."""


class RawServer:
    """An HTTP/1.1 'server' on loopback: each connection gets one request read and one scripted answer."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.sent = 0
        self.cut_off = False
        """True when the client closed the connection before the whole answer was sent."""
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._socket.getsockname()[1]}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._socket.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                request = _read_request(conn)
                if request is None:
                    continue
                self.requests.append(request)
                try:
                    for chunk in self.answer(request):
                        if self._stop.is_set():
                            break
                        conn.sendall(chunk)
                        self.sent += len(chunk)
                except OSError:
                    self.cut_off = True


def _read_request(conn: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


def http(status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None, *, length: bool = True) -> bytes:
    """One whole answer, exactly as sent."""
    lines = [f"HTTP/1.1 {status} X", "Content-Type: application/json", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def always(*chunks: bytes) -> Answer:
    return lambda request: chunks


@pytest.fixture
def serve() -> Iterator[Callable[[Answer], RawServer]]:
    servers: list[RawServer] = []

    def start(answer: Answer) -> RawServer:
        servers.append(RawServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def client(server: RawServer, **options: object) -> RunComfyClient:
    return RunComfyClient(TOKEN, server.url, retry=FAST, **options)  # type: ignore[arg-type]


def escaped(text: str) -> str:
    """text as JSON \\u escapes, every character: what a server echoing the token may send."""
    return "".join(f"\\u{ord(c):04x}" for c in text)


DONE = b'"status":"completed","output":{"image":"https://cdn.test/a.png"}'

# -- 1. bounded answers --------------------------------------------------------


def _gzip_bomb(megabytes: int) -> bytes:
    return gzip.compress(b'{"status":"completed","pad":"' + b" " * (megabytes * MiB) + b'"}', 9)


async def test_a_gzip_bomb_on_a_poll_is_refused_after_the_cap(serve: Callable[[Answer], RawServer]) -> None:
    bomb = _gzip_bomb(64)
    server = serve(always(http(200, bomb, {"Content-Encoding": "gzip"})))
    async with client(server) as api:
        with pytest.raises(TransientApiError, match="decompressed"):
            await api.result("r-1")
    assert b"\r\naccept-encoding: identity\r\n" in server.requests[0].lower()


async def test_a_small_gzip_answer_is_still_read(serve: Callable[[Answer], RawServer]) -> None:
    # A proxy may compress whatever we ask for: a small answer stays usable.
    server = serve(always(http(200, gzip.compress(b'{"request_id":"r-9"}'), {"Content-Encoding": "gzip"})))
    async with client(server) as api:
        assert (await api.submit(MODEL, {"prompt": "x"})).request_id == "r-9"


async def test_an_unknown_encoding_on_a_submit_is_uncertain(serve: Callable[[Answer], RawServer]) -> None:
    server = serve(always(http(200, b"\x28\xb5\x2f\xfd garbage", {"Content-Encoding": "zstd"})))
    async with client(server) as api:
        with pytest.raises(UncertainSubmitError, match="zstd"):
            await api.submit(MODEL, {"prompt": "x"})
    assert len(server.requests) == 1


def _endless(total: int, start: bytes = b'{"status":"completed","pad":"') -> Iterator[bytes]:
    yield start
    chunk = b" " * MiB
    for _ in range(total // MiB):
        yield chunk
    yield b'"}'


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "close-delimited"])
async def test_a_huge_poll_answer_is_not_read_to_the_end(serve: Callable[[Answer], RawServer], announced: bool) -> None:
    size = 256 * MiB
    head = http(200, headers={"Content-Length": str(size + 31)} if announced else None, length=False)
    server = serve(lambda request: [head, *_endless(size)])
    async with client(server) as api:
        with pytest.raises(TransientApiError, match="over batcher's 1 MiB cap"):
            await api.result("r-1")
    assert server.cut_off and server.sent < 64 * MiB


async def test_a_huge_submit_answer_is_uncertain(serve: Callable[[Answer], RawServer]) -> None:
    server = serve(lambda request: [http(200, length=False), *_endless(8 * MiB, b'{"request_id":"r-1","pad":"')])
    async with client(server) as api:
        with pytest.raises(UncertainSubmitError, match="may have accepted"):
            await api.submit(MODEL, {"prompt": "x"})
    assert len(server.requests) == 1


async def test_the_answer_cap_is_a_client_parameter(serve: Callable[[Answer], RawServer]) -> None:
    body = b'{"request_id":"r-1","status":"in_queue","pad":"' + b"x" * 3000 + b'"}'
    server = serve(always(http(200, body)))
    async with client(server, max_answer_bytes=2000) as api:
        with pytest.raises(TransientApiError, match="cap"):
            await api.result("r-1")
    async with client(server, max_answer_bytes=4000) as api:
        assert (await api.result("r-1")).state == "in_queue"


@pytest.mark.slow
async def test_an_answer_trickled_for_ever_is_cut_off(serve: Callable[[Answer], RawServer]) -> None:
    def trickle(request: bytes) -> Iterator[bytes]:
        yield http(200, length=False) + b'{"status":"in_queue","pad":"'
        while True:
            time.sleep(0.02)
            yield b" "

    server = serve(trickle)
    timeout = httpx2.Timeout(0.3)
    async with client(server, poll_timeout=timeout, submit_timeout=timeout) as api:
        with anyio.fail_after(20):
            with pytest.raises(TransientApiError, match="took longer"):
                await api.result("r-1")
            with pytest.raises(UncertainSubmitError, match="took longer"):
                await api.submit(MODEL, {"prompt": "x"})


@pytest.mark.parametrize("depth", [100, 5000])
async def test_deeply_nested_json_is_not_a_json_object(serve: Callable[[Answer], RawServer], depth: int) -> None:
    nested = b"[" * depth + b"]" * depth
    server = serve(always(http(200, b'{"request_id":"r-1","status":"in_queue","x":' + nested + b"}")))
    async with client(server) as api:
        with pytest.raises(UncertainSubmitError, match="without a request_id"):
            await api.submit(MODEL, {"prompt": "x"})
        with pytest.raises(TransientApiError, match="not a JSON object"):
            await api.result("r-1")


async def test_json_within_the_nesting_limit_is_read(serve: Callable[[Answer], RawServer]) -> None:
    levels = [b'{"status":"in_queue","x":' + b"[" * n + b"]" * n + b"}" for n in (63, 64)]  # 64 and 65 levels
    answers = iter([http(200, levels[0]), http(200, levels[1]), http(200, levels[1])])
    server = serve(lambda request: [next(answers)])
    async with client(server) as api:
        assert (await api.result("r-1")).state == "in_queue"
        with pytest.raises(TransientApiError, match="not a JSON object"):
            await api.result("r-1")


# -- 2. finite numbers, and a bounded view for the journal -----------------------


@pytest.mark.parametrize(
    "cost",
    [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0.5", b"1e6", b'"nan"', b'"1e999"', b"1" + b"0" * 400, b"true"],
)
async def test_a_cost_that_is_not_a_sane_number_becomes_unknown(
    serve: Callable[[Answer], RawServer], caplog: pytest.LogCaptureFixture, cost: bytes
) -> None:
    server = serve(always(http(200, b'{"request_id":"r-1",' + DONE + b',"cost":' + cost + b"}")))
    async with client(server) as api:
        result = await api.result("r-1")
    assert result.state == "completed" and result.cost is None
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    json.dumps(result.for_journal(), allow_nan=False)  # nothing that poisons the journal survives


@pytest.mark.parametrize("cost", [b"0.04", b'"0.04"', b'{"total":0.04,"currency":"USD"}'])
async def test_a_sane_cost_is_kept(serve: Callable[[Answer], RawServer], cost: bytes) -> None:
    server = serve(always(http(200, b"{" + DONE + b',"cost":' + cost + b"}")))
    async with client(server) as api:
        result = await api.result("r-1")
    assert result.cost == pytest.approx(0.04)
    assert result.for_journal()["cost"] == pytest.approx(0.04)


@pytest.mark.parametrize("position", [b"true", b"-3", b"1e30", b"NaN", b"10000000000000"])
async def test_a_queue_position_that_is_not_sane_becomes_unknown(
    serve: Callable[[Answer], RawServer], position: bytes
) -> None:
    server = serve(always(http(200, b'{"status":"in_queue","queue_position":' + position + b"}")))
    async with client(server) as api:
        result = await api.result("r-1")
    assert result.state == "in_queue" and result.queue_position is None


async def test_the_journal_view_is_bounded_and_keeps_what_the_fold_needs(
    serve: Callable[[Answer], RawServer],
) -> None:
    created = int(NOW) - 100
    fields = {f"field{i}": "y" * 50 for i in range(200)}
    body = {
        "request_id": "r-1",
        "status": "completed",
        "created_at": created,
        "finished_at": created + 12,
        "cost": 0.04,
        "output": {"image": "https://cdn.test/a.png"},
        "seed": 7,
        "blob": "x" * 100_000,
        **fields,
    }
    server = serve(always(http(200, json.dumps(body).encode())))
    async with client(server) as api:
        result = await api.result("r-1")
    view = result.for_journal()
    text = json.dumps(view, allow_nan=False)
    assert len(text) < 8192
    assert remote_duration(view) == remote_duration(body) == 12.0
    assert (view["request_id"], view["status"], view["cost"], view["seed"]) == ("r-1", "completed", 0.04, 7)
    assert view["output"] == {"image": "https://cdn.test/a.png"}
    assert "blob" not in view and "blob" in view["batcher_dropped"]["fields"]
    assert view["batcher_dropped"]["count"] > 100


async def test_a_zero_epoch_created_at_teaches_no_duration(serve: Callable[[Answer], RawServer]) -> None:
    server = serve(always(http(200, b"{" + DONE + b',"created_at":0,"finished_at":' + str(int(NOW)).encode() + b"}")))
    async with client(server) as api:
        result = await api.result("r-1")
    assert remote_duration(result.for_journal()) is None


def test_the_journal_view_of_a_hand_made_result_is_json_safe() -> None:
    from batcher.runcomfy.client import RequestResult

    raw = {"status": "completed", "x": [float("nan"), float("inf")], "y": "\ud800", "big": 10**5000}
    result = RequestResult("r", "completed", "completed", [], None, float("nan"), None, raw)
    view = result.for_journal()
    json.dumps(view, allow_nan=False, ensure_ascii=False).encode()
    assert view["x"] == [None, None] and "cost" not in view


# -- 3. the token, JSON-escaped -------------------------------------------------


async def test_a_json_escaped_token_echo_is_masked(serve: Callable[[Answer], RawServer]) -> None:
    token = escaped(TOKEN)
    poll = f'{{"status":"failed","error":"echo: Bearer {token}","{token}":1,"deep":{{"a":["{token}"]}}}}'
    refused = f'{{"error_code":401001,"error_message":"bad token {token}"}}'
    invalid = f'{{"error_code":422001,"error_message":"Invalid","detail":[{{"msg":"{token}"}}]}}'
    answers = iter([http(200, poll.encode()), http(401, refused.encode()), http(422, invalid.encode())])
    server = serve(lambda request: [next(answers)])
    async with client(server) as api:
        result = await api.result("r-1")
        with pytest.raises(AuthError) as auth:
            await api.submit(MODEL, {"prompt": "x"})
        with pytest.raises(ApiValidationError) as validation:
            await api.submit(MODEL, {"prompt": "x"})
    assert result.error is not None and "[token]" in result.error
    for text in (result.error, json.dumps(result.raw), json.dumps(result.for_journal()), str(auth.value)):
        assert TOKEN not in text
    assert TOKEN not in str(validation.value) and TOKEN not in json.dumps(validation.value.detail)


# -- 4. terminal escapes --------------------------------------------------------

CLEAR = "\\u001b[2J\\u001b[H"
LINK = "\\u001b]8;;https://evil.example/\\u0007click me\\u001b]8;;\\u0007"
TITLE = "\\u001b]0;pwned\\u0007"
C1 = "\\u009b31m"


def _unsafe(text: str) -> bool:
    return any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in text)


async def test_terminal_escapes_from_the_server_never_reach_errors_or_states(
    serve: Callable[[Answer], RawServer],
) -> None:
    failed = f'{{"status":"failed","error":"{CLEAR}{LINK}{TITLE}{C1}boom\\nnext line"}}'
    weird = f'{{"status":"{TITLE}warming{CLEAR}"}}'
    refused = f'{{"error_code":401001,"error_message":"{CLEAR}{LINK}{TITLE}"}}'
    gateway = f'{{"error_code":500001,"error_message":"{C1}{TITLE}trouble"}}'
    answers = iter([http(200, failed.encode()), http(200, weird.encode()), http(401, refused.encode())])
    answers = iter([*answers, http(500, gateway.encode()), http(500, gateway.encode())])
    server = serve(lambda request: [next(answers)])
    async with client(server) as api:
        failure = await api.result("r-1")
        unknown = await api.result("r-1")
        with pytest.raises(AuthError) as auth:
            await api.submit(MODEL, {"prompt": "x"})
        with pytest.raises(TransientApiError) as trouble:
            await api.result("r-1")
    assert failure.state == "failed" and failure.error is not None and "click me" in failure.error
    assert unknown.state == "unknown" and unknown.raw_status == "warming"
    for text in (failure.error, unknown.raw_status, str(auth.value), str(trouble.value)):
        assert not _unsafe(text), repr(text)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("\x1b[2J\x1b[Hplain", "plain"),
        ("\x1b]8;;https://evil.example/\x07click\x1b]8;;\x1b\\", "click"),
        ("\x1b]0;title\x07after", "after"),
        ("\x9b31mred\x9d0;title\x9c", "red"),
        ("a\rb\x00c\x7fd\x08e", "abcde"),
        ("line one\nline two\ttab", "line one line two tab"),
        ("\u202eevil\u2066", "evil"),
        ("lone \ud800 surrogate", "lone \ufffd surrogate"),
        ("\x1b]unterminated osc swallows the rest", ""),
    ],
)
def test_printable_removes_what_a_terminal_would_obey(text: str, shown: str) -> None:
    assert printable(text) == shown


def test_printable_caps_length() -> None:
    assert printable("x" * 10_000, 100) == "x" * 99 + "…"
    assert printable({"a": 1}) == "{'a': 1}"


# -- 6. output collection -------------------------------------------------------


def test_output_collection_is_linear_and_capped(caplog: pytest.LogCaptureFixture) -> None:
    urls = [f"https://cdn.test/{i}.png" for i in range(20_000)]
    output = {"images": urls + urls, "image": "https://cdn.test/" + "x" * 5000, "video": "https://cdn.test/v.mp4"}
    started = time.perf_counter()
    found = collect_output_urls(output)
    assert time.perf_counter() - started < 5.0  # generous for a loaded machine: a quadratic walk takes minutes
    assert found == urls[:1000]  # known fields first: `video` comes after the cap
    assert any("output" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_a_result_naming_many_outputs_is_read_quickly(serve: Callable[[Answer], RawServer]) -> None:
    urls = [f"https://cdn.test/{i}.png" for i in range(30_000)]
    body = json.dumps({"status": "completed", "output": {"images": urls}}).encode()
    server = serve(always(http(200, body)))
    async with client(server, max_answer_bytes=16 * MiB) as api:
        started = time.perf_counter()
        result = await api.result("r-1")
    assert time.perf_counter() - started < 15.0  # generous for a loaded machine: a quadratic walk takes minutes
    assert result.outputs == urls[:1000]
    assert len(json.dumps(result.for_journal())) < 8192


# -- 7. redirects ---------------------------------------------------------------


@pytest.mark.parametrize("call", ["result", "cancel"])
@pytest.mark.parametrize("body", [b"", b'{"error_code":500001,"error_message":"moved"}'], ids=["bare", "with-body"])
async def test_a_redirect_on_an_api_call_is_a_clear_final_error(
    serve: Callable[[Answer], RawServer], call: str, body: bytes
) -> None:
    server = serve(always(http(302, body, {"Location": "https://evil.example/v1/requests/r-1/result"})))
    async with client(server) as api:
        with pytest.raises(ApiError, match=r"redirect.*evil\.example.*--api-base") as caught:
            await getattr(api, call)("r-1")
    assert not isinstance(caught.value, TransientApiError) and caught.value.status_code == 302
    assert len(server.requests) == 1


async def test_a_redirect_with_a_huge_body_is_still_a_redirect(serve: Callable[[Answer], RawServer]) -> None:
    head = http(307, headers={"Location": "https://evil.example/"}, length=False)
    server = serve(lambda request: [head, *_endless(16 * MiB)])
    async with client(server) as api:
        with pytest.raises(ApiError, match=r"redirect.*evil\.example") as caught:
            await api.result("r-1")
    assert not isinstance(caught.value, TransientApiError) and len(server.requests) == 1


async def test_a_redirect_to_an_escape_sequence_is_shown_safely(serve: Callable[[Answer], RawServer]) -> None:
    server = serve(always(http(301, headers={"Location": "https://evil\x9b2J.example/"})))
    async with client(server) as api:
        with pytest.raises(ApiError, match="redirect") as caught:
            await api.result("r-1")
    assert not _unsafe(str(caught.value))
