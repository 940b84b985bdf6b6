"""A ``gs://`` output: `batcher.output.storage.bucket.Bucket` on Google Cloud Storage, through google-cloud-storage.

Why google-cloud-storage: it is Google's own client, kept by the team that
runs the service and released with its API since 2016, and finds
credentials through google-auth's Application Default Credentials, the chain
every Google tool uses: ``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's ADC
file (``gcloud auth application-default login``), workload identity on GKE
and the metadata server on GCE and Cloud Run. It speaks the precondition
the journal's fencing rests on (``ifGenerationMatch=0``: create only if
absent, 412 otherwise) and resumable uploads, where an object exists only
once its last chunk is in. gcsfs puts fsspec's asyncio layer over aiohttp
with retry and session code of its own, gcloud-aio-storage is a smaller
team's asyncio client, obstore a younger one with its own credential chain;
as with S3, a journal PUT's cost is its round trip, not the client.
``STORAGE_EMULATOR_HOST`` points it at an emulator (no credentials then), as
the tests do with fake-gcs-server.

The SDK retries small calls itself (its default policy, bounded here to
`_SMALL_CALLS` seconds); a whole file upload is sent once by the SDK and
tried again by `batcher.output.storage.bucket.upload`, whose tries are logged and bounded.
"""

from __future__ import annotations

import http.client
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ...errors import StorageError, UsageError, missing_package
from .bucket import MAX_OBJECT_BYTES, MULTIPART_THRESHOLD, Bucket, RemoteOutput, content_type, too_large

__all__ = ["GcsBucket"]

_SMALL_CALLS = 30.0
"""Seconds the SDK may spend retrying one journal PUT, GET or listing before the run hears of it."""
_TIMEOUT = (10.0, 60.0)
"""Connect and read timeouts of every request."""
_RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
_REFUSED = frozenset({401, 403})
_NO_CREDENTIALS = (
    "set GOOGLE_APPLICATION_CREDENTIALS to a service account key file, run `gcloud auth application-default "
    "login`, or run where workload identity or a VM's service account applies"
)


