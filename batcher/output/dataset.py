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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..confined import OutputDir, relative_parts
from ..journal.store import FileRecord, JobRecord
from ..manifest.loader import Job, Manifest

__all__ = ["METADATA_NAME", "DatasetImage", "dataset_images", "dataset_rows", "row_of", "write_metadata"]

METADATA_NAME = "metadata.jsonl"
_INPUT_COLUMNS = ("prompt", "image_urls")


@dataclass(frozen=True, slots=True)
class DatasetImage:
    """One downloaded image: its job, the job's record, its output index and its file."""

    job: Job
    record: JobRecord
    index: int
    file: FileRecord


def dataset_images(
    jobs: Iterable[Job], records: Mapping[str, JobRecord], folder: OutputDir | None = None
) -> Iterator[DatasetImage]:
    """Every image whose download is journalled, in job order: the rows of every dataset view
    (`metadata.jsonl`, the review page, the exports).

    With folder, only images that are regular files in it, reached without
    links; without, only sound relative paths (checked lexically).
    """
    for job in jobs:
        record = records.get(job.key)
        if record is None or record.phase != "completed":
            continue
        for index, file in sorted(record.files.items()):
            if not (folder.has_file(file.path) if folder is not None else relative_parts(file.path)):
                continue  # not downloaded as far as the dataset is concerned
            yield DatasetImage(job, record, index, file)


def completed_in(records: Mapping[str, JobRecord]) -> Callable[[str], bool]:
    """Whether a job's key has a completed record: the only jobs `dataset_images` yields."""

    def completed(key: str) -> bool:
        record = records.get(key)
        return record is not None and record.phase == "completed"

    return completed


def row_of(image: DatasetImage) -> dict[str, Any]:
    """The dataset row of one image: ``file_name`` relative to the output folder, then what made it."""
    job = image.job
    return {
        "file_name": image.file.path,
        "prompt": job.input.get("prompt"),
        "image_urls": job.input.get("image_urls"),
        "parameters": {k: v for k, v in job.input.items() if k not in _INPUT_COLUMNS},
        "model": job.model,
        "job_id": job.name,
        "job_key": job.key,
        "repeat_index": job.repeat_index,
        "output_index": image.index,
        "request_id": image.record.request_id,
        "sha256": image.file.sha256,
    }


def dataset_rows(
    manifest: Manifest, records: Mapping[str, JobRecord], folder: OutputDir | None = None
) -> Iterator[dict[str, Any]]:
    """The rows, in manifest order, for every image whose download is journalled (see `dataset_images`)."""
    for image in dataset_images(manifest.jobs_through(completed_in(records)), records, folder):
        yield row_of(image)


def write_metadata(
    manifest: Manifest, output_dir: Path, records: Mapping[str, JobRecord], files: OutputDir | None = None
) -> int:
    """Rewrite ``metadata.jsonl`` atomically; returns the number of rows.

    files, when given, is output_dir open with its own idea of which files are there (a remote output's:
    the bucket's, see `batcher.output.remote.StoredFiles`).
    Raises OutputFolderError for a link where it would write, OSError when it cannot.
    """
    rows = 0
    with files or OutputDir(output_dir) as folder, folder.stage(METADATA_NAME) as staged:
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
