"""`batcher report` (gallery and metadata) and `batcher export` (a dataset)."""

from __future__ import annotations

from pathlib import Path

import click
import cloup

from ..journal.store import FoldedJournal
from ..manifest.loader import Manifest, load_manifest
from ..output.dataset import METADATA_NAME, write_metadata
from ..output.folders import (
    read_folder,
)
from ..output.remote import StoredFiles, pull_view
from ..output.storage import RemoteOutput, open_bucket, upload
from ..reports.export import DEFAULT_SHARD_SIZE, FORMATS, ExportFormat, export_dataset
from ..reports.gallery import GALLERY_NAME, write_gallery
from ..review.replacements import with_replacements
from .common import (
    load_slice,
    local_folder_with_jobs,
    point_at_noted_folders,
)
from .exits import BadInput, Failed
from .options import (
    manifest_argument,
    output_option,
    sandbox_folder_option,
    shard_option,
)


@cloup.command()
@manifest_argument
@output_option
@shard_option
@sandbox_folder_option
def report(
    manifest: Path,
    schema_dirs: tuple[Path, ...],
    output: Path | RemoteOutput | None,
    shard: tuple[int, int] | None,
    sandbox: bool,
) -> None:
    """Write the gallery (index.html) and the dataset's metadata.jsonl. No network but an s3:// or gs:// output's bucket.

    Shard folders (shard-K-of-N/) inside the output folder are summed in.
    """
    if isinstance(output, RemoteOutput):
        _remote_report(load_manifest(manifest, schema_dirs), output)
        return
    loaded, output_dir = load_slice(manifest, schema_dirs, output, shard, sandbox)
    view = read_folder(output_dir)
    folded = FoldedJournal(records=view.records, headers=view.headers, warnings=view.warnings)
    if not folded.records:
        point_at_noted_folders(loaded, output_dir, "report")
        raise BadInput(f"nothing to report: no journal with jobs in {output_dir} (run the manifest first)")
    loaded = with_replacements(loaded, output_dir, view=view)
    try:
        rows = write_metadata(loaded, output_dir, folded.records)
        page = write_gallery(loaded, output_dir, folded)
    except OSError as exc:
        raise Failed(f"cannot write the report into {output_dir}: {exc.strerror or exc}") from exc
    click.echo(f"gallery: {page}")
    click.echo(f"dataset: {output_dir / METADATA_NAME} ({rows} images)")
    click.echo(f'  load it: datasets.load_dataset("imagefolder", data_dir="{output_dir}")')


def _remote_report(loaded: Manifest, output: RemoteOutput) -> None:
    """`report` for an s3:// or gs:// output: every shard's journal summed, the gallery and metadata.jsonl written at the
    output's top, beside the shard folders they link into."""
    output_dir, listing = pull_view(output)
    view = read_folder(output_dir)
    folded = FoldedJournal(records=view.records, headers=view.headers, warnings=view.warnings)
    if not folded.records:
        raise BadInput(f"nothing to report: no journal with jobs in {output.url} (run the manifest first)")
    with StoredFiles(output_dir, listing) as files:
        rows = write_metadata(loaded, output_dir, folded.records, files)
    with StoredFiles(output_dir, listing) as files:
        # The file's name only: a page in a bucket may be served to others, and this machine's paths are its own.
        write_gallery(loaded, output_dir, folded, files, manifest_shown=loaded.path.name)
    with open_bucket(output) as bucket:
        for name in (METADATA_NAME, GALLERY_NAME):
            upload(bucket, output_dir / name, name)
    click.echo(f"gallery: {output.url}/{GALLERY_NAME}")
    click.echo(f"dataset: {output.url}/{METADATA_NAME} ({rows} images)")


@cloup.command()
@manifest_argument
@click.argument("dest", type=click.Path(path_type=Path, file_okay=False))
@output_option
@sandbox_folder_option
@click.option(
    "-f",
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="imagefolder",
    show_default=True,
    help="imagefolder: images and metadata.jsonl; webdataset: tar shards; parquet: images embedded.",
)
@click.option("--accepted-only", is_flag=True, help="Only the images accepted in `batcher review`.")
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=DEFAULT_SHARD_SIZE,
    show_default=True,
    help="Images per WebDataset tar shard or Parquet file.",
)
def export(
    manifest: Path,
    dest: Path,
    schema_dirs: tuple[Path, ...],
    output: Path | RemoteOutput | None,
    sandbox: bool,
    fmt: ExportFormat,
    accepted_only: bool,
    shard_size: int,
) -> None:
    """Write the run's images to DEST (a new folder) as a dataset, with their prompts and provenance. No network.

    Every row carries the image's review decision; --accepted-only keeps the
    accepted ones. Shard folders (shard-K-of-N/) inside the output folder are summed in.
    """
    loaded, output_dir = local_folder_with_jobs(manifest, schema_dirs, output, sandbox, "export", [str(dest)])
    summary = export_dataset(loaded, output_dir, dest, fmt, accepted_only=accepted_only, shard_size=shard_size)
    for reason in summary.skipped:
        click.echo(f"warning: left out {reason}", err=True)
    files = f"{len(summary.files)} file(s)" if fmt != "imagefolder" else "images and metadata.jsonl"
    click.echo(f"{fmt}: {summary.images} images in {summary.dest} ({files})")
    click.echo(f"  load it: {_LOADERS[fmt].format(dest=summary.dest, last=len(summary.files) - 1)}")


_LOADERS: dict[str, str] = {
    "imagefolder": 'datasets.load_dataset("imagefolder", data_dir="{dest}")',
    "webdataset": 'webdataset.WebDataset("{dest}/shard-{{000000..{last:06d}}}.tar").decode("pil")',
    "parquet": 'datasets.load_dataset("parquet", data_dir="{dest}")',
}
