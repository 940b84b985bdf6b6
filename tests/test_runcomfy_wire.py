"""The sandbox as RunComfy's own Python client reads it (issue 23, point 7).

RunComfy's MCP server's client (runcomfy-com/runcomfy-mcp, ``runcomfy_client.py``) cannot be committed here,
so `McpLike` below makes the same calls with the same headers and reads the answers the same way, written
from reading that file (each part cites the function it follows). It was also run unmodified by hand against
``batcher sandbox`` (see the fidelity report): a whole flow, a cancel, the error paths.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import pytest

from batcher import SandboxThread
from batcher.sandbox.dialects import DIALECTS

MODEL = "openai/gpt-image-1-5/image-to-image"
BODY = {"prompt": "a lighthouse at dusk", "image_urls": ["https://example.org/ref.jpg"]}
StartSandbox = Callable[..., SandboxThread]

MODEL_API_DIALECTS = [d for d in DIALECTS if d != "serverless"]
"""Every dialect that words the Model API (``serverless`` says Serverless words on purpose)."""


class McpError(Exception):
    """runcomfy_client.py ``RunComfyAPIError``: its ``__str__`` joins "HTTP <status>", the RunComfy code when
    there is one, and the message."""

    def __init__(self, message: str, status: int, code: Any = None, detail: Any = None) -> None:
        super().__init__(message)
        self.message, self.status, self.code, self.detail = message, status, code, detail

    def __str__(self) -> str:
        parts = [f"HTTP {self.status}"]
        if self.code is not None:
            parts.append(f"RunComfy error_code={self.code}")
        parts.append(self.message)
        return " | ".join(parts)


class McpLike:
    """The calls of runcomfy_client.py's ``BaseRunComfyClient`` / ``RunComfyModelAPIClient`` (its newest
    snapshot): the same headers on every call, redirects followed, answers read by ``_request``."""

    def __init__(self, base_url: str, token: str) -> None:
        # BaseRunComfyClient.__init__: these headers on the authenticated client, follow_redirects=True.
        self.client = httpx2.Client(
            base_url=base_url.rstrip("/"),
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "User-Agent": "runcomfy-mcp/1.0",
                "X-RunComfy-Client": "mcp",
            },
            timeout=20,
            follow_redirects=True,
        )
        # The public client (download_public_url_bytes): no token, redirects followed.
        self.public = httpx2.Client(timeout=20, follow_redirects=True)

    def close(self) -> None:
        self.client.close()
        self.public.close()

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """BaseRunComfyClient._request: JSON when it parses (else the text); an error status raises with the
        message from error_message, message, error, a string detail, or else the HTTP reason phrase (a body
        that is no object: its text, or else the reason phrase); a 200 with a top-level error_code raises too."""
        headers = {"Content-Type": "application/json"} if body is not None else None
        response = self.client.request(method, path, json=body, headers=headers)
        try:
            payload: Any = response.json()
        except ValueError:
            payload = response.text
        if response.is_error:
            if isinstance(payload, dict):
                detail = payload.get("detail")
                message = (
                    payload.get("error_message")
                    or payload.get("message")
                    or payload.get("error")
                    or (detail if isinstance(detail, str) else None)
                    or response.reason_phrase
                )
                raise McpError(message, response.status_code, payload.get("error_code"), detail)
            raise McpError(response.text or response.reason_phrase, response.status_code)
        if isinstance(payload, dict) and payload.get("error_code") is not None:
            raise McpError(
                payload.get("error_message") or "RunComfy API error",
                response.status_code,
                payload.get("error_code"),
                payload.get("detail"),
            )
        return payload

    # RunComfyModelAPIClient: the four calls.
    def submit(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", f"/v1/models/{model}", body or {})  # type: ignore[no-any-return]

    def status(self, request_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/requests/{request_id}/status")  # type: ignore[no-any-return]

    def result(self, request_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/requests/{request_id}/result")  # type: ignore[no-any-return]

    def cancel(self, request_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/requests/{request_id}/cancel")  # type: ignore[no-any-return]

    def wait_for_completion(self, request_id: str, *, poll: float = 0.05, timeout: float = 5.0) -> dict[str, Any]:
        """RunComfyModelAPIClient.wait_for_completion: /status until its lower-cased status is completed,
        cancelled or failed, then /result once (its error kept as _safe_fetch does); TimeoutError past it."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            status_payload = self.status(request_id)
            word = str(status_payload.get("status", "")).lower()
            if not seen or seen[-1] != word:
                seen.append(word)  # on_status: called when the status changes
            if word in {"completed", "cancelled", "failed"}:
                try:
                    result: dict[str, Any] | None = self.result(request_id)
                except McpError as exc:
                    result = {"ok": False, "error": str(exc), "status_code": exc.status, "error_code": exc.code}
                return {"status_payload": status_payload, "result_payload": result, "seen": seen}
            if time.monotonic() >= deadline:
                msg = f"Timed out waiting for RunComfy model request {request_id}; saw {seen}"
                raise TimeoutError(msg)
            time.sleep(poll)

    def balance(self) -> dict[str, Any]:
        """RunComfyServerlessClient.get_balance (the stored version of runcomfy_client.py): GET /prod/v2/balance
        on the core API's base, ``https://api.runcomfy.net`` ("one wallet funds Serverless, Model, and Trainer
        work alike, so this lives on the core API")."""
        return self.request("GET", "/prod/v2/balance")  # type: ignore[no-any-return]


