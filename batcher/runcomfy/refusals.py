"""What does an API answer that is not the one asked for mean? The error a user can act on.

RunComfy's error bodies (``error_code``, ``error_message``, ``detail``) and
bare HTTP statuses become the `batcher.errors` class that says what to do:
a refused token stops the run, a balance asks for a top-up, a transient
fault is retried, a redirect is final. Which answers to a *submit* say for
certain that it was refused is `refuses_submit` (docs/submit-answers.md);
what to do then is `batcher.runcomfy.client`'s and `batcher.engine.steps`' decision.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import httpx2

from ..errors import (
    ApiError,
    ApiValidationError,
    AuthError,
    BalanceError,
    RequestGoneError,
    TransientApiError,
    UncertainSubmitError,
)
from ..net.redirects import held_location
from ..printable import printable

__all__ = [
    "REFUSING_CODES",
    "REFUSING_STATUSES",
    "REQUEST_ID",
    "TOKEN_ENV",
    "checked_request_id",
    "error_code",
    "redirect_error",
    "refusal",
    "refuses_submit",
]

TOKEN_ENV = "RUNCOMFY_API_TOKEN"
"""Where the token comes from: named in every message about a refused one."""
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")
"""What a request id may look like: it goes into URLs, the journal and the terminal."""
REFUSING_CODES = frozenset({422001, 400001, 400002, 400004, 401001, 403001})
"""RunComfy's error codes that say a submit was refused before any work: validation, unknown model,
balance, token (missing, expired, inactive account, another user's). 500001 is not one: it is the
Serverless API's "server error", and on a paid POST a server error is an unknown outcome."""
REFUSING_STATUSES = frozenset({401, 402, 403, 422})
"""HTTP statuses whose meaning alone is such a refusal (RunComfy's nodes read 401/403 as a refused token
and 402 as the balance, before anything else; 422 is a validation refusal). 429 is "not now", apart."""


def refuses_submit(status: int, code: int | None) -> bool:
    """Whether an answer without a request_id says for certain that a submit was refused (see
    docs/submit-answers.md): a refusing RunComfy code on a 2xx or 4xx, or a refusing 4xx status. Never a
    3xx or 5xx, whatever its body: a gateway or a failing backend may stand in front of an accepted job."""
    if status >= 500 or 300 <= status < 400:
        return False
    return code in REFUSING_CODES or status in REFUSING_STATUSES


def redirect_error(response: httpx2.Response, doing: str) -> ApiError:
    """A 3xx from the API: never followed (it would carry the token elsewhere), and never worth repeating."""
    location = held_location(response) or ""
    try:
        host = httpx2.URL(location).host or "the same host"  # a relative Location stays on this host
    except (httpx2.InvalidURL, ValueError):
        host = location
    where = f"to {printable(host, 100)}" if location else "without a Location"
    msg = (
        f"RunComfy answered a redirect (HTTP {response.status_code}) {where} while {doing}; "
        "batcher follows no redirects from the API — check --api-base"
    )
    return ApiError(msg, status_code=response.status_code)


def checked_request_id(value: object, status: int) -> str:
    """The request_id of a submit's answer, or UncertainSubmitError when it cannot be used.

    The job may well have been accepted, so an id we cannot use is held as
    uncertain, never dropped (which would pay twice on the next run).
    """
    if isinstance(value, str) and REQUEST_ID.fullmatch(value):
        return value
    shown = repr(value)[:80] if isinstance(value, str | int | float) else type(value).__name__
    msg = (
        f"RunComfy answered HTTP {status} to a submit with a request_id batcher cannot use ({shown}); "
        "it may have accepted the job"
    )
    raise UncertainSubmitError(msg, status_code=status)


def error_code(body: Mapping[str, Any] | None) -> int | None:
    """RunComfy's ``error_code`` in an answer: None when there is none, -1 when it is not a number."""
    if not body:
        return None
    code = body.get("error_code")
    if code is None:
        return None
    try:
        return int(code)
    except (TypeError, ValueError):
        return -1


def refusal(
    response: httpx2.Response, body: Mapping[str, Any] | None, doing: str, *, token_env: str = TOKEN_ENV
) -> ApiError:
    """Turn an error answer into the error a user can act on; token_env: where the token came from."""
    status = response.status_code
    code = error_code(body)
    text = str(body.get("error_message") or body.get("message") or "") if body else ""
    detail = body.get("detail") if body else None
    # RunComfy's own sentence ends in a full stop, and ours follow it with another: keep one.
    said = f": {text.rstrip().rstrip('.')}" if text else ""
    tag = f"HTTP {status}" + (f", error {code}" if code is not None else "")
    kwargs: dict[str, Any] = {"status_code": status, "error_code": code, "detail": detail}
    if code in (400004, 401001, 403001) or status in (401, 403):
        # 403001 is "another user's request": with the token that submitted it that cannot
        # happen, so every one of these means the token is wrong for this work. Certain, and final.
        msg = (
            f"RunComfy refused the API token while {doing} ({tag}){said}. Check {token_env}: it may be "
            "missing, expired, the account inactive, or not the account that submitted this run's jobs"
        )
        return AuthError(msg, **kwargs)
    if code == 400002 or status == 402:
        msg = f"RunComfy says the balance is insufficient while {doing} ({tag}){said}. Top up the account, then run again: nothing is lost."
        return BalanceError(msg, **kwargs)
    if code == 404001:
        msg = f"RunComfy does not know this request ({tag}){said}: not found or expired."
        return RequestGoneError(msg, **kwargs)
    if code == 422001 or status == 422:
        extra = f" ({json.dumps(detail)[:500]})" if detail else ""
        msg = f"RunComfy rejected the input ({tag}){said}{extra}"
        return ApiValidationError(msg, **kwargs)
    if code == 400001:
        msg = f"RunComfy does not know this model ({tag}){said}"
        return ApiError(msg, **kwargs)
    if status == 404:
        # A 404 without RunComfy's body is a proxy or a replica that has not seen the request yet.
        msg = f"RunComfy answered HTTP 404 without its error body while {doing}{said}"
        return TransientApiError(msg, **kwargs)
    if code == 500001 or status in (408, 429) or status >= 500:
        # 408 with 429: RunComfy's CLI counts both as retryable (src/exit.rs, EX_TEMPFAIL). A 409 is not
        # (the CLI reads any other 4xx as EX_DATAERR): it stays final, below.
        msg = f"RunComfy had trouble while {doing} ({tag}){said}"
        return TransientApiError(msg, **kwargs)
    msg = f"RunComfy answered an error while {doing} ({tag}){said}"
    return ApiError(msg, **kwargs)
