"""The client's decisions, on an in-process transport: what is retried, what is uncertain."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator

import anyio
import httpx2
import pytest

from batcher import (
    ApiError,
    ApiValidationError,
    AuthError,
    BalanceError,
    RequestGoneError,
    RetryPolicy,
    RunComfyClient,
    TransientApiError,
    UncertainSubmitError,
    UsageError,
)
from batcher.errors import RateLimitedError, UnreachableError
from batcher.net.retrying import set_testing
from batcher.runcomfy.client import api_base_from_env, collect_output_urls, normalize_state, token_from_env

from .conftest import TOKEN

MODEL = "openai/gpt-image-1-5/image-to-image"
FAST = RetryPolicy(attempts=4, base=0.001, cap=0.002, max_retry_after=0.01)


@pytest.fixture(autouse=True)
def no_waiting() -> Iterator[None]:
    """Retries and the rate limiter's pauses take no time here (a 429 used to cost this file 4 s of pacing)."""
    set_testing(True)
    yield
    set_testing(False)


def _client(answers: list[Callable[[httpx2.Request], httpx2.Response]], seen: list[httpx2.Request]) -> RunComfyClient:
    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return answers.pop(0)(request)

    return RunComfyClient(TOKEN, "https://api.test", retry=FAST, transport=httpx2.MockTransport(handler))


def ok(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, json={"request_id": "r-1", "status_url": "x"})


def status(code: int, body: object = None, headers: dict[str, str] | None = None) -> Callable[..., httpx2.Response]:
    def answer(request: httpx2.Request) -> httpx2.Response:
        if isinstance(body, dict):
            return httpx2.Response(code, json=body, headers=headers)
        return httpx2.Response(code, content=(body or b"") if isinstance(body, bytes) else b"", headers=headers)

    return answer


def raises(exc: type[Exception]) -> Callable[..., httpx2.Response]:
    def answer(request: httpx2.Request) -> httpx2.Response:
        raise exc("boom", request=request)  # type: ignore[call-arg]

    return answer


@pytest.mark.parametrize(
    ("answer", "kind", "throttled", "retry_after"),
    [
        (status(429, {"error_message": "slow down"}, {"retry-after": "7"}), RateLimitedError, 1, 7.0),
        (status(429, b""), RateLimitedError, 1, None),
        (raises(httpx2.ConnectError), UnreachableError, None, None),
        (raises(httpx2.ConnectTimeout), UnreachableError, None, None),
        (raises(httpx2.PoolTimeout), UnreachableError, None, None),
    ],
    ids=["429", "bare-429", "connect-error", "connect-timeout", "pool-timeout"],
)
async def test_a_submit_certainly_not_accepted_is_sent_once_and_says_so(
    answer: Callable[..., httpx2.Response],
    kind: type[TransientApiError],
    throttled: int | None,
    retry_after: float | None,
) -> None:
    # Sent once: the caller retries, after journalling the refusal (see test_run's
    # test_every_retried_submit_has_its_own_intent_and_refusal_in_the_journal).
    seen: list[httpx2.Request] = []
    async with _client([answer, ok], seen) as client:
        with pytest.raises(kind, match="was not accepted") as caught:
            await client.submit(MODEL, {"prompt": "x"})
    # The runner tells "not now" (wait and again), an outage (pause) and other trouble apart by these kinds.
    assert type(caught.value) is kind
    assert caught.value.retry_after == retry_after
    if throttled is not None:
        assert isinstance(caught.value, RateLimitedError) and caught.value.throttled == throttled
    assert len(seen) == 1
    assert seen[0].url.path == "/v1/models/openai/gpt-image-1-5/image-to-image"
    assert seen[0].headers["authorization"] == f"Bearer {TOKEN}"


async def test_a_429_to_a_submit_does_not_slow_the_other_calls() -> None:
    # It is the account's cap on jobs in flight speaking (AccountCap learns it): halving the pace of
    # every call for it starved the polls that free the cap. A 429 to a poll still slows the pace.
    seen: list[httpx2.Request] = []
    answers = [status(429, {}, {"retry-after": "0"}), status(429, {}, {"retry-after": "0"}), ok_result]
    async with _client(answers, seen) as client:
        with pytest.raises(RateLimitedError):
            await client.submit(MODEL, {"prompt": "x"})
        assert client.rate_limiter.refusals == 0
        await client.result("r-1")
        assert client.rate_limiter.refusals == 1


