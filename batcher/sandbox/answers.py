"""How does the sandbox say no, in RunComfy's words? Error bodies, a 429, a failed job's error, and the answers
a fault puts in place of the real one (each with the RunComfy source it follows)."""

from __future__ import annotations

from typing import Any

from .faults import ACCEPTED_ANSWERS
from .wire import Response, json_response

__all__ = ["BLOCKED", "MODEL_FAILED", "NOT_FOUND", "error_response", "fault_response", "too_many"]

MODEL_FAILED = ("sandbox: the model failed on this input", "generation_failed")
BLOCKED = (
    "Your request was rejected by the safety system. It may contain content that is not allowed.",
    "moderation_blocked",
)
"""A failed job's error: the model's own failure, or a content-policy block worded as gpt-image words it."""


def error_response(status: int, code: int, message: str, detail: Any = None) -> Response:
    """RunComfy's error body: ``{error_code, error_message, detail?}`` (docs.runcomfy.com model-apis/error-codes;
    read so by its MCP client, runcomfy-mcp runcomfy_client.py ``_request``)."""
    payload: dict[str, Any] = {"error_code": code, "error_message": message}
    if detail is not None:
        payload["detail"] = detail
    return json_response(status, payload)


NOT_FOUND = (404001, "Resource not found")
"""RunComfy's 404 (docs.runcomfy.com model-apis/error-codes: 404001 ResourceNotFound), for a path it does not
serve too: the API's host has no balance (that is `api.runcomfy.net`'s, runcomfy-cli src/api.rs)."""


def too_many(message: str, retry_after: str) -> Response:
    """A 429 as RunComfy's clients read one: by its status (runcomfy-cli src/api.rs ``api_error``: "rate limited;
    retry in a moment", src/exit.rs: retryable), the message from ``error_message`` (runcomfy-mcp
    runcomfy_client.py ``_request``). No source, doc or client shows an ``error_code`` for it, so none is made up;
    with Retry-After (which no RunComfy source documents either: batcher's backoff caps it)."""
    return json_response(429, {"error_message": message}, [("retry-after", retry_after)])


def fault_response(fault: str, answer: Response | None = None, *, retry_after: float) -> Response:
    """The answer a fault sends in place of (or made of) the real answer."""
    if fault == "429":
        return too_many("Too many requests", f"{retry_after:g}")
    if fault == "500":
        return error_response(500, 500001, "Internal server error, please retry")
    if fault in ("502", "503"):
        status = int(fault)
        return Response(status, b"<html><body>Bad gateway</body></html>", [("content-type", "text/html")])
    if fault == "drop":
        return Response(0, b"", fault="drop")
    if answer is None:
        return Response(0, b"", fault="drop")
    if fault == "drop_after_accept":
        return Response(0, b"", fault="drop")
    if fault in ACCEPTED_ANSWERS:
        status, body = ACCEPTED_ANSWERS[fault]
        return Response(status, body, [("content-type", "application/json")] if body else [])
    answer.fault = fault  # slow or truncate: applied while sending
    return answer