def collect_output_urls(result: dict[str, Any] | None) -> list[str]:
    """collect_model_output_urls: URL strings under the url/path/image(s)/video(s)/audio keys of ``output``."""
    keys = {"url", "path", "image", "images", "video", "videos", "audio"}
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, nested in value.items():
                if key in keys and isinstance(nested, str) and nested.startswith(("https://", "http://")):
                    found.append(nested)
                elif key in keys and isinstance(nested, list):
                    found.extend(u for u in nested if isinstance(u, str) and u.startswith(("https://", "http://")))
                else:
                    walk(nested)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk((result or {}).get("output"))
    return found


@pytest.fixture
def mcp() -> Iterator[Callable[..., McpLike]]:
    made: list[McpLike] = []

    def make(base_url: str, token: str = "any-token") -> McpLike:
        made.append(McpLike(base_url, token))
        return made[-1]

    yield make
    for client in made:
        client.close()


# -- a whole flow ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", MODEL_API_DIALECTS)
def test_runcomfys_client_sees_a_whole_flow_finish_in_every_model_api_dialect(
    start_sandbox: StartSandbox, mcp: Callable[..., McpLike], dialect: str
) -> None:
    """Before: --dialect cli answered succeeded, which the client's loop never ends on (it timed out)."""
    sandbox = start_sandbox(dialect=dialect, queue_delay=0.1, run_delay=0.2, images_per_job=2)
    client = mcp(sandbox.url)
    submitted = client.submit(MODEL, BODY)
    done = client.wait_for_completion(submitted["request_id"])
    assert done["seen"][-1] == "completed", done["seen"]
    assert done["result_payload"] is not None and done["result_payload"]["status"] == "completed"
    urls = collect_output_urls(done["result_payload"])
    assert len(urls) == 2
    image = client.public.get(urls[0])  # download_public_url_bytes: no token
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert sandbox.sandbox.credentials_seen_by_file_host == 0


def test_the_serverless_words_are_never_a_finish_for_runcomfys_model_api_client(
    start_sandbox: StartSandbox, mcp: Callable[..., McpLike]
) -> None:
    """succeeded is said only under the dialect named for what it imitates: the Model API's client times out."""
    sandbox = start_sandbox(dialect="serverless", queue_delay=0.05, run_delay=0.05)
    client = mcp(sandbox.url)
    submitted = client.submit(MODEL, BODY)
    with pytest.raises(TimeoutError, match="succeeded"):
        client.wait_for_completion(submitted["request_id"], timeout=0.6)


# -- a cancel ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", MODEL_API_DIALECTS)
def test_runcomfys_clients_read_a_cancel_as_the_model_api_answers_it(
    start_sandbox: StartSandbox, mcp: Callable[..., McpLike], dialect: str
) -> None:
    """The nodes (runcomfy/execution.py) take a cancel as done when status or outcome is 'cancelled'; the CLI
    (src/poll.rs handle_interrupt) knows 'not_cancellable'. Before: --dialect nodes said
    outcome 'cancellation_requested', a Serverless status, and the nodes said the job might be charged."""
    sandbox = start_sandbox(dialect=dialect, queue_delay=30.0)
    client = mcp(sandbox.url)
    request_id = client.submit(MODEL, BODY)["request_id"]
    answer = client.cancel(request_id)
    assert answer["outcome"] == "cancelled" and answer["status"] == "cancelled", answer
    done = client.wait_for_completion(request_id)
    assert done["seen"] == ["cancelled"] and done["result_payload"]["status"] == "cancelled"

    running = start_sandbox(dialect=dialect, queue_delay=0.0, run_delay=30.0)
    busy = mcp(running.url)
    late = busy.cancel(busy.submit(MODEL, BODY)["request_id"])
    assert late["outcome"] == "not_cancellable", late


