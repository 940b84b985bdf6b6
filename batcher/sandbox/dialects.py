"""How the sandbox words its answers: RunComfy's dialect, and each variant RunComfy's own clients meet.

Every word here is one a RunComfy source shows (each dialect names its own); a word only RunComfy's
Serverless API says is said only by the dialect named for it, ``serverless``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["DIALECTS", "Dialect", "dialect_named", "phase_word"]

DIALECTS = ("runcomfy", "cli", "nodes", "errors-as-200", "epoch-ms", "serverless")
"""Names for `SandboxConfig.dialect`: how the sandbox words its answers.

runcomfy       (default) what RunComfy documents and its clients read: in_queue, in_progress,
               completed, failed, cancelled (docs.runcomfy.com model-apis; the states runcomfy-mcp's
               runcomfy_client.py ``RunComfyModelAPIClient.wait_for_completion`` ends on, and
               comfyui-runcomfy-partner-nodes runcomfy/execution.py ``async_run_generation`` waits
               through); a cancel's outcome cancelled or not_cancellable (runcomfy-cli src/poll.rs
               ``handle_interrupt``; the nodes check ``outcome == 'cancelled'``); created_at/finished_at
               as ISO 8601 strings in UTC with "Z" and milliseconds; status_url and result_url in every
               answer; error bodies with their HTTP status (402 for 400002, a low balance)
cli            the Model API's words as above, the variants RunComfy's CLI reads past: timestamps with
               a +00:00 offset and microseconds (no RunComfy source pins the format down); a
               failure's error as a string; 400002 with HTTP 400 (src/api.rs ``api_error`` and
               src/exit.rs read 400 and 422 alike, so only the code tells)
nodes          the words RunComfy's ComfyUI nodes wait through (runcomfy/execution.py
               ``async_run_generation``): pending, waiting (queued), starting, processing (running);
               timestamps without a zone (UTC); a submit answer with the request_id alone and no URLs
               anywhere (runcomfy/client.py ``submit`` reads request_id alone); a low balance as a bare
               402 (what the nodes' client checks, runcomfy/client.py ``_request``)
errors-as-200  RunComfy's error bodies (400001/400002/400004/401001/403001/404001/422001) with
               HTTP 200 and a top-level error_code, as RunComfy's MCP client warns some APIs do
               (runcomfy_client.py ``_request``)
epoch-ms       timestamps as epoch milliseconds (numbers); otherwise as runcomfy
serverless     RunComfy's Serverless API's words, which the Model API's clients do not end on:
               succeeded, canceled, and a cancel's outcome cancellation_requested. Only RunComfy's CLI
               reads them (src/poll.rs ``inference_is_terminal``, shared by ``run`` and ``deployments
               run``); its MCP client (completed/cancelled/failed) and nodes never see such a job finish.
               For rehearsing a client's tolerance, never as the Model API

RunComfy does not document its timestamp format (its CLI only declares them strings), so
the dialects between them cover what a server is likely to send.
"""


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
class Dialect:
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


_DIALECTS: dict[str, Dialect] = {
    "runcomfy": Dialect(),
    "cli": Dialect(stamp=_iso_offset, error_as_text=True, balance_status=400),
    "nodes": Dialect(
        queued=("pending", "waiting"),
        running=("starting", "processing"),
        stamp=_iso_naive,
        urls=False,
        error_as_text=True,
        balance_body=False,
    ),
    "errors-as-200": Dialect(errors_as_200=True),
    "epoch-ms": Dialect(stamp=_epoch_ms),
    "serverless": Dialect(completed="succeeded", cancelled="canceled", cancel_outcome="cancellation_requested"),
}


def dialect_named(name: str) -> Dialect:
    """The dialect of that name (one of `DIALECTS`)."""
    return _DIALECTS[name]


def phase_word(words: tuple[str, ...], start: float, end: float, now: float) -> str:
    """Of words said in turn from start to end, the one said at now."""
    if len(words) == 1 or end <= start:
        return words[0]
    share = (now - start) / (end - start)
    return words[min(len(words) - 1, max(0, int(share * len(words))))]
