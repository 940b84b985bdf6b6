"""Why did a job fail, and would submitting it again help? One class per failure, from RunComfy's answer.

A job RunComfy reports ``failed`` carries an ``error``: a string, or an
object such as ``{"message": ..., "code": ...}`` (RunComfy's ComfyUI nodes
and CLI show both and read neither further; nothing RunComfy publishes
names its failure codes). The first model is OpenAI's gpt-image, whose own
API refuses a prompt or image with ``moderation_blocked`` /
``content_policy_violation``; other providers say "safety", "NSFW",
"flagged". So the class is read from the codes and words providers use,
and the raw text is always kept beside it: a wrong class costs at most a
retry chosen by hand, since `--retry-failed=all` still resends everything.

content_policy  the provider refused the prompt or an input: the same input is refused again (and paid again)
invalid_input   the input cannot be used (an image that cannot be fetched or decoded, a bad size): fix it first
model_error     the model or its worker failed: another try usually works
timeout         the job ran out of time at RunComfy: another try usually works
cancelled       cancelled (by batcher's --queue-timeout, --cancel-on-interrupt, or by hand)
unknown         none of the above could be read from the answer
download        RunComfy finished the job (it is paid for), but its output could not be fetched, after the
                download's own retries and one fresh URL from RunComfy: every run fetches it again, and
                --retry-failed never submits it again (that would pay twice for a file that may still come)

The last is batcher's, not RunComfy's: the job's phase stays ``completed``
(the journal's ``download_failed`` line says why), so `failure_of` reads it
from the record and `--retry-failed` cannot name it.
"""

from __future__ import annotations

import json
import re
from typing import assert_never

from ..errors import UsageError
from ..lifecycle import FAILURE_CLASSES, RESUBMITTABLE, FailureClass
from .records import JobRecord

__all__ = [
    "RETRYABLE",
    "classify",
    "failure_of",
    "failure_sentence",
    "parse_retry_classes",
    "retryable",
]

# Read in this order: a moderation message often also says "invalid" or "failed".
_CONTENT_POLICY = re.compile(
    r"moderation|content[ _-]?polic|safety|nsfw|unsafe|sexual|explicit|flagged|prohibited|sensitive|"
    r"violat|responsible[ _-]?ai|blocked",
    re.IGNORECASE,
)
_INVALID_INPUT = re.compile(
    r"invalid|unsupported|cannot (?:download|fetch|decode|read|open)|could not (?:download|fetch|decode|read|open)|"
    r"failed to (?:download|fetch|decode|load) (?:the )?(?:input|image)|bad request|malformed|too large|"
    r"not a valid|image_parse_error|unprocessable",
    re.IGNORECASE,
)
_TIMEOUT = re.compile(r"time[ _-]?out|timed out|deadline|took too long", re.IGNORECASE)
_MODEL_ERROR = re.compile(
    r"generation[ _-]?failed|model (?:error|failed)|internal|server error|out of memory|\boom\b|cuda|worker|"
    r"upstream|overloaded|unavailable|crash|exception|returned no output|no output",
    re.IGNORECASE,
)


def classify(error: str | None) -> FailureClass:
    """The class of a failure from the text RunComfy gave (the ``error`` field, JSON for an object)."""
    if not error:
        return "unknown"
    if _CONTENT_POLICY.search(error):
        return "content_policy"
    if _INVALID_INPUT.search(error):
        return "invalid_input"
    if _TIMEOUT.search(error):
        return "timeout"
    if _MODEL_ERROR.search(error):
        return "model_error"
    return "unknown"


_MESSAGE_FIELDS = ("message", "error_message", "detail", "error", "reason")


def failure_sentence(error: str | None, kind: str | None = None) -> str:
    """What a person reads about a failure: ``[model_error] the model failed on this input``. An error object
    (kept as JSON, see `classify`) is said by its message, the class in front; the raw text stays in the journal."""
    text = (error or "").strip()
    if text.startswith("{"):
        try:
            found = json.loads(text)
        except ValueError:
            found = None
        if isinstance(found, dict):
            words = [found[name] for name in _MESSAGE_FIELDS if isinstance(found.get(name), str) and found[name]]
            if words:
                text = words[0]
    text = text or "RunComfy reported the job failed without a reason"
    return f"[{kind or classify(error)}] {text}"


def retryable(kind: FailureClass) -> bool:
    """True when another submit of the same input can be expected to work (the default of --retry-failed)."""
    match kind:
        case "content_policy" | "invalid_input" | "download":
            # download: not submitted again at all (paid for); the next run fetches the file again.
            return False
        case "model_error" | "timeout" | "cancelled" | "unknown":
            # unknown: as before classes existed (a failure nobody could read is more often transient).
            return True
        case _:
            assert_never(kind)


RETRYABLE: frozenset[FailureClass] = frozenset(k for k in FAILURE_CLASSES if retryable(k))


def failure_of(record: JobRecord | None) -> FailureClass | None:
    """The class of a failed or cancelled job (None for any other): the journalled one, else read from its
    error (journals written before classes were)."""
    if record is None:
        return None
    if record.phase == "cancelled":
        return "cancelled"
    if record.phase == "completed":
        # Completed, a file missing, and the reason journalled: a download that failed (`standing.category`).
        return "download" if record.error and not record.downloaded else None
    if record.phase != "failed":
        return None
    for kind in FAILURE_CLASSES:
        if record.failure == kind:
            return kind
    return classify(record.error)


def parse_retry_classes(value: str) -> frozenset[FailureClass]:
    """What ``--retry-failed=VALUE`` retries: ``retryable`` (the default), ``all``, or a comma-separated list
    of classes. UsageError for anything else, naming the classes."""
    words = [w.strip().replace("-", "_") for w in value.split(",") if w.strip()]
    if words == ["retryable"]:
        return RETRYABLE
    if words == ["all"]:
        return frozenset(RESUBMITTABLE)
    if "download" in words:
        msg = (
            "--retry-failed: a download failure is a paid job, never submitted again: its file is fetched again by "
            "every run (no flag needed)"
        )
        raise UsageError(msg)
    unknown = [w for w in words if w not in RESUBMITTABLE]
    if not words or unknown:
        shown = ", ".join(repr(w) for w in unknown) or "nothing"
        msg = (
            f"--retry-failed: {shown} is not a failure class; give retryable (the default), all, or a "
            f"comma-separated list of: {', '.join(RESUBMITTABLE)}"
        )
        raise UsageError(msg)
    return frozenset(w for w in RESUBMITTABLE if w in words)