# -- the error paths ---------------------------------------------------------------------------------------------


def test_runcomfys_client_words_each_refusal_from_runcomfys_body(
    start_sandbox: StartSandbox, mcp: Callable[..., McpLike]
) -> None:
    client = mcp(start_sandbox().url)
    with pytest.raises(McpError) as caught:
        client.submit(MODEL, {"prompt": 1})
    assert (caught.value.status, caught.value.code) == (422, 422001) and caught.value.detail
    with pytest.raises(McpError, match=r"^HTTP 400 \| RunComfy error_code=400001 \| "):
        client.submit("acme/nothing", BODY)
    with pytest.raises(McpError, match=r"^HTTP 404 \| RunComfy error_code=404001 \| "):
        client.status("sbx-0-000000000000x")
    with pytest.raises(McpError, match=r"^HTTP 404 \| RunComfy error_code=404001 \| "):
        client.request("GET", "/v1/nowhere")  # before: an invented 404000
    balance = mcp(start_sandbox(refuse="balance").url)
    with pytest.raises(McpError, match=r"^HTTP 402 \| RunComfy error_code=400002 \| Insufficient balance"):
        balance.submit(MODEL, BODY)
    as_200 = mcp(start_sandbox(refuse="balance", dialect="errors-as-200").url)
    with pytest.raises(McpError, match=r"^HTTP 200 \| RunComfy error_code=400002 \| "):
        as_200.submit(MODEL, BODY)


@pytest.mark.parametrize(
    ("faults", "said"), [("accept_503", "HTTP 503 | Service Unavailable"), ("accept_500001", "HTTP 500 | RunComfy")]
)
def test_a_bodyless_error_is_worded_from_the_reason_phrase(
    start_sandbox: StartSandbox, mcp: Callable[..., McpLike], faults: str, said: str
) -> None:
    """Before: the sandbox sent ``HTTP/1.1 503 `` and the client's message was empty."""
    client = mcp(start_sandbox(fault_rate=1.0, faults=(faults,)).url)
    with pytest.raises(McpError) as caught:
        client.submit(MODEL, BODY)
    assert str(caught.value).startswith(said) and caught.value.message, str(caught.value)


def test_a_429_is_read_by_its_status_and_its_message(start_sandbox: StartSandbox, mcp: Callable[..., McpLike]) -> None:
    client = mcp(start_sandbox(fault_rate=1.0, faults=("429",)).url)
    with pytest.raises(McpError) as caught:
        client.status("sbx-1-000000000000")
    assert caught.value.status == 429 and caught.value.message == "Too many requests"
    raw = client.client.get("/v1/requests/sbx-1-000000000000/status")
    assert (raw.status_code, raw.reason_phrase) == (429, "Too Many Requests")  # before: an empty reason phrase
    assert raw.headers["retry-after"] == "1" and "error_code" not in raw.json()  # no RunComfy source shows one


def test_a_sandbox_token_is_the_only_one_taken(start_sandbox: StartSandbox, mcp: Callable[..., McpLike]) -> None:
    sandbox = start_sandbox(token="right-token")
    with pytest.raises(McpError, match=r"^HTTP 401 \| RunComfy error_code=401001 \| "):
        mcp(sandbox.url, "wrong-token").submit(MODEL, BODY)
    with pytest.raises(McpError, match=r"^HTTP 401 \| RunComfy error_code=401001 \| "):
        mcp(sandbox.balance_base.removesuffix("/prod/v2"), "wrong-token").balance()
    assert sandbox.sandbox.submits == []
    right = mcp(sandbox.url, "right-token")
    assert right.wait_for_completion(right.submit(MODEL, BODY)["request_id"])["seen"][-1] == "completed"


# -- the balance, on its own host ----------------------------------------------------------------------------


def test_the_balance_is_on_the_core_apis_host_not_the_model_apis(
    start_sandbox: StartSandbox, mcp: Callable[..., McpLike]
) -> None:
    sandbox = start_sandbox(balance_usd=1.5)
    core = mcp(sandbox.balance_base.removesuffix("/prod/v2"))  # RunComfyServerlessClient's base
    assert core.balance() == {"balance_usd": 1.5, "currency": "USD"}
    with pytest.raises(McpError, match=r"^HTTP 404 \| RunComfy error_code=404001 \| "):
        mcp(sandbox.url).balance()  # before: the Model API's host answered it
    with pytest.raises(McpError, match=r"^HTTP 404 \| RunComfy error_code=404001 \| "):
        core.submit(MODEL, BODY)  # and the balance's host runs no model
