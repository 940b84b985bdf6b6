"""Where an ``--output`` points: a local folder, or a bucket and prefix on S3-compatible object storage.

`parse_output` turns the text of ``--output`` into a `RemoteOutput` (an
``s3://bucket/prefix`` URL) or None (a local folder, as before). `Bucket` is
the one place batcher talks to object storage, through boto3; every foreign
error becomes ours here: a setup problem (no such bucket, no credentials, an
unknown scheme) is a UsageError (exit 2) and trouble during a run a
`StorageError`, which stops the run like a journal that cannot be written.

Why boto3: it is AWS's own SDK (the longest-lived and most exercised S3
client there is), it reads credentials from exactly the places AWS users
already keep them (environment, ``~/.aws`` profiles, SSO, instance and pod
roles), and speaks conditional PUT (``If-None-Match: *``), on which the
remote journal's fencing rests (`batcher.remote`). Its transfer manager
uploads large files in parts, in parallel. fsspec/s3fs would add an asyncio
layer over aiobotocore (the same botocore underneath) and obstore a younger
Rust client without profile support; for batcher's few, small, latency-bound
journal PUTs the client's speed is not what counts (the round trip is).

Credentials are never read, copied or written by batcher: botocore finds
them, and no message here includes anything but bucket, key and the
service's error code.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import JournalError, UsageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["Bucket", "RemoteOutput", "StorageError", "cache_root", "parse_output"]

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
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
MULTIPART_THRESHOLD = 8 * 1024 * 1024
"""Files past this go up in parts (8 MiB each, four at a time); each object appears only once complete."""


class StorageError(JournalError):
    """Raised when object storage refuses or fails a call during a run: the run stops, as it does when its
    journal cannot be written, so nothing goes unrecorded."""


@dataclass(frozen=True, slots=True)
class RemoteOutput:
    """An output on object storage: ``s3://bucket/prefix``."""

    bucket: str
    prefix: str
    """Without slashes at either end; "" for the bucket's root."""

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, relative: str) -> str:
        """The object key of a path relative to the output (``journal/00000001.jsonl``)."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def child(self, name: str) -> RemoteOutput:
        """The output one level down (a shard's: ``shard-2-of-4``)."""
        return RemoteOutput(self.bucket, self.key(name))

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
        return None
    scheme = match[1].lower()
    if scheme == "file":
        return None
    if scheme != "s3":
        msg = (
            f"--output {text!r}: batcher writes to a local folder or to s3://bucket/prefix, not {scheme}://. "
            "Google Cloud Storage and other S3-compatible stores work through s3:// with AWS_ENDPOINT_URL "
            "set to their S3 endpoint (https://storage.googleapis.com with HMAC keys for GCS)"
        )
        raise UsageError(msg)
    rest = text[match.end() :]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket):
        msg = f"--output {text!r}: {bucket!r} is not a bucket name (3-63 lowercase letters, digits, dots, dashes)"
        raise UsageError(msg)
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        msg = f"--output {text!r}: a prefix with . or .. parts is ambiguous on object storage; spell it plainly"
        raise UsageError(msg)
    return RemoteOutput(bucket, "/".join(parts))