class GcsBucket(Bucket):
    """One GCS client for one output. Thread-safe for these calls (each makes its own blob objects)."""

    def __init__(self, output: RemoteOutput) -> None:
        try:
            from google.api_core.client_info import ClientInfo
            from google.auth.exceptions import DefaultCredentialsError
            from google.cloud import storage
            from google.cloud.storage.retry import DEFAULT_RETRY
        except ImportError as exc:
            raise missing_package("a gs:// output", "google-cloud-storage", "gcs") from exc
        self.output = output
        self.requests = 0
        self._retry = DEFAULT_RETRY.with_timeout(_SMALL_CALLS)
        agent = ClientInfo(user_agent="batcher")  # type: ignore[no-untyped-call]  # google-api-core's is untyped
        try:
            # project=None: every call here names its bucket, so no project need be found (nor guessed).
            self._client = storage.Client(project=None, client_info=agent)
        except DefaultCredentialsError as exc:
            msg = f"no credentials for {output.url}: {_NO_CREDENTIALS} ({_short(exc)})"
            raise UsageError(msg) from exc
        except Exception as exc:  # a malformed key file, a universe-domain mismatch
            msg = f"cannot set up a GCS client for {output.url}: {_said(exc)}"
            raise UsageError(msg) from exc
        # The client GETs each bucket's metadata on a thread of its own, only to label OpenTelemetry spans that
        # batcher never opens: a request more per client, and a 403 in its debug log for a writer-only account.
        if getattr(self._client, "_bucket_metadata_cache", None) is not None:
            self._client._bucket_metadata_cache = None
        self._bucket = self._client.bucket(output.bucket)

    def check(self) -> None:
        # A one-object listing rather than a bucket GET: roles/storage.objectAdmin, enough for a run, may not
        # read the bucket's own metadata, and the run lists objects anyway.
        try:
            self._call("list", lambda: next(iter(self._pages(self.output.key(""), 1)), None), "")
        except StorageError as exc:
            status = _status(exc.__cause__)
            if status == 404:
                msg = f"the bucket {self.output.bucket!r} of {self.output.url} does not exist (create it first)"
            elif status in _REFUSED or _is_refresh_refused(exc.__cause__):
                msg = (
                    f"the credentials found cannot reach {self.output.url} ({status or 'refused'}); "
                    f"check GOOGLE_APPLICATION_CREDENTIALS or gcloud's application-default login"
                )
            else:
                msg = str(exc)
            raise UsageError(msg) from exc

    def put(self, relative: str, data: bytes, *, if_absent: bool = False) -> bool:
        blob = self._bucket.blob(self.output.key(relative))
        # if_generation_match=0: "only if no live object has this name"; GCS answers 412 otherwise.
        condition: dict[str, Any] = {"if_generation_match": 0} if if_absent else {}
        try:
            self._call(
                "put",
                lambda: blob.upload_from_string(data, retry=self._retry, timeout=_TIMEOUT, **condition),
                relative,
            )
        except StorageError as exc:
            if if_absent and _status(exc.__cause__) == 412:
                return False
            raise
        return True

    def get(self, relative: str, *, max_bytes: int | None = None) -> bytes | None:
        max_bytes = MAX_OBJECT_BYTES if max_bytes is None else max_bytes
        blob = self._bucket.blob(self.output.key(relative))
        try:
            # end is inclusive: one byte past the cap tells an object over it from one at it.
            data: bytes = self._call(
                "get",
                lambda: blob.download_as_bytes(start=0, end=max_bytes, retry=self._retry, timeout=_TIMEOUT),
                relative,
            )
        except StorageError as exc:
            if _status(exc.__cause__) == 404:
                return None
            raise
        if len(data) > max_bytes:
            raise too_large(self.output, relative, len(data), max_bytes)
        return data

    def listing(self, relative: str = "") -> dict[str, int]:
        start = self.output.key(relative) if relative else (self.output.prefix + "/" if self.output.prefix else "")
        cut = len(self.output.prefix) + 1 if self.output.prefix else 0

        def every() -> dict[str, int]:
            found: dict[str, int] = {}
            for page in self._pages(start, None):
                self.requests += 1
                for blob in page:
                    found[blob.name[cut:]] = int(blob.size or 0)
            return found

        listed: dict[str, int] = self._call("list", every, start, counted=False)  # each page counts itself
        return listed

    def subfolders(self, relative: str) -> list[str]:
        start = self.output.key(relative)
        cut = len(self.output.prefix) + 1 if self.output.prefix else 0

        def every() -> list[str]:
            listed = self._client.list_blobs(
                self._bucket, prefix=start, delimiter="/", retry=self._retry, timeout=_TIMEOUT
            )
            found: list[str] = []
            for page in listed.pages:
                self.requests += 1
                found += [name[cut:].rstrip("/") for name in page.prefixes]
            return found

        folders: list[str] = self._call("list", every, start, counted=False)
        return folders

    def upload(self, local: Path, relative: str) -> None:
        blob = self._bucket.blob(self.output.key(relative), chunk_size=MULTIPART_THRESHOLD)
        self.requests += 1
        try:
            # retry=None: one try here; batcher.output.storage.bucket.upload decides about another (and logs it).
            blob.upload_from_filename(str(local), content_type=content_type(relative), retry=None, timeout=_TIMEOUT)
        except Exception as exc:
            status = _status(exc)
            msg = f"cannot upload {relative} to {self.output.url}: {_said(exc)}"
            if status in _REFUSED or _is_refresh_refused(exc):
                msg += " (the credentials found may not write there: check GOOGLE_APPLICATION_CREDENTIALS)"
            elif status == 404:
                msg += f" (the bucket {self.output.bucket!r} is gone)"
            raise StorageError(msg, transient=_transient(exc)) from exc

    def delete(self, relatives: list[str]) -> None:
        # One request per object (GCS's batch endpoint is not in the emulators the tests can run), eight at a
        # time: a compaction's hundreds of segments do not hold a run's end for long. Deletes are free on GCS.
        def one(relative: str) -> None:
            blob = self._bucket.blob(self.output.key(relative))
            try:
                self._call("delete", lambda: blob.delete(retry=self._retry, timeout=_TIMEOUT), relative)
            except StorageError as exc:
                if _status(exc.__cause__) != 404:
                    raise

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, relatives))

    def close(self) -> None:
        self._client.close()

    def _pages(self, prefix: str, limit: int | None) -> Any:
        listed = self._client.list_blobs(
            self._bucket, prefix=prefix, max_results=limit, retry=self._retry, timeout=_TIMEOUT
        )
        return listed.pages

    def _call(self, operation: str, call: Any, where: str, *, counted: bool = True) -> Any:
        self.requests += counted
        from google.api_core.exceptions import RetryError

        try:
            return call()
        except Exception as exc:  # google.api_core's GoogleAPICallError, google.auth's errors, requests'
            # The SDK's retries gave up: what counts is the last failure they saw.
            last = exc.cause if isinstance(exc, RetryError) and isinstance(exc.cause, Exception) else exc
            msg = f"object storage refused {operation} of {self.output.bucket}/{self.output.key(where)}: {_said(last)}"
            if isinstance(exc, RetryError):
                msg += f" (tried again for {_SMALL_CALLS:g}s)"
            raise StorageError(msg, transient=_transient(last)) from last


def _status(exc: BaseException | None) -> int | None:
    """The HTTP status of a refusal (GoogleAPICallError's code, or an InvalidResponse's response)."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _transient(exc: BaseException) -> bool:
    """True for what another try may mend: 408, 429 and 5xx answers, a reset or timed-out connection."""
    import requests
    from google.auth.exceptions import TransportError
    from google.cloud.storage.exceptions import DataCorruption

    if isinstance(
        exc,
        ConnectionError
        | TimeoutError
        | http.client.HTTPException
        | requests.ConnectionError
        | requests.Timeout
        | requests.exceptions.ChunkedEncodingError
        | TransportError  # the token server unreachable: the same outage
        | DataCorruption,  # a checksum mismatch: the bytes were damaged on the way
    ):
        return True
    return _status(exc) in _RETRYABLE


def _is_refresh_refused(exc: BaseException | None) -> bool:
    from google.auth.exceptions import RefreshError

    return isinstance(exc, RefreshError)


def _said(exc: BaseException) -> str:
    """What went wrong, in the service's words: status and its error message, never a request's URL or
    headers (a token refresh's error is named, not quoted: its text is the token server's)."""
    from google.auth.exceptions import RefreshError

    if isinstance(exc, RefreshError):
        return "the credentials were refused when refreshed (RefreshError)"
    status = _status(exc)
    if status is None:
        return f"{type(exc).__name__}: {_short(exc)}"
    return f"{status}: {_service_message(exc) or type(exc).__name__}"


def _service_message(exc: BaseException) -> str | None:
    """The ``error.message`` of GCS's JSON answer, when the exception kept the answer."""
    response = getattr(exc, "response", None)
    try:
        error = response.json()["error"]  # type: ignore[union-attr]
        return _short(error["message"]) if isinstance(error, dict) else _short(error)
    except Exception:  # no answer kept, not JSON, another shape
        return None


def _short(text: object) -> str:
    said = " ".join(str(text).split())
    return said if len(said) <= 300 else said[:297] + "..."
