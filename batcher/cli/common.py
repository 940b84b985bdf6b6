"""What the commands share besides options: the terminal, logging, where a run's folder is."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import click
from rich.console import Console

from ..journal.store import JOURNAL_NAME
from ..manifest.loader import Manifest, load_manifest
from ..output.folders import default_output_dir, read_folder, shard_folders
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


def point_at_noted_folders(
    manifest: Manifest, looked_in: Path, command: str = "status", extra: Sequence[str] = ()
) -> None:
    """No journal where we looked: say where this manifest's runs are (its sandbox rehearsal's folder, and the
    folders the ledger notes), each with the whole command that reads it: ``batcher <command> MANIFEST
    <extra> --sandbox``. A rehearsal is never noted in the ledger, so its folder is looked at itself."""
    here = looked_in.resolve()
    others = [folder for folder in noted_folders(manifest) if folder != here]
    rehearsal = default_output_dir(manifest, sandbox=True).resolve()
    if rehearsal != here and (rehearsal in others or holds_journal(rehearsal)):
        words = [*this_command(), command, str(manifest.path), *extra, "--sandbox"]
        said = f"no journal in {looked_in}; the sandbox rehearsal's is in {rehearsal}: {shlex.join(words)}"
        click.echo(printable(said, 2000), err=True)  # a path may hold escape sequences
    others = [folder for folder in others if folder != rehearsal]
    places = [str(folder) for folder in others] + [bucket.url for bucket in noted_buckets(manifest)]
    if places:
        shown = ", ".join(places[:5])
        click.echo(f"no journal in {looked_in}; this manifest has runs in: {shown} (use -o)", err=True)


def holds_journal(folder: Path) -> bool:
    """A journal in folder itself or in one of its shard folders (shard-K-of-N/)."""
    return any((place / JOURNAL_NAME).is_file() for place in [folder, *shard_folders(folder)])


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
    manifest: Path,
    schema_dirs: tuple[Path, ...],
    output: Path | RemoteOutput | None,
    sandbox: bool,
    command: str,
    extra: Sequence[str] = (),
) -> tuple[Manifest, Path]:
    """The loaded manifest and the local folder `review` and `export` work on; BadInput, saying where this
    manifest's runs are, when that folder holds no journal with jobs."""
    local = local_only(output, command)
    loaded = load_manifest(manifest, schema_dirs)
    output_dir = local or default_output_dir(loaded, sandbox=sandbox)
    if not read_folder(output_dir).records:
        point_at_noted_folders(loaded, output_dir, command, extra)
        raise BadInput(f"nothing to {command}: no journal with jobs in {output_dir} (run the manifest first)")
    return loaded, output_dir


def run_command(
    manifest: Path,
    output: Path | RemoteOutput | None,
    *,
    sandbox: bool = False,
    schema_dirs: Sequence[Path] = (),
    shard: tuple[int, int] | None = None,
) -> str:
    """The whole `batcher run` command for this manifest and folder, as a hint prints it (a flag is added to it)."""
    words = [*this_command(), "run", str(manifest)]
    if output is not None:
        words += ["-o", output.url if isinstance(output, RemoteOutput) else str(output)]
    for folder in schema_dirs:
        words += ["--schemas", str(folder)]
    if sandbox:
        words.append("--sandbox")
    if shard:
        words += ["--shard", f"{shard[0]}/{shard[1]}"]
    return shlex.join(words)


def this_command() -> list[str]:
    """How batcher was started, so a printed command works as pasted (a venv's batcher is not on PATH)."""
    started = sys.argv[0] if sys.argv else ""
    if started.endswith("__main__.py"):
        return [sys.executable, "-m", "batcher"]
    if os.sep in started and os.path.isfile(started):
        return [os.path.abspath(started)]
    return ["batcher"]
