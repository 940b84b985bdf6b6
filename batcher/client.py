"""RunComfy's Model API: submit, result, status, cancel.

One `RunComfyClient` per run keeps one pooled `httpx.AsyncClient`. GET and
cancel calls are retried with exponential backoff and full jitter on 429,
5xx and connection faults, honouring ``Retry-After``. Submits cost money and
the API has no idempotency key, so a submit is retried only when it certainly
was not accepted (the connection never opened, 429, 503, or a RunComfy error
body refusing it); when its fate is unknown it raises `UncertainSubmitError`
and the caller must not send it again on its own.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
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
    RequestGoneError,
    TransientApiError,
    UncertainSubmitError,
    UsageError,
)
from .netpolicy import scheme_refusal

__all__ = [
    "DEFAULT_API_BASE",
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

DEFAULT_API_BASE = "https://model-api.runcomfy.net"
TOKEN_ENV = "RUNCOMFY_API_TOKEN"
BASE_ENV = "RUNCOMFY_API_BASE"

JobState = Literal["in_queue", "in_progress", "completed", "failed", "cancelled", "unknown"]
TERMINAL_STATES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

_STATE_WORDS: dict[str, JobState] = {
    "in_queue": "in_queue",
    "queued": "in_queue",
    "pending": "in_queue",
    "in_progress": "in_progress",
    "running": "in_progress",
    "processing": "in_progress",
    "completed": "completed",
    "succeeded": "completed",
    "success": "completed",
    "cancelled": "cancelled",
    "canceled": "cancelled",
    "failed": "failed",
    "error": "failed",
}

_OUTPUT_KEYS = ("image", "images", "video", "videos")


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
    """RunComfy's state words, spelled one way; ``unknown`` for anything new."""
    return _STATE_WORDS.get(str(word).strip().lower(), "unknown")


def collect_output_urls(output: object) -> list[str]:
    """Every file URL in a result's ``output``, known fields first, in order, once each.

    Other models use other field names, so any string or list of strings that
    looks like a URL counts too.
    """
    found: list[str] = []

    def add(value: object) -> None:
        if isinstance(value, str) and "://" in value and value not in found:
            found.append(value)
        elif isinstance(value, list):
            for item in value:
                add(item)
        elif isinstance(value, dict):
            add(value.get("url"))

    if isinstance(output, dict):
        for key in _OUTPUT_KEYS:
            add(output.get(key))
        for key, value in output.items():
            if key not in _OUTPUT_KEYS:
                add(value)
    else:
        add(output)
    return found


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