def ok_result(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, json={"request_id": "r-1", "status": "in_queue"})


@pytest.mark.parametrize(
    "answer",
    [
        raises(httpx2.ReadTimeout),
        raises(httpx2.RemoteProtocolError),
        raises(httpx2.ReadError),
        status(502, b"<html>bad gateway</html>"),
        status(504, b""),
        status(500, b"oops"),
        status(200, {"status": "in_queue"}),
        status(200, b"<html>not json</html>"),
        # Issue 23: read as "not accepted" and sent again before; RunComfy's nodes never retry them.
        status(503, b"<html>unavailable</html>"),
        status(503, b""),
        status(500, {"error_code": 500001, "error_message": "Internal error"}),
        status(503, {"error_code": 400002, "error_message": "a refusing code on a 5xx"}),
        status(200, {"error_code": 500001, "error_message": "Internal error"}),
        status(200, b""),
        status(200, b"[]"),
        status(301, b"", {"location": "https://elsewhere.test/"}),
        # A 4xx with neither a refusing code nor a refusing status: the nodes read it as "could not be confirmed".
        status(404, b""),
        status(400, b"bad request"),
        status(408, b""),
        status(409, {"error_message": "conflict"}),
        status(413, b"too large"),
        status(404, {"error_code": 404001, "error_message": "not found"}),
        raises(httpx2.WriteTimeout),
    ],
    ids=[
        "read-timeout",
        "disconnect",
        "read-error",
        "502",
        "504",
        "bare-500",
        "no-request-id",
        "not-json",
        "503-html",
        "bare-503",
        "500001",
        "5xx-with-a-refusing-code",
        "200-500001",
        "empty-200",
        "list-200",
        "301",
        "bare-404",
        "400-without-code",
        "408",
        "409",
        "413",
        "404001",
        "write-timeout",
    ],
)
async def test_submits_of_unknown_fate_are_never_retried(answer: Callable[..., httpx2.Response]) -> None:
    seen: list[httpx2.Request] = []
    async with _client([answer, ok], seen) as client:
        with pytest.raises(UncertainSubmitError) as caught:
            await client.submit(MODEL, {"prompt": "x"})
    assert len(seen) == 1, "an uncertain submit must not be sent again automatically"
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("answer", "error", "words"),
    [
        (status(401, {"error_code": 401001, "error_message": "Token expired"}), AuthError, "RUNCOMFY_API_TOKEN"),
        (status(400, {"error_code": 400004, "error_message": "Missing token"}), AuthError, "expired"),
        (status(400, {"error_code": 400002, "error_message": "Insufficient balance"}), BalanceError, "Top up"),
        (status(402, b""), BalanceError, "balance"),
        (
            status(422, {"error_code": 422001, "error_message": "Invalid", "detail": [{"loc": "prompt"}]}),
            ApiValidationError,
            "prompt",
        ),
        (status(200, {"error_code": 422001, "error_message": "bad input"}), ApiValidationError, "bad input"),
        (status(404, {"error_code": 400001, "error_message": "Unknown model"}), ApiError, "does not know this model"),
        (status(400, {"error_code": 400001, "error_message": "Unknown model"}), ApiError, "does not know this model"),
        (status(403, b""), AuthError, "RUNCOMFY_API_TOKEN"),
        (status(401, b""), AuthError, "RUNCOMFY_API_TOKEN"),
        (status(403, {"error_code": 403001, "error_message": "Not yours"}), AuthError, "RUNCOMFY_API_TOKEN"),
        (status(422, b""), ApiValidationError, "rejected the input"),
    ],
    ids=[
        "401001",
        "400004",
        "400002",
        "402",
        "422001",
        "200-with-error-code",
        "404-400001",
        "400-400001",
        "bare-403",
        "bare-401",
        "403001",
        "bare-422",
    ],
)
async def test_refusals_become_actionable_errors(
    answer: Callable[..., httpx2.Response], error: type[Exception], words: str
) -> None:
    seen: list[httpx2.Request] = []
    async with _client([answer, ok], seen) as client:
        with pytest.raises(error, match=words) as caught:
            await client.submit(MODEL, {"prompt": "x"})
    assert len(seen) == 1
    assert not isinstance(caught.value, UncertainSubmitError | TransientApiError), "certainly refused, and final"


