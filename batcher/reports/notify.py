"""``run --notify URL``: one POST with the run's summary when it ends, so nobody has to watch it.

The body is JSON that both common receivers read as it is: Slack's (and
Mattermost's) incoming webhooks show ``text``; ntfy (2.10 and later) shows
``title`` and ``text`` through the ``X-Template``/``X-Title``/``X-Message``
headers sent with it, and its priority and tags from ``X-Priority`` and
``X-Tags``; anything else gets the whole summary under ``summary``::

    {"text": "batcher: london finished: 98/100 done, 2 failed; spent $1.23. Output: …",
     "title": "batcher: london failed", "outcome": "failed", "exit_code": 1,
     "summary": {"done": 98, "total": 100, "counts": {...}, "failed": ["london-7", ...], ...}}

``outcome`` is ``done`` (exit 0), ``failed`` (exit 1, or an error that ended
the run) or ``interrupted`` (exit 130). The URL comes from ``--notify``, or
kept out of ``ps`` and shell history, from ``--notify-file PATH`` or the
``BATCHER_NOTIFY_URL`` variable. It must be https (plain http on
loopback only, as for every URL batcher talks to); it is checked before the
run starts. The request carries no token and follows no redirect, and its
failure (no answer in `TIMEOUT` seconds, an error status) is a warning: it
never changes the run's exit code.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import anyio
import httpx2

from .._version import __version__
from ..engine.runner import RunSummary
from ..errors import UsageError
from ..lifecycle import outcome_word
from ..net.policy import scheme_refusal
from ..printable import printable

__all__ = ["NOTIFY_ENV", "TIMEOUT", "check_notify_url", "error_payload", "notify_url", "send", "summary_payload"]

log = logging.getLogger(__name__)

TIMEOUT = 10.0
NOTIFY_ENV = "BATCHER_NOTIFY_URL"
"""The receiver when neither --notify nor --notify-file is given: a webhook's path is its secret, and a
variable (or a file) keeps it out of ``ps`` and the shell's history."""
_MAX_URL_FILE = 4096
_NAMES_SENT = 50
"""Job names listed per problem in the summary (all of them are in `batcher status --json`)."""


def check_notify_url(url: str, source: str | None = None) -> None:
    """Raise UsageError for a --notify URL batcher would not send to. With source (the variable or file it
    came from, where it was kept out of sight), the message names that and the URL's host, not its path."""
    refusal = scheme_refusal(url)
    if refusal:
        shown = f"--notify {printable(url, 200)}" if source is None else f"the URL in {source}"
        msg = f"{shown}: {refusal}"
        raise UsageError(msg)


def notify_url(given: str | None, file: Path | None) -> str | None:
    """Where to POST the run's end: ``--notify``, else the first line of ``--notify-file``, else
    `NOTIFY_ENV`; None for none. UsageError when both options are given, the file cannot be read or holds
    no URL, or the URL is one batcher would not send to (all before the run starts)."""
    if given and file is not None:
        msg = "--notify and --notify-file both name a receiver: give one of them"
        raise UsageError(msg)
    if file is not None:
        url = _read_url_file(file)
        check_notify_url(url, f"--notify-file {file}")
        return url
    if given:
        check_notify_url(given)
        return given
    url = os.environ.get(NOTIFY_ENV, "").strip()
    if not url:
        return None
    check_notify_url(url, NOTIFY_ENV)
    return url


