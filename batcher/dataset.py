"""``metadata.jsonl``: the output folder as a Hugging Face ``imagefolder`` dataset.

One row per downloaded image, ``file_name`` relative to the output folder,
so that ``datasets.load_dataset("imagefolder", data_dir="output/london")``
gives the images with their prompt, inputs, parameters and provenance. It is
rewritten from the journal at the end of every run (and by ``batcher
report``), so it always matches what is on disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .manifest import Manifest
from .state import JobRecord

__all__ = ["METADATA_NAME", "dataset_rows", "write_metadata"]

METADATA_NAME = "metadata.jsonl"
_INPUT_COLUMNS = ("prompt", "image_urls")


def dataset_rows(manifest: Manifest, records: Mapping[str, JobRecord]) -> Iterator[dict[str, Any]]:
    """The rows, in manifest order, for every image whose download is journalled."""
    for job in manifest.jobs:
        record = records.get(job.key)
        if record is None or record.phase != "completed":
            continue
        parameters = {k: v for k, v in job.input.items() if k not in _INPUT_COLUMNS}
        for index, file in sorted(record.files.items()):
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
    """Rewrite ``metadata.jsonl`` atomically; returns the number of rows."""
    rows = [json.dumps(row, ensure_ascii=False) + "\n" for row in dataset_rows(manifest, records)]
    target = output_dir / METADATA_NAME
    temporary = target.with_name(f".{METADATA_NAME}.part")
    temporary.write_text("".join(rows), encoding="utf-8")
    os.replace(temporary, target)
    return len(rows)
