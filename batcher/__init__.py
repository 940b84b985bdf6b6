"""batcher: large, resumable batches of image generations on RunComfy's Model API.

The library is the product; the ``batcher`` command is one consumer of it::

    import batcher

    summary = batcher.run("manifests/london.yaml", sandbox=True)
    print(summary.done, "of", summary.total, "done")
"""

from __future__ import annotations

from ._version import __version__
from .api import cancel_manifest, run, run_manifest
from .engine.runner import RunOptions, RunSummary
from .errors import (
    ApiError,
    ApiValidationError,
    AuthError,
    BalanceError,
    BatcherError,
    DownloadError,
    JournalCorruptError,
    JournalError,
    JournalLockedError,
    ManifestError,
    OutputFolderError,
    RequestGoneError,
    TransientApiError,
    UncertainSubmitError,
    UsageError,
)
from .journal.store import read_journal
from .manifest.loader import Job, Manifest, load_manifest
from .runcomfy.client import RetryPolicy, RunComfyClient
from .sandbox import Sandbox, SandboxConfig, SandboxThread

__all__ = [
    "ApiError",
    "ApiValidationError",
    "AuthError",
    "BalanceError",
    "BatcherError",
    "DownloadError",
    "Job",
    "JournalCorruptError",
    "JournalError",
    "JournalLockedError",
    "Manifest",
    "ManifestError",
    "OutputFolderError",
    "RequestGoneError",
    "RetryPolicy",
    "RunComfyClient",
    "RunOptions",
    "RunSummary",
    "Sandbox",
    "SandboxConfig",
    "SandboxThread",
    "TransientApiError",
    "UncertainSubmitError",
    "UsageError",
    "__version__",
    "cancel_manifest",
    "load_manifest",
    "read_journal",
    "run",
    "run_manifest",
]