def _read_url_file(path: Path) -> str:
    """The first line of path that is neither blank nor a ``#`` comment; a FIFO or device is refused unread."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        msg = f"cannot read --notify-file {path}: {exc.strerror or exc}"
        raise UsageError(msg) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            msg = f"--notify-file {path} is not a regular file"
            raise UsageError(msg)
        data = os.read(fd, _MAX_URL_FILE + 1)
    finally:
        os.close(fd)
    lines = [line.strip() for line in data[:_MAX_URL_FILE].decode(errors="replace").splitlines()]
    found = next((line for line in lines if line and not line.startswith("#")), None)
    if len(data) > _MAX_URL_FILE or found is None:
        msg = f"--notify-file {path} should hold one webhook URL on a line of its own"
        raise UsageError(msg)
    return found


def summary_payload(name: str, summary: RunSummary) -> dict[str, Any]:
    """The body for a run that ended with a summary (done, failed or interrupted)."""
    outcome = outcome_word(summary.exit_code)
    parts = [f"{summary.done}/{summary.total} done"]
    for jobs, word in (
        (summary.refused, "refused"),
        (summary.failed, "failed"),
        (summary.uncertain, "uncertain"),
        (summary.lost, "lost"),
        (summary.unfinished, "not finished"),
    ):
        if jobs:
            parts.append(f"{len(jobs)} {word}")
    money = f"sandbox, would have cost ${summary.spent:,.2f}" if summary.sandbox else f"spent ${summary.spent:,.2f}"
    verb = "was interrupted" if outcome == "interrupted" else "finished"
    text = f"batcher: {name} {verb}: {', '.join(parts)}; {money}. Output: {summary.output}"
    if summary.stop_reason and outcome != "done":
        text += f" (stopped submitting: {summary.stop_reason})"
    return {
        "text": text,
        "title": f"batcher: {name} {outcome}",
        "outcome": outcome,
        "exit_code": summary.exit_code,
        "summary": {
            "manifest": name,
            "output_dir": str(summary.output_dir),
            "total": summary.total,
            "done": summary.done,
            "counts": dict(summary.counts),
            "refused": [j.name for j in summary.refused[:_NAMES_SENT]],
            "failed": [j.name for j in summary.failed[:_NAMES_SENT]],
            "uncertain": [j.name for j in summary.uncertain[:_NAMES_SENT]],
            "lost": [j.name for j in summary.lost[:_NAMES_SENT]],
            "unfinished": len(summary.unfinished),
            "spent": summary.spent,
            "to_spend": summary.to_spend,
            "possible_extra_cost": summary.possible_extra_cost,
            "sandbox": summary.sandbox,
            "interrupted": summary.interrupted,
            "stop_reason": summary.stop_reason,
            "stop_kind": summary.stop_kind,
        },
    }


def error_payload(name: str, error: BaseException, exit_code: int) -> dict[str, Any]:
    """The body for a run that an error ended before it had a summary (a refused token, the disk full)."""
    outcome = outcome_word(exit_code)
    reason = printable(str(error) or type(error).__name__, 1000)
    return {
        "text": f"batcher: {name} stopped: {reason}",
        "title": f"batcher: {name} {outcome}",
        "outcome": outcome,
        "exit_code": exit_code,
        "summary": {"manifest": name, "error": reason},
    }


def send(url: str, payload: dict[str, Any]) -> str | None:
    """POST payload to url once; None when the receiver took it, else why not (never raises for a failure).

    Bounded in all: TIMEOUT per read and twice it in all (a receiver that drips its answer a byte a
    second would otherwise hold the run's end for ever), and its body is never read.
    """
    return anyio.run(_post, url, payload)


async def _post(url: str, payload: dict[str, Any]) -> str | None:
    priority = {"done": "3", "interrupted": "4"}.get(str(payload.get("outcome")), "4")
    tags = {"done": "white_check_mark", "interrupted": "warning"}.get(str(payload.get("outcome")), "x")
    headers = {
        "User-Agent": f"batcher/{__version__}",
        # ntfy: render title and message from the JSON body instead of showing the JSON itself.
        "X-Template": "yes",
        "X-Title": "{{.title}}",
        "X-Message": "{{.text}}",
        "X-Priority": priority,
        "X-Tags": tags,
    }
    status = 0
    with anyio.move_on_after(2 * TIMEOUT):
        try:
            async with (
                httpx2.AsyncClient(timeout=TIMEOUT, follow_redirects=False) as client,
                client.stream("POST", url, json=payload, headers=headers) as response,
            ):
                status = response.status_code  # the answer's body is not ours to read
        except httpx2.HTTPError as exc:
            return f"{type(exc).__name__}: {printable(str(exc), 300)}"
    if not status:
        return f"no answer within {2 * TIMEOUT:g} s"
    if status >= 300:
        return f"the receiver answered HTTP {status}"
    return None