class Bucket:
    """One S3 client for one output: small PUTs and GETs, listings and large uploads. Thread-safe (boto3's
    clients are), so calls run on worker threads off the event loop."""

    def __init__(self, output: RemoteOutput) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:
            msg = "an s3:// output needs boto3: pip install 'batcher[s3]'"
            raise UsageError(msg) from exc
        self.output = output
        self.requests = 0
        """Calls made (PUT, GET, LIST, DELETE; a multipart upload counts one): for the cost figures."""
        config = Config(
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=32,
            user_agent_extra="batcher",
        )
        try:
            self._client: S3Client = boto3.session.Session().client("s3", config=config)
        except Exception as exc:  # botocore's ProfileNotFound, a bad region, an unparsable config file
            msg = f"cannot set up an S3 client for {output.url}: {_said(exc)}"
            raise UsageError(msg) from exc

    def check(self) -> None:
        """Make sure the bucket exists and these credentials reach it; UsageError (exit 2) otherwise."""
        try:
            self._call("head_bucket", Bucket=self.output.bucket)
        except StorageError as exc:
            cause = exc.__cause__
            code = _code(cause)
            if code in ("404", "NoSuchBucket"):
                msg = f"the bucket {self.output.bucket!r} of {self.output.url} does not exist (create it first)"
            elif code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                msg = f"the credentials found cannot reach {self.output.url} ({code}); check AWS_PROFILE or AWS_* variables"
            else:
                msg = str(exc)
            raise UsageError(msg) from exc

    def put(self, relative: str, data: bytes, *, if_absent: bool = False) -> bool:
        """PUT data under relative; with if_absent, only if no object is there (False when one is)."""
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self._call("put_object", Bucket=self.output.bucket, Key=self.output.key(relative), Body=data, **extra)
        except StorageError as exc:
            if if_absent and _code(exc.__cause__) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def get(self, relative: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        try:
            answer = self._call("get_object", Bucket=self.output.bucket, Key=self.output.key(relative))
        except StorageError as exc:
            if _code(exc.__cause__) in ("NoSuchKey", "404"):
                return None
            raise
        body: bytes = answer["Body"].read()
        return body

    def listing(self, relative: str = "") -> dict[str, int]:
        """Every object under relative (a folder: ``journal/``), as path relative to the output → size."""
        start = self.output.key(relative) if relative else (self.output.prefix + "/" if self.output.prefix else "")
        cut = len(self.output.prefix) + 1 if self.output.prefix else 0
        found: dict[str, int] = {}
        token: str | None = None
        while True:
            extra: dict[str, Any] = {"ContinuationToken": token} if token else {}
            page = self._call("list_objects_v2", Bucket=self.output.bucket, Prefix=start, **extra)
            for item in page.get("Contents", []):
                found[item["Key"][cut:]] = item["Size"]
            if not page.get("IsTruncated"):
                return found
            token = page["NextContinuationToken"]

    def upload(self, local: Path, relative: str) -> None:
        """Upload a local file; past `MULTIPART_THRESHOLD` in parts. The object appears only complete."""
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD, max_concurrency=4
        )
        content_type = _CONTENT_TYPES.get(os.path.splitext(relative)[1].lower())
        extra = {"ContentType": content_type} if content_type else None
        self.requests += 1
        try:
            self._client.upload_file(
                str(local), self.output.bucket, self.output.key(relative), ExtraArgs=extra, Config=config
            )
        except Exception as exc:
            msg = f"cannot upload {relative} to {self.output.url}: {_said(exc)}"
            raise StorageError(msg) from exc

    def delete(self, relatives: list[str]) -> None:
        for start in range(0, len(relatives), 1000):
            objects: Any = [{"Key": self.output.key(r)} for r in relatives[start : start + 1000]]
            self._call("delete_objects", Bucket=self.output.bucket, Delete={"Objects": objects, "Quiet": True})

    def close(self) -> None:
        """Let the client's connections go."""
        self._client.close()

    def __enter__(self) -> Bucket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, operation: str, **arguments: Any) -> Any:
        self.requests += 1
        try:
            return getattr(self._client, operation)(**arguments)
        except Exception as exc:  # botocore's ClientError, NoCredentialsError, EndpointConnectionError, …
            where = arguments.get("Key", arguments.get("Prefix", ""))
            msg = f"object storage refused {operation} of {self.output.bucket}/{where}: {_said(exc)}"
            if _code(exc) == "NoCredentials":
                msg = (
                    f"no credentials for {self.output.url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    "or AWS_PROFILE, or run where an instance or pod role applies"
                )
                raise UsageError(msg) from exc
            raise StorageError(msg) from exc


def _code(exc: BaseException | None) -> str:
    """The service's error code (``NoSuchBucket``, ``PreconditionFailed``, ``404``), or the exception's name."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    name = type(exc).__name__
    return "NoCredentials" if name in ("NoCredentialsError", "PartialCredentialsError") else name


def _said(exc: BaseException) -> str:
    """What went wrong, in the service's words: its code and message (never a request's headers)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        return f"{error.get('Code', '?')}: {error.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"
