"""Object storage for a run's output: one `Bucket` interface, an implementation per store.

`bucket` holds what every store shares (the parsed ``s3://``/``gs://`` URL, the
`Bucket` protocol, uploads with retries, content types); `s3` (boto3) and `gcs`
(google-cloud-storage) implement it; `open_bucket` picks one by scheme, importing
its SDK only then (both are optional extras). The `httpx._transports` pattern.
"""

from __future__ import annotations

from .bucket import Bucket, RemoteOutput, parse_output, upload

__all__ = ["Bucket", "RemoteOutput", "open_bucket", "parse_output", "upload"]


def open_bucket(output: RemoteOutput) -> Bucket:
    """The client for output's store; UsageError when its SDK is not installed or cannot be set up."""
    if output.scheme == "gs":
        from .gcs import GcsBucket

        return GcsBucket(output)
    from .s3 import S3Bucket

    return S3Bucket(output)
