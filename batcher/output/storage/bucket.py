"""Where an ``--output`` points: a local folder, or a bucket and prefix on object storage (S3 or GCS).

`parse_output` turns the text of ``--output`` into a `RemoteOutput` (an
``s3://bucket/prefix`` or ``gs://bucket/prefix`` URL) or None (a local
folder, as before). `Bucket` is the one interface batcher talks to object
storage through, and `batcher.output.storage.open_bucket` picks its implementation by scheme:
`batcher.output.storage.s3` (boto3) or `batcher.output.storage.gcs` (google-cloud-storage); nothing above
this module knows which. Each implementation turns every foreign error into
ours at its boundary: a setup problem (no such bucket, no credentials) is a
UsageError (exit 2) with what to do, and trouble during a run a
`StorageError`, which stops the run like a journal that cannot be written.
A `StorageError` says whether it is `StorageError.transient` (5xx, a reset
connection): `upload` tries those again with backoff (`batcher.net.retrying`),
beyond what the SDK itself retries, and stops at once on a refusal.

Credentials are never read, copied or written by batcher: each SDK finds
them where its users keep them, and no message includes anything but
bucket, key and the service's error code and text.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from ...errors import ObjectTooLargeError, StorageError, UsageError
from ...net.retrying import RetryPolicy, TryAgain, retrying_blocking

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "MAX_OBJECT_BYTES",
    "MULTIPART_THRESHOLD",
    "UPLOAD_RETRY",
    "Bucket",
    "RemoteOutput",
    "Scheme",
    "cache_root",
    "content_type",
    "parse_output",
    "too_large",
    "upload",
]

log = logging.getLogger(__name__)

Scheme = Literal["s3", "gs"]
"""The object stores batcher writes to: S3 (and S3-compatible stores through ``AWS_ENDPOINT_URL``) and GCS."""

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_NEAR_URL = re.compile(r"(s3|gs):/?(?!/)", re.IGNORECASE)
"""``s3:/bucket``, ``gs:bucket``: what a slip of the keyboard makes of a bucket URL."""
_BUCKET: dict[Scheme, re.Pattern[str]] = {
    "s3": re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"),
    "gs": re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]"),  # GCS allows underscores too
}
_CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".jsonl": "application/jsonl",
}
"""What a browser is told each file batcher uploads is (S3 says binary/octet-stream otherwise, and a browser
opening the gallery from the bucket would download index.html and every full-size image instead of showing them)."""


def content_type(relative: str) -> str | None:
    """The type an object batcher uploads is served with, by its extension; None for one it does not know."""
    return _CONTENT_TYPES.get(os.path.splitext(relative)[1].lower())


MULTIPART_THRESHOLD = 8 * 1024 * 1024
"""Files past this go up in parts (S3: 8 MiB parts, four at a time; GCS: a resumable upload in 8 MiB chunks);
each object appears only once complete."""
MAX_OBJECT_BYTES = 1 << 30
"""The most batcher reads of one object: a journal base of about seven million events (a million is 140 MB)."""
UPLOAD_RETRY = RetryPolicy(attempts=5, base=0.5, cap=8.0)
"""An upload's transient failures past the SDK's own retries: up to 5 tries, waits up to 0.5, 1, 2, 4 s
(jittered), so a bucket that is down costs a run at most about 8 s before it stops."""


def too_large(output: RemoteOutput, relative: str, size: int, max_bytes: int) -> ObjectTooLargeError:
    """The error for an object over what a read allows."""
    msg = (
        f"{output.url}: {relative} is {size:,} bytes or more, over the {max_bytes:,} batcher reads of one object; "
        "it is not an object batcher wrote there"
    )
    return ObjectTooLargeError(msg)


@dataclass(frozen=True, slots=True)
class RemoteOutput:
    """An output on object storage: ``s3://bucket/prefix`` or ``gs://bucket/prefix``."""

    bucket: str
    prefix: str
    """Without slashes at either end; "" for the bucket's root."""
    scheme: Scheme = "s3"

    @property
    def url(self) -> str:
        root = f"{self.scheme}://{self.bucket}"
        return f"{root}/{self.prefix}" if self.prefix else root

    def key(self, relative: str) -> str:
        """The object key of a path relative to the output (``journal/00000001.jsonl``)."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def child(self, name: str) -> RemoteOutput:
        """The output one level down (a shard's: ``shard-2-of-4``)."""
        return RemoteOutput(self.bucket, self.key(name), self.scheme)

    def cache_dir(self) -> Path:
        """This machine's working copy: ``$XDG_CACHE_HOME/batcher/remote/<hash of the URL>/`` (never the cwd)."""
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:24]
        return cache_root() / digest


