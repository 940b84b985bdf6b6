"""How is each call to RunComfy's Model API made, and what does its outcome mean?

One `RunComfyClient` per run keeps one pooled `httpx2.AsyncClient`. Result
and cancel calls are retried with exponential backoff and full jitter on
429, 5xx and connection faults, honouring ``Retry-After`` (`batcher.net.retrying`).
Submits cost money and the API has no idempotency key, so `submit` sends
once and says what became of it, as RunComfy's own clients read it
(docs/submit-answers.md): accepted (a usable request_id), certainly refused
(a RunComfy code or status that means refused, a 429, or a connection that
never reached the server), or of unknown fate: everything else, any 5xx
included (`UncertainSubmitError`: the caller must not send it again on its
own). Its caller retries what is worth it, so that the journal says "not
accepted" before each wait (`batcher.engine.steps`). A redirect from the API is an error, never followed: it
would carry the token elsewhere.

Answers are read as untrusted bytes by `batcher.runcomfy.answers` (bounded, the token
masked) and kept as `batcher.runcomfy.results` views; the public names of those and of
`batcher.runcomfy.pacing` and `batcher.net.retrying` that callers use are importable from
here too. Each call logs one INFO line on the ``batcher.runcomfy.client`` logger (which
call, for which model or request id, the HTTP status or fault, the time taken):
``batcher run -v`` shows them. Never the token.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from functools import partial
from typing import Any
from urllib.parse import quote

import anyio
import httpx2

from .._version import __version__
from ..errors import (
    ApiError,
    RateLimitedError,
    TransientApiError,
    UncertainSubmitError,
    UnreachableError,
    UsageError,
)
from ..lifecycle import JobState
from ..net.policy import scheme_refusal
from ..net.redirects import hold_location
from ..net.retrying import RetryPolicy, TryAgain, parse_retry_after, retrying
from ..net.transport import pooled_transport
from ..printable import printable
from .answers import (
    DEFAULT_MAX_ANSWER_BYTES,
    MAX_JSON_DEPTH,
    TEXT_LIMIT,
    WORD_LIMIT,
    Unreadable,
    call_deadline,
    json_body,
    read_answer,
)
from .pacing import RateLimiter
from .refusals import REQUEST_ID, TOKEN_ENV, checked_request_id, error_code, redirect_error, refusal, refuses_submit
from .results import (
    MAX_COST_USD,
    MAX_OUTPUTS,
    MAX_URL_CHARS,
    CancelOutcome,
    RequestResult,
    Submission,
    collect_output_urls,
    queue_position,
    sane_cost,
)

__all__ = [
    "DEFAULT_API_BASE",
    "DEFAULT_MAX_ANSWER_BYTES",
    "MAX_COST_USD",
    "MAX_JSON_DEPTH",
    "MAX_OUTPUTS",
    "MAX_URL_CHARS",
    "CancelOutcome",
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
BASE_ENV = "RUNCOMFY_API_BASE"

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
    problem = scheme_refusal(base)
    if problem:
        msg = f"bad API base: {problem}"
        raise UsageError(msg)
    return base


def normalize_state(word: object) -> JobState:
    """RunComfy's state words, spelled one way; ``unknown`` for anything new (still polled).

    Case and surrounding space are ignored, as RunComfy's CLI and MCP server lower-case the word.
    """
    return _STATE_WORDS.get(str(word).strip().lower(), "unknown")


class _Retry(Exception):
    """Internal: this attempt failed in a way worth another try; ``error`` is raised once the tries run out."""

    def __init__(self, error: ApiError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def _retry_on(exc: Exception) -> TryAgain | None:
    """The client's retry predicate: each attempt decides itself what is worth another try, and raises `_Retry`."""
    return TryAgain(exc.retry_after) if isinstance(exc, _Retry) else None


def _retry_after(response: httpx2.Response) -> float | None:
    return parse_retry_after(response.headers.get("retry-after"))


