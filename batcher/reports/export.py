"""``batcher export``: the run's images as a dataset in the format a training script reads.

Three formats behind one function, `export_dataset`, each written from the
same rows (`batcher.output.dataset`: the images whose download is journalled, with
their prompt, inputs, parameters and provenance) plus each image's review
``decision``; ``--accepted-only`` keeps the accepted ones:

imagefolder  DEST/metadata.jsonl and the images under their folder's relative paths
             (``datasets.load_dataset("imagefolder", data_dir=DEST)``)
webdataset   DEST/shard-000000.tar, …: per sample ``<key>.<png|jpg|webp>`` and ``<key>.json`` (the row),
             the key ``<job key>_<output index>``; ``shard_size`` samples a shard. Written with the
             stdlib's tarfile (ustar, sorted, fixed owner and time: the same images give the same bytes)
parquet      DEST/train-00000-of-0000N.parquet: the row's columns and ``image``, a struct of the file's
             bytes and path with Hugging Face's features in the schema's metadata, so ``datasets``
             reads it as an ``Image`` column; ``parameters`` is a JSON string (jobs of several models
             have parameters of different types, which one Arrow struct cannot hold). Needs pyarrow
             (``pip install -e '.[parquet]'`` in the checkout)

Every image is read from the output folder without following a link and
checked against the sha256 its download recorded: a file changed since is
left out, with a warning, rather than exported under another image's
metadata. The dataset is built in a hidden folder beside DEST and renamed
into place at the end, so DEST never holds half an export; an existing,
non-empty DEST is refused.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import secrets
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

from ..confined import open_journalled
from ..errors import OutputFolderError, UsageError, missing_package
from ..journal.standing import opened
from ..manifest.loader import Manifest
from ..output.dataset import METADATA_NAME, DatasetImage, completed_in, dataset_images, row_of
from ..output.folders import read_folder
from ..review.decisions import Decisions, read_decisions
from ..review.replacements import decisions_folder, with_replacements

__all__ = ["FORMATS", "ExportFormat", "ExportSummary", "export_dataset"]

ExportFormat = Literal["imagefolder", "webdataset", "parquet"]
FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)
DEFAULT_SHARD_SIZE = 1000
_ROW_GROUP = 64
"""Parquet rows per row group: images are large, and a reader holds one group at a time."""


@dataclass(slots=True)
class ExportSummary:
    """What `export_dataset` wrote."""

    format: ExportFormat
    dest: Path
    images: int = 0
    files: list[Path] = field(default_factory=list)
    """The shards (webdataset, parquet) or metadata.jsonl (imagefolder)."""
    skipped: list[str] = field(default_factory=list)
    """Images left out, and why (a file changed since its download)."""


@dataclass(frozen=True, slots=True)
class _Sample:
    row: dict[str, Any]
    data: bytes


def export_dataset(
    manifest: Manifest,
    output_dir: Path,
    dest: Path,
    fmt: ExportFormat,
    *,
    accepted_only: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> ExportSummary:
    """Write the images of output_dir (its shards summed, rejected images' replacements included) to dest.

    Raises UsageError for a bad format or shard size, a non-empty dest, no
    images to export, or pyarrow missing for parquet; OutputFolderError when
    dest cannot be written.
    """
    if fmt not in FORMATS:
        msg = f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}"
        raise UsageError(msg)
    if shard_size < 1:
        msg = "--shard-size must be at least 1"
        raise UsageError(msg)
    writer = _WRITERS[fmt]
    if fmt == "parquet":
        _pyarrow()  # before any work: say what to install
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        msg = f"{dest} already exists and is not an empty folder; give a new one"
        raise UsageError(msg)
    view = read_folder(output_dir)
    decisions = read_decisions(decisions_folder(output_dir))
    manifest = with_replacements(manifest, output_dir, view=view)
    with opened(output_dir) as folder:
        images = [
            image
            for image in dataset_images(manifest.jobs_through(completed_in(view.records)), view.records, folder)
            if not accepted_only or _decision(image, decisions) == "accepted"
        ]
    if not images:
        what = "accepted images (review them first: batcher review)" if accepted_only else "downloaded images"
        msg = f"nothing to export: no {what} in {output_dir}"
        raise UsageError(msg)
    summary = ExportSummary(fmt, dest)
    staging = dest.parent / f".{dest.name}.partial-{secrets.token_hex(4)}"
    try:
        staging.mkdir(parents=True)
        samples = _samples(images, output_dir, decisions, summary)
        names = writer(samples, staging, shard_size, len(images))
        if dest.exists():
            dest.rmdir()  # empty, checked above
        os.rename(staging, dest)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        msg = f"cannot write {dest}: {exc.strerror or exc}"
        raise OutputFolderError(msg) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary.files = [dest / name for name in names]
    return summary


def _decision(image: DatasetImage, decisions: Decisions) -> str:
    return decisions.of(image.job.key, image.index, image.file.sha256)


def _samples(
    images: list[DatasetImage], output_dir: Path, decisions: Decisions, summary: ExportSummary
) -> Iterator[_Sample]:
    """Each image's row and bytes, read without links and checked against its recorded sha256."""
    for image in images:
        fd = open_journalled(output_dir, image.file.path)
        if fd is None:
            summary.skipped.append(f"{image.file.path}: gone since it was listed")
            continue
        with open(fd, "rb") as handle:
            data = handle.read()
        if hashlib.sha256(data).hexdigest() != image.file.sha256:
            summary.skipped.append(f"{image.file.path}: its content changed since it was downloaded")
            continue
        summary.images += 1
        yield _Sample(row_of(image) | {"decision": _decision(image, decisions)}, data)


# -- imagefolder ---------------------------------------------------------------------------------


def _write_imagefolder(samples: Iterator[_Sample], staging: Path, shard_size: int, total: int) -> list[str]:
    lines = []
    for sample in samples:
        target = staging.joinpath(*PurePosixPath(sample.row["file_name"]).parts)  # sound: dataset_images checked it
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(sample.data)
        lines.append(json.dumps(sample.row, ensure_ascii=False) + "\n")
    (staging / METADATA_NAME).write_text("".join(lines), encoding="utf-8")
    return [METADATA_NAME]


# -- webdataset ----------------------------------------------------------------------------------


def _sample_key(row: dict[str, Any]) -> str:
    """A WebDataset key: no dot (the format splits the key from the extension at the first one)."""
    return f"{row['job_key']}_{row['output_index']}"


def _extension(file_name: str) -> str:
    suffix = PurePosixPath(file_name).suffix.lower().lstrip(".")
    return {"jpeg": "jpg"}.get(suffix, suffix) or "png"


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # the same images give the same shard, byte for byte
    info.uname = info.gname = ""
    archive.addfile(info, io.BytesIO(data))


def _chunks(samples: Iterator[_Sample], size: int) -> Iterator[list[_Sample]]:
    """samples in lists of size (the last one shorter), read as they are written: one shard in memory at most."""
    while chunk := list(itertools.islice(samples, size)):
        yield chunk


def _write_webdataset(samples: Iterator[_Sample], staging: Path, shard_size: int, total: int) -> list[str]:
    names: list[str] = []
    for chunk in _chunks(samples, shard_size):
        names.append(f"shard-{len(names):06d}.tar")
        with tarfile.open(staging / names[-1], "w", format=tarfile.USTAR_FORMAT) as archive:
            for sample in chunk:
                key = _sample_key(sample.row)
                _add(archive, f"{key}.{_extension(sample.row['file_name'])}", sample.data)
                _add(archive, f"{key}.json", json.dumps(sample.row, ensure_ascii=False, sort_keys=True).encode())
    return names


# -- parquet -------------------------------------------------------------------------------------


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise missing_package("parquet export", "pyarrow", "parquet") from exc
    return pyarrow


_STRING = {"dtype": "string", "_type": "Value"}
_INT = {"dtype": "int64", "_type": "Value"}
_COLUMNS: dict[str, dict[str, Any]] = {
    "image": {"_type": "Image"},
    "file_name": _STRING,
    "prompt": _STRING,
    "image_urls": {"feature": _STRING, "_type": "Sequence"},
    "parameters": _STRING,
    "model": _STRING,
    "job_id": _STRING,
    "job_key": _STRING,
    "repeat_index": _INT,
    "output_index": _INT,
    "request_id": _STRING,
    "sha256": _STRING,
    "decision": _STRING,
}
"""The columns, as Hugging Face ``datasets`` writes its features into a Parquet schema's metadata."""


def _parquet_schema(pa: Any) -> Any:
    string, integer = pa.string(), pa.int64()
    types = {
        "image": pa.struct([("bytes", pa.binary()), ("path", string)]),
        "image_urls": pa.list_(string),
        "repeat_index": integer,
        "output_index": integer,
    }
    schema = pa.schema([(name, types.get(name, string)) for name in _COLUMNS])
    features = json.dumps({"info": {"features": _COLUMNS}})
    return schema.with_metadata({b"huggingface": features.encode()})


def _parquet_row(sample: _Sample) -> dict[str, Any]:
    row = dict(sample.row)
    urls = row.get("image_urls")
    row["image_urls"] = [str(u) for u in urls] if isinstance(urls, list) else None
    prompt = row.get("prompt")
    row["prompt"] = prompt if isinstance(prompt, str) or prompt is None else json.dumps(prompt)
    row["parameters"] = json.dumps(row["parameters"], ensure_ascii=False, sort_keys=True)
    row["image"] = {"bytes": sample.data, "path": PurePosixPath(row["file_name"]).name}
    return {name: row.get(name) for name in _COLUMNS}


def _write_parquet(samples: Iterator[_Sample], staging: Path, shard_size: int, total: int) -> list[str]:
    pa = _pyarrow()
    import pyarrow.parquet as pq

    schema = _parquet_schema(pa)
    files = -(-total // shard_size)
    names: list[str] = []
    for chunk in _chunks(samples, shard_size):
        names.append(f"train-{len(names):05d}-of-{files:05d}.parquet")
        with pq.ParquetWriter(staging / names[-1], schema) as writer:
            for start in range(0, len(chunk), _ROW_GROUP):
                rows = [_parquet_row(sample) for sample in chunk[start : start + _ROW_GROUP]]
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    if len(names) != files:  # images left out (changed since their download): fewer files than named
        for number, name in enumerate(names):
            names[number] = f"train-{number:05d}-of-{len(names):05d}.parquet"
            (staging / name).rename(staging / names[number])
    return names


_WRITERS: dict[ExportFormat, Callable[[Iterator[_Sample], Path, int, int], list[str]]] = {
    "imagefolder": _write_imagefolder,
    "webdataset": _write_webdataset,
    "parquet": _write_parquet,
}
