"""What a job's history says: the journal's vocabulary and the fold of one event into a record.

Every kind of journal line (`EventKind`) and every phase a job can be in
(`Phase`) is defined here once; `JobRecord.apply` is exhaustive over the
kinds, so mypy catches a new kind that nothing folds, and a mistyped kind
read from a journal is an error, never dropped in silence. How the lines
are stored, checked and read is `batcher.journal.store`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, assert_never

from ..lifecycle import EVENT_KINDS, EventKind, Phase
from ..runcomfy.polling import MAX_DURATION

__all__ = ["FileRecord", "JobRecord"]


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A downloaded output: where it is (relative to the output folder) and what it holds."""

    path: str
    bytes: int
    sha256: str


@dataclass(slots=True)
class JobRecord:
    """Everything the journal knows about one job."""

    key: str
    name: str = ""
    phase: Phase = "pending"
    request_id: str | None = None
    remote_state: str | None = None
    outputs: list[str] = field(default_factory=list)
    files: dict[int, FileRecord] = field(default_factory=dict)
    error: str | None = None
    cost: float | None = None
    submits: int = 0
    """How many submits of this job may have been accepted (so paid for), across every run:
    each send counts, and a certain refusal takes its send back."""
    request_ids: list[str] = field(default_factory=list)
    submitted_at: float | None = None
    finished_at: float | None = None
    duration: float | None = None
    """Seconds from submit to finish, as RunComfy reported them (else as seen here): for poll timing."""
    spent: float = 0.0
    """What RunComfy reported for every completed submit of this job, across every run (a retried
    job was paid for more than once: `cost` is the latest only)."""
    refused: bool = False
    """pending because RunComfy refused the last submit for good (validation, balance), as opposed
    to never sent or sent back for later (429, an outage, a refused token)."""
    model: str = ""
    """The model the last submit went to (so a job no longer in the manifest can still be checked and finished)."""
    result_url: str | None = None
    """The submit answer's ``result_url``, when it was on the API base's own origin (else built from the id)."""
    account: str | None = None
    """The fingerprint of the account the last submit went through (`batcher.runcomfy.tokens`); None in journals
    written before accounts were recorded (one token then). Every poll, result and cancel uses it."""
    failure: str | None = None
    """The class of a RunComfy failure, as journalled (`batcher.journal.failures`; read through `failure_of`)."""
    throttled: dict[str, int] | None = None
    """429s met by this job's submits, per account fingerprint (None: none; most jobs meet none)."""

    @property
    def downloaded(self) -> bool:
        """True when every output has a recorded file."""
        return self.phase == "completed" and len(self.files) >= len(self.outputs) > 0

    def apply(self, event: dict[str, Any]) -> None:
        """Fold one event into this record (most frequent kinds first: this runs for every line)."""
        kind = event["e"]
        if kind not in EVENT_KINDS:
            # A mistyped or future kind must not be dropped in silence: the fold would lie.
            msg = f"unknown event kind {kind!r}"
            raise ValueError(msg)
        self._apply(kind, event)

    def _throttle(self, account: object, count: object) -> None:
        """Count 429s a submit met against the account it went through."""
        if not isinstance(account, str) or not isinstance(count, int) or count <= 0:
            return
        self.throttled = self.throttled or {}
        self.throttled[account] = self.throttled.get(account, 0) + count

    def _apply(self, kind: EventKind, event: dict[str, Any]) -> None:
        # Long on purpose: one branch per EventKind, in the order of how often each comes (this runs for every
        # line of a journal of millions), ending in assert_never. Split up, the fold would hide its coverage.
        if "name" in event:
            self.name = event["name"]
        if kind == "state":
            self.remote_state = event.get("state")
        elif kind == "downloaded":
            self.files[int(event["index"])] = FileRecord(event["path"], int(event["bytes"]), event["sha256"])
            self.error = None
        elif kind == "completed":
            self.phase = "completed"
            self.remote_state = "completed"
            self.outputs = list(event.get("outputs", []))
            self.cost = event.get("cost")
            if isinstance(self.cost, int | float) and self.cost > 0:
                self.spent += self.cost
            self.finished_at = event.get("t")
            self.error = None
            # As RunComfy reported it (the runner journals the client's reading), else as seen here.
            duration = event.get("duration")
            if isinstance(duration, int | float) and 0 < duration <= MAX_DURATION:
                self.duration = float(duration)
            elif self.submitted_at is not None and self.finished_at is not None:
                self.duration = self.finished_at - self.submitted_at
        elif kind == "submitted":
            self.phase = "submitted"
            self.request_id = event["request_id"]
            self.request_ids.append(event["request_id"])
            self.submitted_at = event.get("t")
            url = event.get("result_url")
            self.result_url = url if isinstance(url, str) else None
            if "throttled" in event:
                self._throttle(self.account, event["throttled"])
        elif kind == "submitting":
            self.phase = "submitting"
            self.model = str(event.get("model") or "")
            account = event.get("account")
            self.account = account if isinstance(account, str) else None
            self.failure = None
            self.submits += 1
            self.request_id = None
            self.remote_state = None
            self.outputs = []
            self.files = {}
            self.error = None
            self.cost = None
            self.finished_at = None
            self.refused = False
        elif kind == "refused":
            # Certainly not accepted: the send is not counted as a (possibly paid) submit.
            self.phase = "pending"
            self.error = event.get("reason")
            self.refused = True
            self.submits = max(0, self.submits - 1)
        elif kind == "deferred":
            # Certainly not accepted, and not for good: sent again in this run or the next, no flag needed.
            self.phase = "pending"
            self.error = None
            self.refused = False
            self.submits = max(0, self.submits - 1)
            self._throttle(event.get("account"), event.get("throttled"))
        elif kind == "uncertain":
            self.phase = "uncertain"
            self.error = event.get("reason")
        elif kind == "urls":
            self.outputs = list(event.get("outputs", []))
        elif kind == "download_failed":
            self.error = event.get("reason")
            # The file it was meant to (re)place is missing or wrong: the record must not claim it.
            index = event.get("index")
            if index is not None:
                self.files.pop(int(index), None)
        elif kind == "note":
            self.error = event.get("reason")
        elif kind == "failed":
            self.phase = "failed"
            self.remote_state = "failed"
            self.error = event.get("reason")
            failure = event.get("failure")
            self.failure = failure if isinstance(failure, str) else None
            self.finished_at = event.get("t")
        elif kind == "cancelled":
            self.phase = "cancelled"
            self.remote_state = "cancelled"
            self.finished_at = event.get("t")
        elif kind == "lost":
            self.phase = "lost"
            self.error = event.get("reason")
        elif kind == "run":
            pass  # a run's header: folded into FoldedJournal.headers, never into a record
        else:
            assert_never(kind)