async def test_each_call_logs_one_line_without_the_token(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[httpx2.Request] = []
    answers: list[Callable[[httpx2.Request], httpx2.Response]] = [
        status(429, {}, {"retry-after": "0"}),
        ok,
        raises(httpx2.ReadTimeout),
        status(200, {"request_id": "r-1", "status": "in_queue"}),
        status(200, {"request_id": "r-1", "status": "cancelled", "outcome": "cancelled"}),
    ]
    caplog.set_level(logging.DEBUG, logger="batcher")
    async with _client(answers, seen) as client:
        with pytest.raises(RateLimitedError):
            await client.submit(MODEL, {"prompt": "x"})
        await client.submit(MODEL, {"prompt": "x"})
        await client.result("r-1")
        await client.cancel("r-1")
    calls = [r.getMessage() for r in caplog.records if r.name == "batcher.runcomfy.client"]
    assert [line.split(":")[0] for line in calls] == [f"submit {MODEL}"] * 2 + ["result r-1"] * 2 + ["cancel r-1"]
    assert "HTTP 429 in" in calls[0] and "HTTP 200, request r-1 in" in calls[1] and "ReadTimeout in" in calls[2]
    assert all(line.endswith(" s") for line in calls)
    assert any("try 2 of 4" in r.getMessage() for r in caplog.records if r.name == "batcher.net.retrying")
    assert TOKEN not in caplog.text


async def test_polls_retry_anything_transient_and_honour_retry_after() -> None:
    seen: list[httpx2.Request] = []
    done = status(200, {"request_id": "r", "status": "succeeded", "output": {"image": "https://cdn.test/a.png"}})
    answers = [
        raises(httpx2.ReadTimeout),
        status(502, b"gateway"),
        status(429, {}, {"retry-after": "0.001"}),
        done,
    ]
    async with _client(answers, seen) as client:
        result = await client.result("r")
    assert result.state == "completed"
    assert result.outputs == ["https://cdn.test/a.png"]
    assert seen[-1].url.params["include_cost"] == "true"
    assert len(seen) == 4


async def test_a_408_on_a_poll_is_retried_and_a_409_is_final_as_runcomfys_cli_reads_them() -> None:
    """src/exit.rs: 408 and 429 are EX_TEMPFAIL (retryable); any other 4xx, 409 among them, EX_DATAERR."""
    seen: list[httpx2.Request] = []
    done = status(200, {"request_id": "r", "status": "completed", "output": {"image": "https://cdn.test/a.png"}})
    async with _client([status(408, b""), done, status(409, {"error_message": "conflict"}), done], seen) as client:
        assert (await client.result("r")).state == "completed"
        with pytest.raises(ApiError, match="HTTP 409") as caught:
            await client.result("r")
    assert not isinstance(caught.value, TransientApiError)
    assert len(seen) == 3


async def test_an_error_text_beside_a_state_is_kept_but_only_failed_fails() -> None:
    """RunComfy's CLI reads `error` only when the status is failed."""
    seen: list[httpx2.Request] = []
    answers = [
        status(200, {"request_id": "r", "status": "in_progress", "error": "retrying on another worker"}),
        status(200, {"request_id": "r", "status": "in_queue", "error": {"message": "degraded"}}),
        status(200, {"request_id": "r", "status": "warming_up", "error": "slow"}),
    ]
    async with _client(answers, seen) as client:
        running, queued, unknown = [await client.result("r") for _ in range(3)]
    assert (running.state, running.error) == ("in_progress", "retrying on another worker")
    assert queued.state == "in_queue" and queued.error is not None and "degraded" in queued.error
    assert unknown.state == "unknown" and unknown.error == "slow"


async def test_result_states_and_errors_are_normalized() -> None:
    seen: list[httpx2.Request] = []
    answers = [
        status(200, {"request_id": "r", "status": "in_queue", "queue_position": 3}),
        status(200, {"request_id": "r", "status": "failed", "error": {"message": "nsfw"}}),
        status(200, {"request_id": "r", "status": "warming_up", "extra": 1}),
        status(404, {"error_code": 404001, "error_message": "Request not found"}),
    ]
    async with _client(answers, seen) as client:
        queued = await client.result("r")
        failed = await client.result("r")
        unknown = await client.result("r")
        with pytest.raises(RequestGoneError):
            await client.result("r")
    assert (queued.state, queued.queue_position) == ("in_queue", 3)
    assert failed.state == "failed" and failed.error is not None and "nsfw" in failed.error
    assert unknown.state == "unknown" and unknown.raw["extra"] == 1


async def test_cancel_reports_the_outcome() -> None:
    seen: list[httpx2.Request] = []
    answers = [status(200, {"request_id": "r", "status": "in_progress", "outcome": "not_cancellable"})]
    async with _client(answers, seen) as client:
        outcome = await client.cancel("r-1")
        # An id that could steer the URL (or one 100,000 characters long) is never sent.
        for bad in ("r/../x", "r" * 100_000, "r\x1b[2J"):
            with pytest.raises(ApiError, match="malformed"):
                await client.cancel(bad)
    assert outcome.outcome == "not_cancellable" and outcome.state == "in_progress"
    assert len(seen) == 1 and seen[0].url.raw_path == b"/v1/requests/r-1/cancel"
    assert seen[0].method == "POST"


def test_output_urls_are_collected_generically() -> None:
    output = {
        "images": ["https://a/1.png", "https://a/2.png"],
        "image": "https://a/0.png",
        "video": None,
        "thumbnails": [{"url": "https://a/t.png"}],
        "seed": 42,
    }
    assert collect_output_urls(output) == ["https://a/0.png", "https://a/1.png", "https://a/2.png", "https://a/t.png"]
    assert collect_output_urls(None) == []


def test_state_words() -> None:
    assert [normalize_state(w) for w in ("succeeded", "canceled", "IN_PROGRESS", "what")] == [
        "completed",
        "cancelled",
        "in_progress",
        "unknown",
    ]


def test_token_and_base_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="RUNCOMFY_API_TOKEN"):
        token_from_env()
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "  t  ")
    assert token_from_env() == "t"
    assert api_base_from_env(None) == "https://model-api.runcomfy.net"
    monkeypatch.setenv("RUNCOMFY_API_BASE", "http://127.0.0.1:9/")
    assert api_base_from_env(None) == "http://127.0.0.1:9"
    with pytest.raises(UsageError, match="only for loopback"):
        api_base_from_env("http://api.example.com")
    with pytest.raises(UsageError, match="only https"):
        RunComfyClient(TOKEN, "ftp://x")


