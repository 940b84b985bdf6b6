"""`batcher cancel`: cancel the jobs still queued at RunComfy."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import click
import cloup

from ..api import cancel_manifest
from ..engine.runner import RunOptions
from ..manifest.loader import load_manifest
from ..output.folders import default_output_dir
from ..output.storage import RemoteOutput
from ..printable import counted
from ..sandbox.server import SandboxConfig
from .common import holds_journal, point_at_noted_folders
from .exits import EXIT_FAILED, BadInput
from .options import (
    api_base_option,
    manifest_argument,
    output_option,
    shard_option,
)


@cloup.command()
@manifest_argument
@output_option
@api_base_option
@click.option("--sandbox", is_flag=True, help="Cancel against the in-process sandbox.")
@shard_option
def cancel(
    manifest: Path,
    schema_dirs: tuple[Path, ...],
    output: Path | RemoteOutput | None,
    api_base: str | None,
    sandbox: bool,
    shard: tuple[int, int] | None,
) -> None:
    """Cancel this manifest's jobs that are queued at RunComfy (running ones cannot be)."""
    loaded = load_manifest(manifest, schema_dirs)
    if output is None and not sandbox:
        # Before any token is asked for: after a rehearsal, this folder is empty and the rehearsal's is not.
        looked_in = default_output_dir(loaded, shard)
        if not holds_journal(looked_in) and holds_journal(default_output_dir(loaded, sandbox=True)):
            point_at_noted_folders(loaded, looked_in, "cancel")
            raise BadInput(f"nothing to cancel: no journal in {looked_in}")
    options = RunOptions(
        output_dir=output if isinstance(output, Path) else None,
        remote=output if isinstance(output, RemoteOutput) else None,
        api_base=api_base,
        sandbox=sandbox,
        sandbox_config=SandboxConfig(schema_dirs=loaded.schema_dirs) if sandbox else None,
        shard=shard,
    )
    summary = anyio.run(cancel_manifest, loaded, options)
    click.echo(f"cancelled {counted(len(summary.cancelled), 'job')}")
    for name, state in summary.not_cancellable:
        click.echo(f"  {name}: not cancellable ({state})")
    for name, error in summary.errors:
        click.echo(f"  {name}: {error}", err=True)
    if summary.errors:
        sys.exit(EXIT_FAILED)
