"""``metadata.jsonl``: the output folder as a Hugging Face ``imagefolder`` dataset.

One row per downloaded image, ``file_name`` relative to the output folder,
so that ``datasets.load_dataset("imagefolder", data_dir="output/london")``
gives the images with their prompt, inputs, parameters and provenance. It is
rewritten from the journal at the end of every run (and by ``batcher
report``), so it always matches what is on disk: a row only for a file
whose journalled path is a sound one inside the folder, reached without
links (a tampered journal cannot list, or make a loader read, anything else).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .confined import OutputDir, relative_parts
from .manifest import Manifest
from .state import JobRecord

__all__ = ["METADATA_NAME", "dataset_rows", "write_metadata"]

METADATA_NAME = "metadata.jsonl"
_INPUT_COLUMNS = ("prompt", "image_urls")


def dataset_rows(
    manifest: Manifest, records: Mapping[str, JobRecord], folder: OutputDir | None = None
) -> Iterator[dict[str, Any]]:
    """The rows, in manifest order, for every image whose download is journalled.

    With folder, only images that are regular files in it, reached without
    links; without, only sound relative paths (checked lexically).
    """
    for job in manifest.jobs:
        record = records.get(job.key)
        if record is None or record.phase != "completed":
            continue
        parameters = {k: v for k, v in job.input.items() if k not in _INPUT_COLUMNS}
        for index, file in sorted(record.files.items()):
            if not (folder.has_file(file.path) if folder is not None else relative_parts(file.path)):
                continue  # not downloaded as far as the dataset is concerned
            yield {
                "file_name": file.path,
                "prompt": job.input.get("prompt"),
                "image_urls": job.input.get("image_urls"),
                "parameters": parameters,
                "model": job.model,
                "job_id": job.name,
                "job_key": job.key,
                "repeat_index": job.repeat_index,
                "output_index": index,
                "request_id": record.request_id,
                "sha256": file.sha256,
            }


def write_metadata(
    manifest: Manifest, output_dir: Path, records: Mapping[str, JobRecord], files: OutputDir | None = None
) -> int:
    """Rewrite ``metadata.jsonl`` atomically; returns the number of rows.

    files, when given, is output_dir open with its own idea of which files are there (a remote output's:
    the bucket's, see `batcher.remote.StoredFiles`).
    Raises OutputFolderError for a link where it would write, OSError when it cannot.
    """
    with files or OutputDir(output_dir) as folder:
        rows = [json.dumps(row, ensure_ascii=False) + "\n" for row in dataset_rows(manifest, records, folder)]
        folder.write_atomically(METADATA_NAME, "".join(rows).encode())
    return len(rows)