def _json_body(response: httpx.Response, secret: bytes) -> dict[str, Any] | None:
    """The answer as a JSON object, or None. A server that echoes our headers back
    (some gateways do, in error pages) must not put the token into our messages,
    logs or journal, so it is masked here, where every answer comes in."""
    content = response.content
    if secret and secret in content:
        content = content.replace(secret, b"[token]")
    try:
        body = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


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
    if code in (400004, 401001) or status == 401:
        msg = f"RunComfy refused the API token while {doing} ({tag}){said}. Check {TOKEN_ENV}: it may be missing, expired or the account inactive."
        return AuthError(msg, **kwargs)
    if code == 400002 or status == 402:
        msg = f"RunComfy says the balance is insufficient while {doing} ({tag}){said}. Top up the account, then run again: nothing is lost."
        return BalanceError(msg, **kwargs)
    if code == 404001 or status == 404:
        msg = f"RunComfy no longer knows this request ({tag}){said}: it was not found or has expired."
        return RequestGoneError(msg, **kwargs)
    if code == 403001 or status == 403:
        msg = f"this request belongs to another RunComfy account ({tag}){said}. Was {TOKEN_ENV} changed mid-run?"
        return ApiError(msg, **kwargs)
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
    ) -> None:
        if not token:
            msg = f"no API token: set {TOKEN_ENV}"
            raise UsageError(msg)
        refusal = scheme_refusal(base_url)
        if refusal:
            msg = f"bad API base: {refusal}"
            raise UsageError(msg)
        self.base_url = base_url.rstrip("/")
        # Masked in anything the server says back; too short a token would mask innocent text.
        self._secret = token.encode() if len(token) >= 8 else b""
        self.retry = retry or RetryPolicy()
        self.rate_limiter = rate_limiter or RateLimiter()
        # RunComfy's own clients: connect 10 s, read 90 s for submits, 20 s for polls.
        self.submit_timeout = submit_timeout or httpx.Timeout(90.0, connect=10.0)
        self.poll_timeout = poll_timeout or httpx.Timeout(20.0, connect=10.0)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}", "User-Agent": f"batcher/{__version__}"},
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            follow_redirects=False,
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
        raise TransientApiError(
            f"{last} (gave up after {self.retry.attempts} attempts; the job was not accepted and will be submitted on the next run)",
            status_code=last.status_code,
            error_code=last.error_code,
        )

    async def _submit_once(self, path: str, payload: Mapping[str, Any], doing: str) -> Submission:
        await self._pace()
        try:
            response = await self._http.post(path, json=payload, timeout=self.submit_timeout)
            self._note(response)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # The request never left this machine: safe to send again.
            raise _Retry(TransientApiError(f"cannot reach RunComfy while {doing}: {type(exc).__name__}")) from exc
        except httpx.TransportError as exc:
            msg = (
                f"the connection failed after the submit was sent ({type(exc).__name__}); RunComfy may have accepted it"
            )
            raise UncertainSubmitError(msg) from exc
        body = _json_body(response, self._secret)
        code = _error_code(body)
        if response.status_code == 429 or (response.status_code == 503 and code is None):
            # Refused before any work: 429 by definition, 503 by the gateway.
            raise _Retry(_refusal(response, body, doing), _retry_after(response))
        if code is not None:
            error = _refusal(response, body, doing)
            if isinstance(error, TransientApiError):
                # RunComfy's own error body says it failed (500001): its docs say retry.
                raise _Retry(error, _retry_after(response))
            raise error
        if 400 <= response.status_code < 500:
            raise _refusal(response, body, doing)  # a client error: refused before any work
        if response.status_code >= 300:
            msg = f"RunComfy answered HTTP {response.status_code} without its error body while {doing}; it may have accepted the job"
            raise UncertainSubmitError(msg, status_code=response.status_code)
        request_id = body.get("request_id") if body else None
        if not isinstance(request_id, str) or not request_id:
            msg = f"RunComfy answered HTTP {response.status_code} to a submit without a request_id; it may have accepted the job"
            raise UncertainSubmitError(msg, status_code=response.status_code)
        assert body is not None
        return Submission(request_id=request_id, raw=body)

    # -- calls that may be repeated -------------------------------------------

    async def _call(self, method: str, path: str, doing: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        last: ApiError | None = None
        for bound in [*self.retry.delays(), None]:
            retry_after: float | None = None
            await self._pace()
            try:
                response = await self._http.request(method, path, params=params, timeout=self.poll_timeout)
                self._note(response)
            except httpx.TransportError as exc:
                last = TransientApiError(f"connection trouble while {doing}: {type(exc).__name__}")
            else:
                body = _json_body(response, self._secret)
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
            outcome=str(body.get("outcome", "")),
            state=normalize_state(body.get("status", "")),
        )


def _parse_result(request_id: str, body: dict[str, Any]) -> RequestResult:
    raw_status = str(body.get("status", ""))
    state = normalize_state(raw_status)
    error = body.get("error")
    error_text = None if error in (None, "", {}) else error if isinstance(error, str) else json.dumps(error)
    if error_text and state not in ("failed", "cancelled") and state != "completed":
        state = "failed"
    cost = body.get("cost")
    if isinstance(cost, dict):
        cost = cost.get("total") or cost.get("amount") or cost.get("usd")
    try:
        cost_value = float(cost) if cost is not None else None
    except (TypeError, ValueError):
        cost_value = None
    position = body.get("queue_position")
    return RequestResult(
        request_id=str(body.get("request_id") or request_id),
        state=state,
        raw_status=raw_status,
        outputs=collect_output_urls(body.get("output")) if state == "completed" else [],
        error=error_text,
        cost=cost_value,
        queue_position=position if isinstance(position, int) else None,
        raw=body,
    )
