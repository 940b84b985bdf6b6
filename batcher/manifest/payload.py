"""What a job sends: its input, each local image reference replaced by the file's ``data:`` URI.

`batcher.manifest.localimages` checks the files when the manifest is loaded and
gives `Job.input` the references (path and hash); this module reads the bytes
again at send time, checking they still hash to what the job was made with.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..errors import LocalImageError
from .job import Job
from .localimages import (
    MAX_IMAGE_BYTES,
    MAX_REQUEST_BYTES,
    dotted,
    image_values,
    is_local,
    parse_reference,
    replaced,
    sniff,
)

__all__ = ["payload_for"]

_CACHE_CHARS = 256 * 1024 * 1024  # encoded images kept for the next submit of the same file

_encoded: OrderedDict[tuple[str, int, int, int], tuple[str, str]] = OrderedDict()
"""(path, mtime, size, inode) → (sha256, data URI) for the last few files sent: one reference image for
thousands of jobs is read and encoded once, not once a job."""


def payload_for(job: Job) -> dict[str, Any]:
    """What to send for job: its input with each local image reference replaced by the file's data URI.

    Only here are the bytes read; `Job.input` (journal, sidecars) keeps the
    reference. Raises LocalImageError (nothing was sent) when a file is gone,
    unreadable, or no longer has the hash the job was made with.
    """
    source = job.local
    if source is None:
        return job.input
    changes: dict[tuple[str, int | None], Any] = {}
    for name, index, value in image_values(job.input, dict(source.fields)):
        found = parse_reference(value)
        if found is None:
            if is_local(value):
                msg = f"{dotted(name, index)}: {value!r} was not a readable image when the manifest was loaded"
                raise LocalImageError(msg)
            continue
        changes[(name, index)] = _data_uri(source.folder, dotted(name, index), *found)
    payload = replaced(job.input, changes)
    size = len(json.dumps(payload).encode())  # escaped ASCII, as HTTP clients send JSON by default: the larger
    if size > MAX_REQUEST_BYTES:
        msg = f"the request would be {size / 2**20:.1f} MiB with its images inline; RunComfy takes at most {MAX_REQUEST_BYTES / 2**20:g} MiB"
        raise LocalImageError(msg)
    return payload


def _data_uri(folder: Path, where: str, path_text: str, sha256: str) -> str:
    """The data URI of the file path_text names (relative to folder), if it still hashes to sha256."""
    path = folder / path_text
    try:
        with path.open("rb") as handle:
            status = os.fstat(handle.fileno())
            key = (str(path), status.st_mtime_ns, status.st_size, status.st_ino)
            cached = _encoded.get(key)
            if cached is not None and cached[0] == sha256:
                _encoded.move_to_end(key)
                return cached[1]
            if status.st_size > MAX_IMAGE_BYTES:
                msg = f"{where}: {path} has grown past {MAX_IMAGE_BYTES // 2**20} MB since the manifest was loaded"
                raise LocalImageError(msg)
            data = handle.read(MAX_IMAGE_BYTES + 1)
    except OSError as exc:
        msg = f"{where}: cannot read the local image {path}: {exc.strerror}"
        raise LocalImageError(msg) from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        # Sending other bytes than the job's identity names would pay for a job the journal misdescribes.
        msg = f"{where}: {path} changed since the manifest was loaded; run again to pick up the new image"
        raise LocalImageError(msg)
    mime = sniff(data[:64])
    if mime is None:  # unreachable for a file whose hash was checked at load, unless the hash collides
        msg = f"{where}: {path} is not an image"
        raise LocalImageError(msg)
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    _encoded[key] = (sha256, uri)
    while sum(len(u) for _, u in _encoded.values()) > _CACHE_CHARS and len(_encoded) > 1:
        _encoded.popitem(last=False)
    return uri
