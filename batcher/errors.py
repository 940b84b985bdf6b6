"""Every error batcher raises on purpose.

    BatcherError
    ├── UsageError                 bad flags, missing token, unsafe URL given by the user
    │   └── ManifestChangedError   a prompt file changed while a run was reading it again
    ├── ManifestError              the manifest file or one of its jobs is wrong
    ├── ApiError                   RunComfy answered with an error (or did not answer)
    │   ├── AuthError              token refused (HTTP 401/403; 400004, 401001, 403001): the run stops
    │   ├── BalanceError           insufficient balance (400002, HTTP 402)
    │   ├── RequestGoneError       request not found or expired (404001)
    │   ├── ApiValidationError     the service rejected the input (422001)
    │   ├── TransientApiError      429, 5xx, connection trouble: worth retrying
    │   │   ├── RateLimitedError   429 past the retries: "not now", never "not this run"
    │   │   └── UnreachableError   no connection could be made past the retries: an outage
    │   ├── UncertainSubmitError   a submit may or may not have been accepted
    │   └── CatalogError           RunComfy's catalog answered something batcher will not use (too big, deep, wrong types)
    ├── JournalError               the state journal cannot be read or written
    │   ├── JournalCorruptError    a damaged line that is not the last one
    │   └── JournalLockedError     another `batcher run` holds the output folder
    ├── DownloadError              an output could not be fetched or failed a check
    │   └── ExpiredUrlError        the download host answered 403/404: the signed URL has likely expired
    ├── OutputFolderError          the output folder cannot be written (disk full, permissions)
    ├── StorageError               object storage refused or failed a call: the run stops
    │   └── ObjectTooLargeError    an object over what a read allows
    └── LocalImageError            a local image is gone, unreadable or changed since the manifest was loaded

Foreign errors (httpx2, yaml, jsonschema, OSError) are turned into these where
they happen, with ``raise ... from exc``; the CLI turns these into messages
and exit codes in one place. Messages are written for the person at the
terminal and never contain the API token.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ApiError",
    "ApiValidationError",
    "AuthError",
    "BalanceError",
    "BatcherError",
    "CatalogError",
    "DownloadError",
    "ExpiredUrlError",
    "JournalCorruptError",
    "JournalError",
    "JournalLockedError",
    "LocalImageError",
    "ManifestChangedError",
    "ManifestError",
    "ObjectTooLargeError",
    "OutputFolderError",
    "Problem",
    "RateLimitedError",
    "RequestGoneError",
    "StorageError",
    "TransientApiError",
    "UncertainSubmitError",
    "UnreachableError",
    "UsageError",
    "missing_package",
]


class BatcherError(Exception):
    """Root of every error batcher raises on purpose."""


class UsageError(BatcherError):
    """Raised for bad flags, a missing token or an unsafe URL: fix the command."""


def missing_package(needed_by: str, package: str, extra: str) -> UsageError:
    """The error for an optional dependency that is not installed. It names the package itself: "batcher" on
    PyPI is another project, so ``pip install 'batcher[extra]'`` would fetch that."""
    msg = f"{needed_by} needs {package}: pip install {package} (or, in batcher's checkout, pip install -e '.[{extra}]')"
    return UsageError(msg)


class ManifestChangedError(UsageError):
    """Raised when a run reads its jobs again (it streams them) and they are not the jobs it loaded:
    a prompt file was edited during the run. The run stops submitting; the next run loads the new file."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a manifest, located as precisely as we can."""

    file: str
    line: int | None
    field: str
    message: str
    column: int | None = None
    """Where on the line (from 1), when it matters: a YAML syntax error's."""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        if self.line is not None and self.column is not None:
            where += f":{self.column}"
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}"


class ManifestError(BatcherError):
    """Raised when a manifest cannot be used; carries every problem found, not only the first."""

    def __init__(self, problems: list[Problem], *, omitted: int = 0) -> None:
        self.problems = problems
        self.omitted = omitted
        lines = [str(p) for p in problems]
        count = len(problems) + omitted
        head = f"{count} problem{'s' if count != 1 else ''} in the manifest:"
        tail = [f"  … and {omitted} more (fix these and validate again)"] if omitted else []
        super().__init__("\n".join([head, *("  " + line for line in lines), *tail]))


