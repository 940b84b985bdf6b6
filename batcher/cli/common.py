"""What the commands share besides options: the terminal, logging, where a run's folder is."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

import click
from rich.console import Console

from ..manifest.loader import Manifest, load_manifest
from ..output.folders import default_output_dir, read_folder
from ..output.ledger import noted_buckets, noted_folders
from ..output.remote import pull_view
from ..output.storage import RemoteOutput
from ..printable import printable
from .exits import BadInput

# soft_wrap: long lines stay whole in logs and pipes; terminals wrap them anyway.
stderr = Console(stderr=True, highlight=False, soft_wrap=True)
stdout = Console(highlight=False)


def setup_logging(verbosity: int, quiet: bool) -> None:
    """Warnings (errors only with quiet); from ``-v`` (1) batcher's own lines too, one per API call; from
    ``-vv`` (2) httpx2's and httpcore2's. A bool counts as 0 or 1: ``-v`` as a flag. The token is in none."""
    logging.basicConfig(
        level=logging.ERROR if quiet else logging.WARNING, format="batcher: %(message)s", stream=sys.stderr, force=True
    )
    logging.getLogger("batcher").setLevel(logging.DEBUG if verbosity >= 1 else logging.NOTSET)
    for library in ("httpx2", "httpcore2"):
        logging.getLogger(library).setLevel(logging.DEBUG if verbosity >= 2 else logging.NOTSET)


def point_at_noted_folders(manifest: Manifest, looked_in: Path) -> None:
    """No journal where we looked: say where this manifest's runs are, if the ledger knows."""
    others = [folder for folder in noted_folders(manifest) if folder != looked_in.resolve()]
    rehearsal = default_output_dir(manifest, sandbox=True).resolve()
    # Rehearsals are never noted in the ledger (they charge nothing), so their folder is looked at itself.
    if rehearsal != looked_in.resolve() and (rehearsal in others or read_folder(rehearsal).records):
        command = " ".join(shlex.quote(word) for word in [*this_command(), *sys.argv[1:], "--sandbox"])
        said = f"no journal in {looked_in}; the sandbox rehearsal's is in {rehearsal}: {command}"
        click.echo(printable(said, 2000), err=True)  # the words typed may hold escape sequences
        others = [folder for folder in others if folder != rehearsal]
    places = [str(folder) for folder in others] + [bucket.url for bucket in noted_buckets(manifest)]
    if places:
        shown = ", ".join(places[:5])
        click.echo(f"no journal in {looked_in}; this manifest has runs in: {shown} (use -o)", err=True)


def load_slice(
    manifest: Path,
    schema_dirs: tuple[Path, ...],
    output: Path | RemoteOutput | None,
    shard: tuple[int, int] | None,
    sandbox: bool = False,
) -> tuple[Manifest, Path]:
    """The manifest (or one shard of it) and its output folder."""
    loaded = load_manifest(manifest, schema_dirs)
    if shard:
        loaded = loaded.only_shard(*shard)
    if isinstance(output, RemoteOutput):
        return loaded, pull_view(output, journals_only=True)[0]  # every shard's journal, read from the bucket
    return loaded, output or default_output_dir(loaded, shard, sandbox=sandbox)


def local_only(output: Path | RemoteOutput | None, command: str) -> Path | None:
    """`review` and `export` read images from a local folder (an s3:// or gs:// output is not fetched back)."""
    if isinstance(output, RemoteOutput):
        raise BadInput(
            f"{command} works on a local output folder; {output.url} is in object storage. Copy it down first "
            f"(aws s3 sync {output.url} ./night), then: batcher {command} ... -o ./night"
        )
    return output


def local_folder_with_jobs(
    manifest: Path, schema_dirs: tuple[Path, ...], output: Path | RemoteOutput | None, sandbox: bool, command: str
) -> tuple[Manifest, Path]:
    """The loaded manifest and the local folder `review` and `export` work on; BadInput, saying where this
    manifest's runs are, when that folder holds no journal with jobs."""
    local = local_only(output, command)
    loaded = load_manifest(manifest, schema_dirs)
    output_dir = local or default_output_dir(loaded, sandbox=sandbox)
    if not read_folder(output_dir).records:
        point_at_noted_folders(loaded, output_dir)
        raise BadInput(f"nothing to {command}: no journal with jobs in {output_dir} (run the manifest first)")
    return loaded, output_dir


def this_command() -> list[str]:
    """How batcher was started, so a printed command works as pasted (a venv's batcher is not on PATH)."""
    started = sys.argv[0] if sys.argv else ""
    if started.endswith("__main__.py"):
        return [sys.executable, "-m", "batcher"]
    if os.sep in started and os.path.isfile(started):
        return [os.path.abspath(started)]
    return ["batcher"]
