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
from typing import Any, BinaryIO

from ..confined import open_regular
from ..errors import LocalImageError, UsageError
from .imagefit import MAX_FIT_SOURCE_BYTES, MAX_IMAGE_BYTES, cached_fit, fit_image
from .job import Job
from .localimages import (
    MAX_REQUEST_BYTES,
    dotted,
    image_values,
    is_fitted,
    is_local,
    parse_reference,
    replaced,
    sniff,
)

__all__ = ["payload_for", "sent_bytes"]

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
        changes[(name, index)] = _data_uri(source.folder, dotted(name, index), *found, is_fitted(value))
    payload = replaced(job.input, changes)
    size = len(json.dumps(payload).encode())  # escaped ASCII, as HTTP clients send JSON by default: the larger
    if size > MAX_REQUEST_BYTES:
        msg = f"the request would be {size / 2**20:.1f} MiB with its images inline; RunComfy takes at most {MAX_REQUEST_BYTES / 2**20:g} MiB"
        raise LocalImageError(msg)
    return payload


def _data_uri(folder: Path, where: str, path_text: str, sha256: str, fitted: bool) -> str:
    """The data URI of the file path_text names (relative to folder), if what is sent still hashes to sha256."""
    path = folder / path_text
    try:
        with open_regular(path) as handle:
            key = _key(path, os.fstat(handle.fileno()))
            cached = _encoded.get(key)
            if cached is not None and cached[0] == sha256:
                _encoded.move_to_end(key)
                return cached[1]
            data = _sent(handle, path, key, sha256, fitted=fitted)
    except LocalImageError as exc:
        raise LocalImageError(f"{where}: {exc}") from exc
    except OSError as exc:
        msg = f"{where}: cannot read the local image {path}: {exc.strerror}"
        raise LocalImageError(msg) from exc
    mime = sniff(data[:64])
    if mime is None:  # unreachable for a file whose hash was checked at load, unless the hash collides
        msg = f"{where}: {path} is not an image"
        raise LocalImageError(msg)
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    _encoded[key] = (sha256, uri)
    while sum(len(u) for _, u in _encoded.values()) > _CACHE_CHARS and len(_encoded) > 1:
        _encoded.popitem(last=False)
    return uri


def sent_bytes(path: Path, value: str) -> bytes:
    """The bytes a job sends for the local image reference value (path: the file it names): the file's, or
    with ``#fit`` its re-encoding. Raises LocalImageError when they no longer hash to the reference's sha256,
    OSError when the file cannot be read."""
    found = parse_reference(value)
    if found is None:
        msg = f"{value!r} is not a local image reference"
        raise LocalImageError(msg)
    with open_regular(path) as handle:
        return _sent(handle, path, _key(path, os.fstat(handle.fileno())), found[1], fitted=is_fitted(value))


def _key(path: Path, status: os.stat_result) -> tuple[str, int, int, int]:
    return (str(path), status.st_mtime_ns, status.st_size, status.st_ino)


def _sent(handle: BinaryIO, path: Path, key: tuple[str, int, int, int], sha256: str, *, fitted: bool) -> bytes:
    """What is sent for the open file: its bytes, or re-encoded to fit; LocalImageError unless they hash to sha256."""
    size = key[2]
    if fitted:
        data = cached_fit(key, sha256)
        if data is not None:
            return data
        if size > MAX_FIT_SOURCE_BYTES:
            msg = f"{path} has grown past {MAX_FIT_SOURCE_BYTES // 2**20} MiB since the manifest was loaded"
            raise LocalImageError(msg)
        try:
            data = fit_image(handle.read(MAX_FIT_SOURCE_BYTES + 1))
        except (ValueError, UsageError) as exc:
            msg = f"{path} cannot be re-encoded to fit: {exc}"
            raise LocalImageError(msg) from exc
    else:
        if size > MAX_IMAGE_BYTES:
            msg = f"{path} has grown past {MAX_IMAGE_BYTES // 2**20} MiB since the manifest was loaded"
            raise LocalImageError(msg)
        data = handle.read(MAX_IMAGE_BYTES + 1)
    if hashlib.sha256(data).hexdigest() != sha256:
        # Sending other bytes than the job's identity names would pay for a job the journal misdescribes.
        again = " (or re-encodes to other bytes: another Pillow?)" if fitted else ""
        msg = f"{path} changed since the manifest was loaded{again}; run again to pick up the new image"
        raise LocalImageError(msg)
    return data