async def test_a_server_echoing_the_token_never_gets_it_into_messages() -> None:
    seen: list[httpx2.Request] = []
    echo = f"bad request, headers were: Authorization: Bearer {TOKEN}"
    answers = [
        status(401, {"error_code": 401001, "error_message": echo}),
        status(200, {"request_id": "r", "status": "weird", "note": echo}),
    ]
    async with _client(answers, seen) as client:
        with pytest.raises(AuthError) as caught:
            await client.submit(MODEL, {"prompt": "x"})
        result = await client.result("r")
    assert TOKEN not in str(caught.value) and "[token]" in str(caught.value)
    assert TOKEN not in json.dumps(result.raw)


@pytest.mark.parametrize(
    ("verbosity", "shown"),
    [(False, []), (0, []), (True, ["batcher"]), (1, ["batcher"]), (2, ["batcher", "httpx2", "httpcore2"])],
)
def test_verbosity_chooses_whose_lines_are_shown(verbosity: int, shown: list[str]) -> None:
    from batcher.cli.common import setup_logging

    setup_logging(verbosity, False)  # a bool: `-v` as a flag; an int: `-v` counted
    try:
        loggers = {"batcher": "batcher.runcomfy.client", "httpx2": "httpx2", "httpcore2": "httpcore2.http11"}
        assert [
            name for name, logger in loggers.items() if logging.getLogger(logger).isEnabledFor(logging.DEBUG)
        ] == shown
    finally:
        setup_logging(0, False)


