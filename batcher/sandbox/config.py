"""How the sandbox behaves: every setting, each with its ``batcher sandbox`` flag and help."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..flags import flagged
from .dialects import DIALECTS
from .faults import DEFAULT_FAULTS, FAULT_KINDS

__all__ = ["REFUSALS", "SandboxSettings"]

REFUSALS = {
    "balance": (400002, "Insufficient balance. Please top up your account."),
    "token": (400004, "Invalid or expired API token, or the account is inactive."),
    "other-user": (403001, "This request belongs to another user."),
}
"""Names for `SandboxConfig.refuse`: RunComfy's refusal to give, and where.

balance     every submit: 400002 (a low balance; see also `SandboxConfig.balance_usd`)
token       every API call: 400004 with HTTP 401
other-user  every status, result and cancel: 403001 with HTTP 403
"""


@dataclass(slots=True)
class SandboxSettings:
    """How the sandbox behaves (`SandboxConfig` is these settings, servable). Rates are fractions from 0 to 1."""

    queue_delay: float = flagged(0.3, "--queue-delay", minimum=0, help="Seconds a job waits in the queue.")
    run_delay: float = flagged(0.7, "--run-delay", minimum=0, help="Seconds a job runs.")
    run_delay_max: float | None = flagged(
        None,
        "--run-delay-max",
        kind=float,
        minimum=0,
        help="Draw each job's run time between --run-delay and this (stable per job).",
    )
    fail_rate: float = flagged(0.0, "--fail-rate", minimum=0, maximum=1, help="Fraction of jobs that fail.")
    fault_rate: float = flagged(
        0.0, "--fault-rate", minimum=0, maximum=1, help="Fraction of requests that meet a fault."
    )
    faults: tuple[str, ...] = flagged(
        DEFAULT_FAULTS,
        "--faults",
        kind=str,
        help="Comma-separated faults to draw from (default: "
        + ", ".join(DEFAULT_FAULTS)
        + "); also "
        + ", ".join(k for k in FAULT_KINDS if k not in DEFAULT_FAULTS)
        + ", which accept the job and answer as if they had not.",
    )
    slow_seconds: float = flagged(5.0, "--slow-seconds", help="Delay of a 'slow' fault.")
    retry_after: float = flagged(1.0, "--retry-after", help="Retry-After seconds sent with 429s.")
    image_size: int = 64
    images_per_job: int = flagged(
        1, "--images-per-job", minimum=1, maximum=10, help="Output images each job answers with (test patterns)."
    )
    url_ttl: float | None = flagged(
        None, "--url-ttl", kind=float, help="Seconds output URLs stay valid [default: for ever]."
    )
    files_origin: str | None = None
    """The ``scheme://host:port`` output URLs name, to rehearse outputs on another host; default: the sandbox's own."""
    token: str | None = flagged(
        None,
        "--token",
        "--require-token",
        kind=str,
        help="Every call (API and balance hosts) must carry exactly this bearer token, else RunComfy's 401 "
        "(401001) [default: any bearer token, as the embedded rehearsal sends].",
    )
    auth_status: int = flagged(
        401,
        "--auth-status",
        choices=("401", "403"),
        help="How a wrong token is refused: 401 with RunComfy's 401001 body, or a bare 403.",
    )
    max_in_flight: int | None = flagged(
        None,
        "--max-in-flight",
        kind=int,
        minimum=1,
        help="An account's cap on jobs queued or running: submits past N get 429 (nothing accepted).",
    )
    unknown_window: float = flagged(
        0.0,
        "--unknown-window",
        minimum=0,
        help="Seconds after a submit during which the request answers 404001 (a lagging replica).",
    )
    rate_limit: float | None = flagged(
        None,
        "--rate-limit",
        kind=float,
        minimum=0.1,
        help="Answer 429 (with Retry-After) past this many API requests a second (one second's burst).",
    )
    seed: int | None = flagged(None, "--seed", kind=int, help="Seed for faults and failures, to replay a session.")
    fault_paths: tuple[str, ...] = ("submit", "result", "status", "cancel", "file")
    schema_dirs: tuple[Path, ...] = ()
    """Folders of user model schemas, so the sandbox validates (and accepts) those models too."""
    dialect: str = flagged(
        "runcomfy",
        "--dialect",
        choices=DIALECTS,
        help="How answers are worded: RunComfy's own, or as each of its clients has seen them.",
    )
    balance_usd: float | None = flagged(
        None,
        "--balance",
        kind=float,
        minimum=0,
        help="The account's balance in USD, debited each accepted submit's price; a submit it cannot pay for is "
        "refused (400002) [default: unlimited].",
    )
    model_price: float | None = flagged(
        None,
        "--model-price",
        kind=float,
        minimum=0,
        help="base_price_usd to answer for every model [default: the bundled table's].",
    )
    refuse: str | None = flagged(
        None, "--refuse", kind=str, choices=tuple(REFUSALS), help="Refuse every call as RunComfy would."
    )
    accounts: tuple[str, ...] = flagged(
        (),
        "--account",
        kind=str,
        multiple=True,
        help="A token of one of several accounts (repeatable): each has its own jobs, --max-in-flight and "
        "--rate-limit, and gets 403001 for another's request; other tokens are refused.",
    )
    blocked_words: tuple[str, ...] = flagged(
        (),
        "--blocked-word",
        kind=str,
        multiple=True,
        help="Prompts holding this word (any case) fail with a content-policy error (repeatable).",
    )

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULT_KINDS)
        if unknown:
            msg = f"unknown sandbox fault(s): {', '.join(sorted(unknown))}; known: {', '.join(FAULT_KINDS)}"
            raise UsageError(msg)
        if self.dialect not in DIALECTS:
            msg = f"unknown sandbox dialect {self.dialect!r}; known: {', '.join(DIALECTS)}"
            raise UsageError(msg)
        if self.refuse is not None and self.refuse not in REFUSALS:
            msg = f"unknown sandbox refusal {self.refuse!r}; known: {', '.join(REFUSALS)}"
            raise UsageError(msg)
