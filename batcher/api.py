"""The synchronous entry point: `batcher.run(...)`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import anyio

from .engine.runner import RunOptions, RunSummary, run_manifest
from .errors import UsageError
from .manifest.loader import load_manifest
from .sandbox.server import SandboxConfig

__all__ = ["run"]


def run(
    manifest: str | Path,
    *,
    sandbox: bool | SandboxConfig = False,
    schemas: Sequence[str | Path] = (),
    **options: Any,
) -> RunSummary:
    """Load, validate and run (or resume) a manifest; blocks until the run ends.

    Keyword arguments are `RunOptions` fields (``output_dir``, ``concurrency``,
    ``retry_failed``, ``shard=(1, 4)``, ...). ``sandbox=True`` runs against an
    in-process sandbox with default settings; ``schemas`` are folders of
    model schemas searched before the bundled ones.
    """
    known = {f.name for f in fields(RunOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        msg = f"unknown run option(s): {', '.join(unknown)}"
        raise UsageError(msg)
    loaded = load_manifest(manifest, [Path(folder) for folder in schemas])
    if sandbox is True:
        options.update(sandbox=True, sandbox_config=SandboxConfig(schema_dirs=loaded.schema_dirs))
    elif isinstance(sandbox, SandboxConfig):
        options.update(sandbox=True, sandbox_config=sandbox)
    if "output_dir" in options and options["output_dir"] is not None:
        options["output_dir"] = Path(options["output_dir"])
    return anyio.run(run_manifest, loaded, RunOptions(**options))