async def test_the_rate_limiter_halves_on_429_and_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    from batcher.runcomfy.client import RateLimiter

    clock = [100.0]
    monkeypatch.setattr("batcher.runcomfy.pacing.time.monotonic", lambda: clock[0])
    limiter = RateLimiter(10.0)
    limiter.refused()
    assert limiter.rate == 5.0
    limiter.refused()  # the same burst: counted once
    assert limiter.rate == 5.0 and limiter.refusals == 2
    clock[0] += 3
    limiter._recover(clock[0])
    assert limiter.rate == 5.0  # idle: nothing held back, so no reason to speed up
    limiter._held_back = True
    clock[0] += 3
    limiter._recover(clock[0])
    assert limiter.rate == pytest.approx(5.0 * 1.05**3)
    limiter._held_back = True
    clock[0] += 60
    limiter._recover(clock[0])
    assert limiter.rate == 10.0  # never past the ceiling

    # A 429 just after a recovery tick is a new signal (it once shared the tick's clock and was lost).
    limiter.refused()
    assert limiter.rate == 5.0
    limiter._held_back = True
    clock[0] += 1
    limiter._recover(clock[0])
    clock[0] += 0.1
    limiter.refused()
    assert limiter.rate == pytest.approx(5.0 * 1.05 / 2)

    unlimited = RateLimiter()
    for _ in range(30):
        await unlimited.wait()  # 30 calls in this "second"
    unlimited.refused()
    assert unlimited.rate == 15.0
    for _ in range(3):
        unlimited._held_back = True
        clock[0] += 10
        unlimited._recover(clock[0])
    assert unlimited.rate is None  # back past twice the refused pace: the limit is lifted


async def test_headers_are_the_ones_runcomfys_own_clients_send() -> None:
    seen: list[httpx2.Request] = []
    async with _client([ok], seen) as client:
        await client.submit("openai/gpt-image-1-5/image-to-image", {"prompt": "x"})
    headers = seen[0].headers
    assert headers["accept"] == "application/json" and headers["cache-control"] == "no-cache"
    assert headers["user-agent"].startswith("batcher/") and headers["authorization"] == f"Bearer {TOKEN}"


async def test_a_redirect_from_the_api_never_carries_the_token_elsewhere() -> None:
    import http.server
    import threading

    hits: list[dict[str, str]] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(dict(self.headers))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Elsewhere)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        other = f"http://127.0.0.1:{server.server_address[1]}/v1/requests/r-1/result"
        seen: list[httpx2.Request] = []
        async with _client([status(302, b"", {"location": other})], seen) as client:
            with pytest.raises(ApiError, match="redirect"):
                await client.result("r-1")
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == 1 and hits == []


def _counting_server() -> tuple[int, list[int], Callable[[], None]]:
    """A keep-alive HTTP/1.1 server on loopback that counts the connections it accepts (one thread each)."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []

    def one(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok")

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], accepted, listener.close


async def test_the_pool_queues_reuses_and_makes_room_for_another_origin() -> None:
    """`batcher.net.transport` is httpx2's public transport with every connection kept alive. With room for 2
    connections: 12 requests at once all complete (the queued ones wait for a free connection), the server sees
    2 connections, later requests reuse them, and a request to another origin while both are idle closes one to
    make room at once, rather than waiting. Counted at the servers: no private attribute is read."""
    from batcher.net.transport import pooled_transport

    port, accepted, close = _counting_server()
    other_port, other_accepted, close_other = _counting_server()
    try:
        async with httpx2.AsyncClient(transport=pooled_transport(2)) as client:

            async def one(url: str) -> None:
                response = await client.get(url)
                assert response.status_code == 200 and response.text == "ok"

            async with anyio.create_task_group() as group:
                for _ in range(12):
                    group.start_soon(one, f"http://127.0.0.1:{port}/")
            assert len(accepted) == 2
            for _ in range(3):
                await one(f"http://127.0.0.1:{port}/")
            assert len(accepted) == 2  # kept alive and reused
            with anyio.fail_after(
                2.5
            ):  # seconds: a loopback request under load; waiting for an idle one to expire takes 5
                await one(f"http://127.0.0.1:{other_port}/")
            assert len(other_accepted) == 1
    finally:
        close()
        close_other()


async def test_a_connection_its_server_closed_while_idle_is_never_reused() -> None:
    """The pool asks idle connections whether their server closed them (`batcher.net.transport._Stream`'s cheap
    check): a server that answers once and closes must cost a new connection, not a failed request (for a
    submit, an uncertain one)."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok")
                # Keep-alive as far as the client knows; closed a moment later, as an idle timeout closes it.

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    from batcher.net.transport import pooled_transport

    try:
        async with httpx2.AsyncClient(transport=pooled_transport(4)) as client:
            for _ in range(4):
                assert (await client.get(f"http://127.0.0.1:{port}/")).text == "ok"
                await anyio.sleep(0.05)  # the server's close reaches this side
    finally:
        listener.close()
    assert len(accepted) == 4
