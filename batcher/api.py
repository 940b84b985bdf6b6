"""The library's entry points: `batcher.run(...)` (synchronous) and `run_manifest` / `cancel_manifest` (async).

They are the engine's own, with the one thing the engine cannot do itself: it
never imports the sandbox, so a rehearsal (``RunOptions(sandbox=True)``) gets
its default sandbox here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio

from .engine import runner
from .engine.options import check_option_names
from .engine.progress import RunProgress
from .engine.runner import CancelSummary, RunOptions, RunPlan, RunSummary
from .journal.store import FoldedJournal
from .manifest.loader import Manifest, load_manifest
from .output.remote import StoredFiles
from .reports.gallery import write_gallery
from .sandbox.server import SandboxConfig

__all__ = ["cancel_manifest", "run", "run_manifest"]


def _with_sandbox(options: RunOptions | None) -> RunOptions | None:
    """options, its sandbox settings filled in when it asks for a sandbox without them."""
    if options is not None and options.sandbox and options.sandbox_config is None:
        options = replace(options, sandbox_config=SandboxConfig())
    return options


async def run_manifest(
    manifest: Manifest,
    options: RunOptions | None = None,
    *,
    on_start: Callable[[RunProgress], None] | None = None,
    on_plan: Callable[[RunPlan], None] | None = None,
) -> RunSummary:
    """Run (or resume) every job of manifest: `batcher.engine.runner.run_manifest`, sandbox included, ending
    with the gallery (``index.html``) written in its folder (`RunSummary.gallery`)."""
    return await runner.run_manifest(
        manifest, _with_sandbox(options), on_start=on_start, on_plan=on_plan, gallery=_write_gallery
    )


def _write_gallery(manifest: Manifest, output_dir: Path, folded: FoldedJournal, files: StoredFiles | None) -> Path:
    """A run's gallery (`batcher.reports.gallery`); a bucket's names the manifest by its file name only,
    as `batcher report` writes it: a page in a bucket may be served to others."""
    shown = manifest.path.name if files is not None else None
    return write_gallery(manifest, output_dir, folded, files, manifest_shown=shown)


async def cancel_manifest(manifest: Manifest, options: RunOptions | None = None) -> CancelSummary:
    """Cancel every job of manifest still cancellable: `batcher.engine.runner.cancel_manifest`, sandbox included."""
    return await runner.cancel_manifest(manifest, _with_sandbox(options))


def run(
    manifest: str | Path,
    *,
    sandbox: bool | SandboxConfig = False,
    schemas: Sequence[str | Path] = (),
    **options: Any,
) -> RunSummary:
    """Load, validate and run (or resume) a manifest; blocks until the run ends.

    Keyword arguments are `RunOptions` fields, named as `batcher run`'s flags
    (``output_dir``, ``concurrency``, ``retry_failed``, ``poll_interval``,
    ``timeout``, ``shard="1/4"``, ...); an unknown one is a UsageError naming
    the likely one meant. ``sandbox=True`` runs against an
    in-process sandbox with default settings; ``schemas`` are folders of
    model schemas searched before the bundled ones.
    """
    check_option_names(options)  # before the manifest is read: a misspelt name is the first thing to fix
    loaded = load_manifest(manifest, [Path(folder) for folder in schemas])
    if sandbox is True:
        options.update(sandbox=True, sandbox_config=SandboxConfig(schema_dirs=loaded.schema_dirs))
    elif isinstance(sandbox, SandboxConfig):
        options.update(sandbox=True, sandbox_config=sandbox)
    if "output_dir" in options and options["output_dir"] is not None:
        options["output_dir"] = Path(options["output_dir"])
    return anyio.run(run_manifest, loaded, RunOptions(**options))
