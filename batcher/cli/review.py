"""`batcher review`: the local page to accept or reject every image."""

from __future__ import annotations

from pathlib import Path

import click
import cloup

from ..manifest.loader import load_manifest
from ..output.folders import (
    default_output_dir,
    read_folder,
)
from ..output.storage import RemoteOutput
from ..review.server import DEFAULT_PORT, ReviewServer
from .common import (
    local_only,
    point_at_noted_folders,
)
from .exits import BadInput
from .options import (
    manifest_argument,
    output_option,
    sandbox_folder_option,
)


@cloup.command()
@manifest_argument
@output_option
@sandbox_folder_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address to listen on.")
@click.option(
    "-p",
    "--port",
    type=click.IntRange(0, 65535),
    help=f"Port to listen on [default: {DEFAULT_PORT}, or any free one when it is taken; 0: any free one].",
)
def review(
    manifest: Path,
    schema_dirs: tuple[Path, ...],
    output: Path | RemoteOutput | None,
    sandbox: bool,
    host: str,
    port: int | None,
) -> None:
    """Serve a page on loopback to accept or reject every image, beside its inputs. No network but inputs.

    Prints the address (with this session's token) and opens nothing. Keys:
    j/k (or the arrows) move, a accept, r reject, x undo, u undecided only,
    o open the image. Decisions go to
    decisions.jsonl in the output folder and survive reruns; `run
    --replace-rejected` then makes a new generation for each rejected image,
    and `export --accepted-only` hands the rest on.
    """
    local = local_only(output, "review")
    loaded = load_manifest(manifest, schema_dirs)
    output_dir = local or default_output_dir(loaded, sandbox=sandbox)
    if not read_folder(output_dir).records:
        point_at_noted_folders(loaded, output_dir, "review")
        raise BadInput(f"nothing to review: no journal with jobs in {output_dir} (run the manifest first)")
    try:
        server = ReviewServer(loaded, output_dir, host=host, port=DEFAULT_PORT if port is None else port).start()
    except OSError as exc:
        if port is not None:
            raise BadInput(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        server = ReviewServer(loaded, output_dir, host=host, port=0).start()  # the default port is taken
    click.echo(f"review: {server.url}", err=True)
    click.echo(
        "review: open that address in a browser; Ctrl-C to stop (decisions are saved as they are made)", err=True
    )
    try:
        server.wait()
    except KeyboardInterrupt:
        click.echo("review: stopped", err=True)
    finally:
        server.stop()
