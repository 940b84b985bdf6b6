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
    for job in manifest.iter_jobs():
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


def write_metadata(manifest: Manifest, output_dir: Path, records: Mapping[str, JobRecord]) -> int:
    """Rewrite ``metadata.jsonl`` atomically; returns the number of rows.

    Raises OutputFolderError for a link where it would write, OSError when it cannot.
    """
    rows = 0
    with OutputDir(output_dir) as folder, folder.stage(METADATA_NAME) as staged:
        # Streamed in blocks of rows: 100,000 rows are 50 MB of text, never held at once.
        block: list[str] = []
        for row in dataset_rows(manifest, records, folder):
            block.append(json.dumps(row, ensure_ascii=False) + "\n")
            rows += 1
            if len(block) == 1000:
                staged.write("".join(block).encode())
                block.clear()
        staged.write("".join(block).encode())
        staged.commit()
    return rows