class ApiError(BatcherError):
    """Raised when RunComfy answers with an error, or does not answer usably."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_code: int | None = None,
        detail: object = None,
    ) -> None:
        self.status_code = status_code
        self.error_code = error_code
        self.detail = detail
        super().__init__(message)


class AuthError(ApiError):
    """Raised when the token is missing, expired or refused (HTTP 401 or 403, with or without
    RunComfy's body): nothing more can be done without a new one, so the run stops at once.
    A submit refused this way certainly was not accepted."""


class BalanceError(ApiError):
    """Raised when the account has no balance left for a submit: top up, then run again."""


class RequestGoneError(ApiError):
    """Raised when RunComfy no longer knows a request id (not found or expired)."""


class ApiValidationError(ApiError):
    """Raised when RunComfy rejects a job's input (422001); the job fails, the run goes on."""


class TransientApiError(ApiError):
    """Raised for 429, 5xx and connection faults that outlived our retries (a submit's: its one try)."""

    retry_after: float | None = None
    """Seconds the server asked to wait (``Retry-After``), when it said; set by the client on a submit."""


class RateLimitedError(TransientApiError):
    """Raised when a call is refused with 429 past the retries (a submit: at once).

    For a submit this is certain: nothing was accepted. It means "not now"
    (often an account's cap on jobs in flight), so the runner sends the job
    again later in the same run.
    """

    throttled: int = 1
    """429s the call met (per-account figures count them): 1 for a submit's 429."""


class UnreachableError(TransientApiError):
    """Raised when no connection to RunComfy could be made past the retries.

    For a submit this is certain: the request never left this machine. The
    runner pauses on it (an outage) rather than failing jobs one by one.
    """


class UncertainSubmitError(ApiError):
    """Raised when a submit's fate is unknown (answer lost after sending, gateway error).

    RunComfy has no idempotency key, so sending it again could pay twice:
    the job is held as *uncertain* until the user asks for
    ``--resubmit-uncertain``.
    """


class CatalogError(ApiError):
    """RunComfy's model catalog answered something batcher will not use: over a cap, too deep, not the
    shape its clients read, or a schema that is not a JSON Schema. Nothing is written from it."""


class JournalError(BatcherError):
    """Raised when the state journal cannot be read or written."""


class JournalCorruptError(JournalError):
    """Raised when a journal line other than the last is damaged; the line number is in the message."""


class JournalLockedError(JournalError):
    """Raised when another `batcher run` is already using the same output folder."""


class DownloadError(BatcherError):
    """Raised when an output cannot be downloaded or fails a check (size, length, scheme, host).

    ``permanent`` is True when trying again, even with a fresh URL, would not help.
    """

    permanent = False


class ExpiredUrlError(DownloadError):
    """Raised when a download host answers 403 or 404: the signed URL has probably expired."""


class OutputFolderError(BatcherError):
    """Raised when files cannot be written to the output folder (disk full, no permission).

    The run stops rather than fail every remaining job the same way; the
    journal still folds, and the next run downloads what is missing.
    """


class StorageError(BatcherError):
    """Raised when object storage refuses or fails a call during a run.

    The run stops, as it does when its journal cannot be written (a bucket run's
    journal lives there), so nothing goes unrecorded. ``transient`` when another
    try may work (a 5xx, a throttle, a reset or timed-out connection); a refusal
    (403, no such bucket) is not.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ObjectTooLargeError(StorageError):
    """Raised for an object over what a read allows: not an object batcher wrote."""


class LocalImageError(BatcherError):
    """Raised at send time when a local image cannot be sent as it was checked: it is gone, unreadable or
    changed since the manifest was loaded.

    Nothing left this machine: the submit step records the job as refused for
    certain, and the next run sends it again.
    """
