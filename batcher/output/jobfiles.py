"""Where a job's files go in the output folder, what its sidecar says, and whether its files are intact.

``<job name>/<key[:8]>-<index>.<ext>`` for each output and
``<job name>/<key[:8]>.json`` for the sidecar; every path is checked to
stay inside the folder (`safe_child`), and written or read without
following links (`batcher.confined`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import orjson

from ..confined import OutputDir, open_journalled, write_atomically
from ..journal.records import FileRecord, JobRecord
from ..manifest.loader import Job, Manifest
from .download import extension_for, safe_child

__all__ = ["file_matches", "output_path", "write_sidecar"]


def output_path(root: Path, job: Job, index: int, url: str) -> Path:
    """Where output index of job goes: its extension from the URL, else from the job's output_format."""
    fallback = "." + str(job.input.get("output_format", "png")).replace("jpeg", "jpg")
    return safe_child(root, job.name, f"{job.key[:8]}-{index}{extension_for(url, fallback)}")


def write_sidecar(root: Path, manifest: Manifest, job: Job, record: JobRecord, folder: OutputDir | None = None) -> None:
    """``<job>/<key>.json``: what was asked and what came back, beside the images.

    folder: root, already open (a batch of sidecars opens it once)."""
    sidecar = safe_child(root, job.name, f"{job.key[:8]}.json")
    content = {
        "job": job.key,
        "name": job.name,
        "model": job.model,
        "repeat_index": job.repeat_index,
        "input": job.input,
        "request_id": record.request_id,
        "cost": record.cost,
        "outputs": record.outputs,
        "files": [f.path for _, f in sorted(record.files.items())],
        "manifest": str(manifest.path),
        "manifest_line": job.line,
        "source": job.source,
    }
    data = _indented(content)
    relative = sidecar.relative_to(root).as_posix()
    # Never through a link: a job folder or .part committed as one must not send this elsewhere.
    if folder is None:
        write_atomically(root, relative, data, create_dirs=True)
    else:
        folder.write_atomically(relative, data, create_dirs=True)


def _indented(content: dict[str, Any]) -> bytes:
    """content as JSON indented by two spaces, UTF-8, with a final newline: orjson's (a tenth of the CPU of
    json's pure-Python indenting encoder), or json's for what orjson refuses (a key that is not a string,
    an integer past 64 bits)."""
    try:
        return orjson.dumps(content, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode()


def file_matches(root: Path, known: FileRecord) -> bool:
    """True when the journalled file is in place with its recorded size and hash.

    The journal's path is checked again first: one that is absolute, climbs
    out with ``..``, crosses a link or names no regular file is never opened,
    and the file counts as not downloaded (a tampered journal must not make
    the run read, or vouch for, a file outside the folder).
    """
    fd = open_journalled(root, known.path)
    if fd is None:
        return False
    try:
        with open(fd, "rb") as handle:
            if os.fstat(handle.fileno()).st_size != known.bytes:
                return False
            digest = hashlib.sha256()
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return False
    return digest.hexdigest() == known.sha256