def _log_call(call: str, started: float, outcome: str) -> None:
    log.info("%s: %s in %.3f s", call, outcome, time.monotonic() - started)


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
        transport: httpx2.AsyncBaseTransport | None = None,
        submit_timeout: httpx2.Timeout | None = None,
        poll_timeout: httpx2.Timeout | None = None,
        max_connections: int = 100,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        token_env: str = TOKEN_ENV,
    ) -> None:
        if not token:
            msg = f"no API token: set {TOKEN_ENV}"
            raise UsageError(msg)
        problem = scheme_refusal(base_url)
        if problem:
            msg = f"bad API base: {problem}"
            raise UsageError(msg)
        if max_answer_bytes < 1:
            msg = f"the cap on API answers must be at least 1 byte, not {max_answer_bytes}"
            raise UsageError(msg)
        self.base_url = base_url.rstrip("/")
        # A call's path joined to the base here, as one absolute URL: httpx2 parses it once, where joining
        # a path (or params) to its base_url parses it two or three times (~60 us a call, a third of a poll).
        self._prefix = self.base_url if "?" not in self.base_url and "#" not in self.base_url else None
        # The API base's scheme, host and port, parsed once: `own_url` compares every answer's URL to it.
        try:
            base = httpx2.URL(self.base_url)
            self._origin: tuple[str, str, int | None] | None = (base.scheme, base.host, base.port)
        except (httpx2.InvalidURL, ValueError):
            self._origin = None  # then no URL from an answer is ever taken as the API's own
        # Masked in anything the server says back; too short a token would mask innocent text.
        self._secret = token if len(token) >= 8 else ""
        self.max_answer_bytes = max_answer_bytes
        self.token_env = token_env
        """Where the token came from (an environment variable's name): what a refusal tells the user to check."""
        self.retry = retry or RetryPolicy()
        self.rate_limiter = rate_limiter or RateLimiter()
        # RunComfy's own clients: connect 10 s, read 90 s for submits, 20 s for polls.
        self.submit_timeout = submit_timeout or httpx2.Timeout(90.0, connect=10.0)
        self.poll_timeout = poll_timeout or httpx2.Timeout(20.0, connect=10.0)
        self._http = httpx2.AsyncClient(
            base_url=self.base_url,
            # As RunComfy's own clients send them (its CLI and ComfyUI nodes): JSON, named, never a cached
            # /result. identity: a compressed answer could expand far past the cap before anyone looks at it.
            headers={
                "Authorization": f"Bearer {token}",
                "User-Agent": f"batcher/{__version__}",
                "Accept": "application/json",
                "Cache-Control": "no-cache",
                "Accept-Encoding": "identity",
            },
            transport=transport or pooled_transport(max_connections),
            follow_redirects=False,
            event_hooks={"response": [hold_location]},
        )

    async def __aenter__(self) -> RunComfyClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _pace(self) -> None:
        await self.rate_limiter.wait()

    def _note(self, response: httpx2.Response) -> None:
        if response.status_code == 429:
            self.rate_limiter.refused()

    async def _exchange(
        self,
        call: str,
        method: str,
        path: str,
        limits: httpx2.Timeout,
        *,
        read_redirects: bool = True,
        paces: bool = True,
        logs_answer: bool = True,
        **options: Any,
    ) -> tuple[httpx2.Response, bytes]:
        """Send one request and read its answer: at most max_answer_bytes, within the call's deadline.

        Raises what httpx2 raises (the caller knows what each fault means for
        its call), and Unreadable once an answer came that batcher will not
        read whole: too large, oddly encoded, or trickled past the deadline.
        Without ``read_redirects`` a 3xx answer comes back with an empty body,
        unread. call names the call in the log line each exchange writes.
        Without ``paces`` a 429 is not told to the rate limiter (see `submit`). Without ``logs_answer`` the
        line for an answer read is the caller's to write (`submit` names the request id in it).
        """
        started = time.monotonic()
        try:
            response, content = await self._read(
                method, path, limits, read_redirects=read_redirects, paces=paces, **options
            )
        except Unreadable as exc:
            status = f"HTTP {exc.status_code}, " if exc.status_code is not None else ""
            _log_call(call, started, f"{status}answer not read: it {exc}")
            raise
        except httpx2.HTTPError as exc:
            _log_call(call, started, type(exc).__name__)
            raise
        if logs_answer:
            _log_call(call, started, f"HTTP {response.status_code}")
        return response, content

    async def _read(
        self, method: str, path: str, limits: httpx2.Timeout, *, read_redirects: bool, paces: bool, **options: Any
    ) -> tuple[httpx2.Response, bytes]:
        deadline = call_deadline(limits)
        if self._prefix is not None and path.startswith("/"):
            path = self._prefix + path
        with anyio.move_on_after(deadline):
            async with self._http.stream(method, path, timeout=limits, **options) as response:
                if paces:
                    self._note(response)
                if not read_redirects and 300 <= response.status_code < 400:
                    return response, b""
                content = await read_answer(response, self.max_answer_bytes)
            return response, content
        msg = f"took longer than {deadline:g} s in all (its time limits together)"
        raise Unreadable(msg)

    # -- submit -------------------------------------------------------------

    async def submit(self, model_id: str, payload: Mapping[str, Any], *, job: str | None = None) -> Submission:
        """Send one job, once: never retried here.

        Raises UncertainSubmitError when the job may have been accepted (any
        answer that does not say for certain that it was refused: a 5xx with
        or without RunComfy's body, a 3xx, an empty or unreadable answer, one
        without a request_id, a fault after the request was sent); a subclass
        of ApiError when RunComfy refused it for good; and, when it certainly
        was not accepted but may be sent again, RateLimitedError (429) or
        UnreachableError (no connection), each with the server's
        ``retry_after`` when it sent one. The caller owns the retries: it
        journals each refusal and a fresh intent before sending again (see
        `batcher.engine.steps`), so that a kill while it waits leaves nothing that
        looks unanswered.
        """
        path = f"/v1/models/{quote(model_id, safe='/')}"
        doing = f"submitting to {model_id}"
        call = f"submit {model_id}" + (f" job {printable(job, 200)}" if job else "")
        await self._pace()
        started = time.monotonic()
        try:
            # A 429 to a submit is the account's cap on jobs in flight (`batcher.runcomfy.backpressure.AccountCap`
            # learns it), not its request rate: halving the pace of every call for it starved the polls
            # that free the cap, and each probe of a recovered cap halved it again.
            response, content = await self._exchange(
                call, "POST", path, self.submit_timeout, paces=False, logs_answer=False, json=payload
            )
        except (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout) as exc:
            # The request never left this machine: safe to send again.
            msg = f"cannot reach RunComfy while {doing}: {type(exc).__name__} (the job was not accepted)"
            raise UnreachableError(msg) from exc
        except httpx2.LocalProtocolError as exc:
            # h11 refused to write the request (a header it cannot carry): not a byte left this machine.
            msg = f"the submit could not be written as HTTP ({type(exc).__name__}); nothing was sent"
            raise ApiError(msg) from exc
        except httpx2.TransportError as exc:
            msg = (
                f"the connection failed after the submit was sent ({type(exc).__name__}); RunComfy may have accepted it"
            )
            raise UncertainSubmitError(msg) from exc
        except Unreadable as exc:
            # The request was sent and something answered: what it said is lost, so is the job's fate.
            msg = f"RunComfy's answer to a submit {exc}; RunComfy may have accepted the job"
            raise UncertainSubmitError(msg, status_code=exc.status_code) from exc
        body = json_body(content, self._secret)
        status = response.status_code
        # A request_id in any answer means RunComfy has the job, whatever else the answer says:
        # it is journalled and polled, never thrown away (throwing it away pays twice).
        if body is not None and body.get("request_id") is not None:
            try:
                request_id = checked_request_id(body["request_id"], status)
            except ApiError:
                _log_call(call, started, f"HTTP {status}, an unusable request id")
                raise
            _log_call(call, started, f"HTTP {status}, request {request_id}")
            return Submission(request_id=request_id, raw=body)
        _log_call(call, started, f"HTTP {status}")
        code = error_code(body)
        if status == 429:
            # "Not now", refused before any work (RunComfy's CLI: retryable, src/exit.rs).
            said = refusal(response, body, doing, token_env=self.token_env)
            limited = RateLimitedError(f"{said} (the job was not accepted)", status_code=status, error_code=code)
            limited.throttled = 1
            limited.retry_after = _retry_after(response)
            raise limited
        if refuses_submit(status, code):
            refused = refusal(response, body, doing, token_env=self.token_env)
            if not isinstance(refused, TransientApiError):  # each refusing code and status maps to a final error
                raise refused
        # Everything else may stand in front of an accepted job: RunComfy's nodes answer any other status,
        # and any 2xx without a usable request_id, "Submission could not be confirmed", never retried.
        tag = f"HTTP {status}" + (f", error {code}" if code is not None else "")
        msg = f"RunComfy answered {tag} to a submit without a request_id; it may have accepted the job"
        raise UncertainSubmitError(msg, status_code=status, error_code=code)

    async def reachable(self, model_id: str) -> bool:
        """True when RunComfy answers at all (any HTTP status, body unread): for waiting out an outage."""
        await self._pace()
        call = f"probe {model_id}"
        started = time.monotonic()
        try:
            async with self._http.stream(
                "GET", f"/v1/models/{quote(model_id, safe='/')}", timeout=self.poll_timeout
            ) as response:
                self._note(response)
        except httpx2.TransportError as exc:
            _log_call(call, started, type(exc).__name__)
            return False
        _log_call(call, started, f"HTTP {response.status_code}")
        return True

    # -- calls that may be repeated -------------------------------------------

    async def _call(
        self, call: str, method: str, path: str, doing: str, params: dict[str, str] | None = None
    ) -> dict[str, Any]:
        once = partial(self._call_once, call, method, path, doing, params)
        try:
            return await retrying(once, policy=self.retry, retry_on=_retry_on, name=call)
        except _Retry as gave_up:
            raise gave_up.error from gave_up.__cause__

    async def _call_once(
        self, call: str, method: str, path: str, doing: str, params: dict[str, str] | None
    ) -> dict[str, Any]:
        """One try; raises `_Retry` for anything transient (a paid job is polled until it ends)."""
        await self._pace()
        try:
            # A redirect is an error whatever its body says (even a huge one): not read.
            response, content = await self._exchange(
                call, method, path, self.poll_timeout, read_redirects=False, params=params
            )
        except (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout) as exc:
            raise _Retry(UnreachableError(f"cannot reach RunComfy while {doing}: {type(exc).__name__}")) from exc
        except httpx2.TransportError as exc:
            raise _Retry(TransientApiError(f"connection trouble while {doing}: {type(exc).__name__}")) from exc
        except Unreadable as exc:
            unread = TransientApiError(f"RunComfy's answer {exc} while {doing}", status_code=exc.status_code)
            raise _Retry(unread) from exc
        if 300 <= response.status_code < 400:
            raise redirect_error(response, doing)
        body = json_body(content, self._secret)
        if body is not None and response.is_success and error_code(body) is None:
            return body
        if body is None and response.is_success:
            raise _Retry(TransientApiError(f"RunComfy answered something that is not a JSON object while {doing}"))
        error = refusal(response, body, doing, token_env=self.token_env)
        if not isinstance(error, TransientApiError):
            raise error
        raise _Retry(error, _retry_after(response))

    def _request_path(self, request_id: str, action: str) -> str:
        if not REQUEST_ID.fullmatch(request_id):
            # An old journal may hold one from before ids were checked at submit.
            msg = f"the request id {request_id[:80]!r} is malformed; batcher cannot ask RunComfy about it"
            raise ApiError(msg)
        return f"/v1/requests/{quote(request_id, safe='')}/{action}"

    def own_url(self, url: object) -> str | None:
        """url when it is on this client's API base (same scheme, host and port, no credentials in it,
        of a sane length), else None: a URL from an answer must not send the token anywhere else."""
        if not isinstance(url, str) or len(url) > 2000 or printable(url, 2000) != url:
            return None
        try:
            parts = httpx2.URL(url)
        except (httpx2.InvalidURL, ValueError):
            return None
        if parts.userinfo or self._origin is None or (parts.scheme, parts.host, parts.port) != self._origin:
            return None
        return url

    async def status(self, request_id: str, *, result_url: str | None = None) -> RequestResult:
        """The request's current state (``GET /v1/requests/{id}/status``, what RunComfy's docs and every
        RunComfy client wait on): a small answer, without outputs; `result` once it has ended.

        result_url: the submit answer's ``result_url``; while it is on the API base's own origin and ends
        in ``/result``, its ``/status`` sibling is asked (the request's own URLs, as RunComfy gave them)."""
        own = self.own_url(result_url)
        path = own[: -len("result")] + "status" if own and own.endswith("/result") else None
        path = path or self._request_path(request_id, "status")
        body = await self._call(f"status {request_id}", "GET", path, "polling a status")
        return _parse_result(request_id, body)

    async def result(self, request_id: str, *, url: str | None = None) -> RequestResult:
        """The request's current state, and its outputs once completed (with cost where offered).

        url: the submit answer's ``result_url`` (RunComfy's CLI prefers it), used only while it is on
        the API base's own origin (checked again here: a journal may have been edited)."""
        own = self.own_url(url)
        path = own or self._request_path(request_id, "result")
        params: dict[str, str] | None = None
        if "#" in path:
            params = {"include_cost": "true"}
        else:  # the query written into the URL: httpx2 merging params parses the URL once more
            path += ("&" if "?" in path else "?") + "include_cost=true"
        body = await self._call(f"result {request_id}", "GET", path, "polling a result", params)
        return _parse_result(request_id, body)

    async def model_info(self, model_id: str) -> dict[str, Any]:
        """``GET /v1/models/{id}``: the model's live price (``base_price_usd``, ``price_unit``, ``pricing_note``)."""
        path = f"/v1/models/{quote(model_id, safe='/')}"
        return await self._call(f"model {model_id}", "GET", path, "reading the model's price")

    async def catalog(self, part: str = "", params: dict[str, str] | None = None) -> dict[str, Any]:
        """RunComfy's model catalog, as its CLI reads it: ``GET /v1/models`` (part "") with search, category,
        include_schema and paging, or ``GET /v1/models/categories`` (part "categories"). See `batcher.runcomfy.catalog`."""
        path = "/v1/models" + (f"/{quote(part, safe='')}" if part else "")
        return await self._call(f"catalog {part or 'models'}", "GET", path, "reading RunComfy's model catalog", params)

    async def balance(self) -> dict[str, Any]:
        """``GET /balance`` on this client's base: the account's ``balance_usd``. Only for a client made
        for the balance host itself (see `batcher.runcomfy.account`): the token goes to no host a response names."""
        return await self._call("balance", "GET", "balance", "reading the account's balance")

    async def cancel(self, request_id: str) -> CancelOutcome:
        """Ask RunComfy to cancel a queued request; in-progress ones answer ``not_cancellable``."""
        path = self._request_path(request_id, "cancel")
        body = await self._call(f"cancel {request_id}", "POST", path, "cancelling a request")
        return CancelOutcome(
            request_id=request_id,
            outcome=printable(body.get("outcome", ""), WORD_LIMIT),
            state=normalize_state(body.get("status", "")),
        )


def _parse_result(request_id: str, body: dict[str, Any]) -> RequestResult:
    """One answer about request_id; server text in it (state word, error) made printable, numbers checked."""
    raw_status = printable(body.get("status", ""), WORD_LIMIT)
    state = normalize_state(raw_status)
    error = body.get("error")
    error_text = None
    if error not in (None, "", {}):
        error_text = printable(error if isinstance(error, str) else json.dumps(error), TEXT_LIMIT)
    # The state word alone says whether the job failed: RunComfy's CLI reads ``error`` only on a failed
    # status, so an error text beside in_progress (or any other word) is kept, shown and journalled, but
    # never ends a paid job (a wrong "failed" would have --retry-failed pay for a job still running).
    return RequestResult(
        # The id asked about, not one the answer names: that one was never checked.
        request_id=request_id,
        state=state,
        raw_status=raw_status,
        outputs=collect_output_urls(body.get("output")) if state == "completed" else [],
        error=error_text,
        cost=sane_cost(body.get("cost"), request_id),
        queue_position=queue_position(body.get("queue_position"), request_id),
        raw=body,
    )
