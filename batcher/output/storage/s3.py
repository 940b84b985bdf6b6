"""An ``s3://`` output: `batcher.output.storage.bucket.Bucket` on Amazon S3 and S3-compatible stores, through boto3.

Why boto3: it is AWS's own SDK (the longest-lived and most exercised S3
client there is), it reads credentials from exactly the places AWS users
already keep them (environment, ``~/.aws`` profiles, SSO, instance and pod
roles), and speaks conditional PUT (``If-None-Match: *``), on which the
remote journal's fencing rests (`batcher.output.remote`). Its transfer manager
uploads large files in parts, in parallel. fsspec/s3fs would add an asyncio
layer over aiobotocore (the same botocore underneath) and obstore a younger
Rust client without profile support; for batcher's few, small, latency-bound
journal PUTs the client's speed is not what counts (the round trip is).

botocore retries each request itself (5 retries, or ``AWS_MAX_ATTEMPTS``
tries when set); `batcher.output.storage.bucket.upload` adds its own tries around a whole upload.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import StorageError, UsageError, missing_package
from .bucket import MAX_OBJECT_BYTES, MULTIPART_THRESHOLD, Bucket, RemoteOutput, content_type, too_large

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["S3Bucket"]

_THROTTLED = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError"})
_REFUSED = frozenset({"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"})


class S3Bucket(Bucket):
    """One S3 client for one output. Thread-safe (boto3's clients are)."""

    def __init__(self, output: RemoteOutput) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:
            raise missing_package("an s3:// output", "boto3", "s3") from exc
        self.output = output
        self.requests = 0
        # Five retries after the first try; AWS_MAX_ATTEMPTS (botocore's own variable, counting every try) wins
        # when set, as a Config given in code would otherwise override it.
        attempts = os.environ.get("AWS_MAX_ATTEMPTS", "")
        tries = {"total_max_attempts": int(attempts)} if attempts.isdigit() else {"max_attempts": 5}
        retries: Any = {**tries, "mode": "standard"}
        config = Config(
            retries=retries,
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
        try:
            self._call("head_bucket", Bucket=self.output.bucket)
        except StorageError as exc:
            cause = exc.__cause__
            code = _code(cause)
            if code in ("404", "NoSuchBucket"):
                msg = f"the bucket {self.output.bucket!r} of {self.output.url} does not exist (create it first)"
            elif code in _REFUSED:
                msg = f"the credentials found cannot reach {self.output.url} ({code}); check AWS_PROFILE or AWS_* variables"
            else:
                msg = str(exc)
            raise UsageError(msg) from exc

    def put(self, relative: str, data: bytes, *, if_absent: bool = False) -> bool:
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self._call("put_object", Bucket=self.output.bucket, Key=self.output.key(relative), Body=data, **extra)
        except StorageError as exc:
            if if_absent and _code(exc.__cause__) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def get(self, relative: str, *, max_bytes: int | None = None) -> bytes | None:
        max_bytes = MAX_OBJECT_BYTES if max_bytes is None else max_bytes
        try:
            answer = self._call("get_object", Bucket=self.output.bucket, Key=self.output.key(relative))
        except StorageError as exc:
            if _code(exc.__cause__) in ("NoSuchKey", "404"):
                return None
            raise
        stream = answer["Body"]
        try:
            if int(answer.get("ContentLength") or 0) > max_bytes:
                raise too_large(self.output, relative, int(answer["ContentLength"]), max_bytes)
            body: bytes = stream.read(max_bytes + 1)  # a length that lied is caught here
        finally:
            stream.close()
        if len(body) > max_bytes:
            raise too_large(self.output, relative, len(body), max_bytes)
        return body

    def listing(self, relative: str = "") -> dict[str, int]:
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

    def subfolders(self, relative: str) -> list[str]:
        start = self.output.key(relative)
        cut = len(self.output.prefix) + 1 if self.output.prefix else 0
        found: list[str] = []
        token: str | None = None
        while True:
            extra: dict[str, Any] = {"ContinuationToken": token} if token else {}
            page = self._call("list_objects_v2", Bucket=self.output.bucket, Prefix=start, Delimiter="/", **extra)
            found += [item["Prefix"][cut:].rstrip("/") for item in page.get("CommonPrefixes", [])]
            if not page.get("IsTruncated"):
                return found
            token = page["NextContinuationToken"]

    def upload(self, local: Path, relative: str) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD, max_concurrency=4
        )
        kind = content_type(relative)
        extra = {"ContentType": kind} if kind else None
        self.requests += 1
        try:
            self._client.upload_file(
                str(local), self.output.bucket, self.output.key(relative), ExtraArgs=extra, Config=config
            )
        except Exception as exc:
            # boto3 wraps a ClientError in S3UploadFailedError, raised inside its except block: the code is there.
            service = exc.__context__ if type(exc).__name__ == "S3UploadFailedError" and exc.__context__ else exc
            code = _code(service)
            msg = f"cannot upload {relative} to {self.output.url}: {_said(service)}"
            if code in _REFUSED:
                msg += " (the credentials found may not write there: check AWS_PROFILE or AWS_* variables)"
            elif code == "NoSuchBucket":
                msg += f" (the bucket {self.output.bucket!r} is gone)"
            raise StorageError(msg, transient=_transient(service)) from exc

    def delete(self, relatives: list[str]) -> None:
        for start in range(0, len(relatives), 1000):
            objects: Any = [{"Key": self.output.key(r)} for r in relatives[start : start + 1000]]
            self._call("delete_objects", Bucket=self.output.bucket, Delete={"Objects": objects, "Quiet": True})

    def close(self) -> None:
        self._client.close()

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
            raise StorageError(msg, transient=_transient(exc)) from exc


def _transient(exc: BaseException | None) -> bool:
    """True for what another try may mend: a 5xx or throttle answer, a connection reset or timed out."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    if isinstance(exc, BotoConnectionError | HTTPClientError):  # refused, reset, timed out, closed mid-answer
        return True
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return bool(status >= 500 or status == 429 or _code(exc) in _THROTTLED)
    return False


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
