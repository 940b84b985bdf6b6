"""Which faults the sandbox can inject, and what the accept-then-answer ones say.

Each is drawn at `SandboxConfig.fault_rate` from `SandboxConfig.faults`; the
wire applies those below HTTP (a reset, a slow or cut-short body), the service
the rest.
"""

from __future__ import annotations

__all__ = ["ACCEPTED_ANSWERS", "DEFAULT_FAULTS", "FAULT_KINDS"]

DEFAULT_FAULTS = ("429", "500", "502", "503", "drop", "drop_after_accept", "slow", "truncate")
"""The faults drawn from unless told otherwise (`SandboxConfig.faults`, ``batcher sandbox --faults``)."""
FAULT_KINDS = (*DEFAULT_FAULTS, "accept_503", "accept_500001", "accept_empty", "accept_list", "accept_no_id")
"""Fault names for `SandboxConfig.faults`.

429                answer 429 with Retry-After; nothing happens
500                RunComfy's 500001 error body; nothing happens
502                bare gateway 502; a submit *was* accepted behind it
503                bare 503; nothing happens
drop               reset the connection before doing anything
drop_after_accept  accept the submit (or do the call), then reset without answering
slow               do the call, then answer after `slow_seconds` (past a client's read timeout)
truncate           announce the full length, send half the body, close
accept_503         accept the submit (or do the call), then answer a bare 503
accept_500001      accept the submit (or do the call), then answer 500 with RunComfy's 500001 body
accept_empty       accept the submit (or do the call), then answer 200 with an empty body
accept_list        accept the submit (or do the call), then answer 200 with ``[]``
accept_no_id       accept the submit (or do the call), then answer 200 with an object without request_id

The accept_* kinds are a server that takes (and charges) the job and answers as if it had not: a client
that reads such an answer as "not accepted" pays twice. Not among `DEFAULT_FAULTS`.
"""

ACCEPTED_ANSWERS: dict[str, tuple[int, bytes]] = {
    "accept_503": (503, b""),
    "accept_500001": (500, b'{"error_code": 500001, "error_message": "Internal server error, please retry"}'),
    "accept_empty": (200, b""),
    "accept_list": (200, b"[]"),
    "accept_no_id": (200, b'{"status": "in_queue"}'),
}
"""What each accept_* fault answers once the call was done (see `FAULT_KINDS`)."""