def cache_root() -> Path:
    """``$BATCHER_CACHE``, else ``$XDG_CACHE_HOME/batcher/remote`` (``~/.cache`` by default)."""
    explicit = os.environ.get("BATCHER_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "batcher" / "remote"


def parse_output(text: str) -> RemoteOutput | None:
    """The remote output ``text`` names, or None for a local folder; UsageError for a scheme batcher
    cannot write to or a malformed bucket name."""
    match = _SCHEME.match(text)
    if match is None:
        typo = _NEAR_URL.match(text)
        if typo is not None:
            # Else the run writes to a folder named "s3:" here and pays for everything there (found by a newcomer).
            meant = f"{typo[1].lower()}://{text[typo.end() :]}"
            msg = f"--output {text!r} looks like a bucket URL without its //: did you mean {meant}?"
            raise UsageError(msg)
        return None
    scheme = match[1].lower()
    if scheme == "file":
        return None
    if scheme not in ("s3", "gs"):
        msg = (
            f"--output {text!r}: batcher writes to a local folder, s3://bucket/prefix or gs://bucket/prefix, "
            f"not {scheme}://. Other S3-compatible stores (MinIO, R2) work through s3:// with AWS_ENDPOINT_URL "
            "set to their endpoint"
        )
        raise UsageError(msg)
    known: Scheme = "s3" if scheme == "s3" else "gs"
    rest = text[match.end() :]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET[known].fullmatch(bucket):
        allowed = "lowercase letters, digits, dots, dashes" + (", underscores" if known == "gs" else "")
        msg = f"--output {text!r}: {bucket!r} is not a bucket name (3-63 {allowed})"
        raise UsageError(msg)
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        msg = f"--output {text!r}: a prefix with . or .. parts is ambiguous on object storage; spell it plainly"
        raise UsageError(msg)
    return RemoteOutput(bucket, "/".join(parts), known)


class Bucket(Protocol):
    """One client for one output: small PUTs and GETs, listings and large uploads. Thread-safe, so calls run
    on worker threads off the event loop. Every method raises `StorageError` (or UsageError for a setup
    problem), never the SDK's own errors."""

    output: RemoteOutput
    requests: int
    """Calls made (PUT, GET, LIST, DELETE; a multipart or resumable upload counts one): for the cost figures."""

    def check(self) -> None:
        """Make sure the bucket exists and these credentials reach it; UsageError (exit 2) otherwise."""
        ...

    def put(self, relative: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write data under relative; with if_absent, only if no object is there (False when one is: the
        service's precondition refusal, S3's 412 to ``If-None-Match: *``, GCS's 412 to
        ``ifGenerationMatch=0``). The journal's fencing rests on this answer."""
        ...

    def get(self, relative: str, *, max_bytes: int | None = None) -> bytes | None:
        """The object's bytes, or None when there is none; StorageError for one over max_bytes (default
        `MAX_OBJECT_BYTES`: a bucket may hold anything, and what is read into memory is bounded, as every
        network answer is)."""
        ...

    def listing(self, relative: str = "") -> dict[str, int]:
        """Every object under relative (a folder: ``journal/``), as path relative to the output → size."""
        ...

    def subfolders(self, relative: str) -> list[str]:
        """The folders (``shard-1-of-4``) whose names start with relative (``shard-``), without listing what
        is in them: one request where a listing of the objects would page through every image."""
        ...

    def upload(self, local: Path, relative: str) -> None:
        """Upload a local file, once (see `upload` for the retries); past `MULTIPART_THRESHOLD` in parts.
        The object appears only complete."""
        ...

    def delete(self, relatives: list[str]) -> None:
        """Delete these objects; one already gone is no error."""
        ...

    def close(self) -> None:
        """Let the client's connections go."""
        ...

    def __enter__(self) -> Bucket:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def upload(bucket: Bucket, local: Path, relative: str, *, policy: RetryPolicy = UPLOAD_RETRY) -> None:
    """Upload local as relative, trying a transient failure again with backoff (`UPLOAD_RETRY`) before the
    StorageError reaches the run; a refusal (403, no such bucket) is raised at once. Blocking: call it on a
    worker thread."""

    def again(exc: Exception) -> TryAgain | None:
        if isinstance(exc, StorageError) and exc.transient:
            log.warning("object storage: %s (transient)", exc)
            return TryAgain()
        return None

    retrying_blocking(lambda: bucket.upload(local, relative), policy=policy, retry_on=again, name=f"upload {relative}")
