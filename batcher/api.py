"""The synchronous entry point: `batcher.run(...)`."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import anyio

from .errors import UsageError
from .manifest import load_manifest
from .runner import RunOptions, RunSummary, run_manifest
from .sandbox import SandboxConfig

__all__ = ["run"]


def run(manifest: str | Path, *, sandbox: bool | SandboxConfig = False, **options: Any) -> RunSummary:
    """Load, validate and run (or resume) a manifest; blocks until the run ends.

    Keyword arguments are `RunOptions` fields (``output_dir``, ``concurrency``,
    ``retry_failed``, ...). ``sandbox=True`` runs against an in-process
    sandbox with default settings.
    """
    known = {f.name for f in fields(RunOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        msg = f"unknown run option(s): {', '.join(unknown)}"
        raise UsageError(msg)
    if sandbox is True:
        options["sandbox"] = SandboxConfig()
    elif isinstance(sandbox, SandboxConfig):
        options["sandbox"] = sandbox
    if "output_dir" in options and options["output_dir"] is not None:
        options["output_dir"] = Path(options["output_dir"])
    loaded = load_manifest(manifest)
    return anyio.run(run_manifest, loaded, RunOptions(**options))
