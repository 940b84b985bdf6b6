"""The review page's input images: each fetched once, under the download rules, and kept in the output folder.

The page shows every output beside the images it was made from, and a
browser could not show most of them itself: a signed URL has expired, a host
wants a login, a local file lies outside the folder. So the review server
fetches each distinct input once into ``.review/inputs/<id>`` and serves it
from there, the same on every reload and every later review:

- a URL through `batcher.output.download.Downloader`, the rules output files follow
  (https, or http on loopback; public addresses only; every redirect hop
  checked; an image content type; `MAX_INPUT_BYTES`; a deadline of
  `DEADLINE` seconds), with no token; a URL the manifest names on loopback
  is fetched (the user's own choice), but only at its own origin: a remote
  host's redirect to loopback is refused;
- a local image (``file:<path>#sha256=<hex>``) copied while the file still
  has the content the job was identified by.

A fetch that fails is remembered for the life of the server (10,000 images
made from one unreachable reference cost one try) and the page shows a
placeholder with the reason; the next ``batcher review`` tries again. Only
PNG, JPEG, WebP and GIF content is ever served (sniffed from the bytes, never
trusted from a name or a header), so a fetched page can never run as part of
the review page.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import anyio

from ..confined import OutputDir, open_journalled
from ..errors import BatcherError
from ..manifest.job import Job
from ..manifest.localimages import parse_reference, sniff
from ..manifest.payload import sent_bytes
from ..net.policy import loopback_origin
from ..output.download import Downloader

__all__ = ["DEADLINE", "INPUTS_DIR", "MAX_INPUT_BYTES", "PLACEHOLDER", "InputImage", "InputImages", "input_id"]

INPUTS_DIR = ".review/inputs"
MAX_INPUT_BYTES = 50 * 1024 * 1024
"""RunComfy's own limit on an input image."""
DEADLINE = 20.0
"""Seconds one input may take in all (tries and redirects included)."""
PLACEHOLDER = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="76" height="76" viewBox="0 0 76 76">'
    b'<rect width="76" height="76" fill="#8884"/><path d="M20 52l12-14 9 10 6-7 9 11z" fill="#8888"/>'
    b'<circle cx="47" cy="27" r="5" fill="#8888"/><path d="M14 14l48 48" stroke="#8888" stroke-width="3"/></svg>'
)
"""What an input that cannot be had shows instead (the review page's, and the gallery's)."""


def input_id(value: str) -> str:
    """The cache name of an input value (a URL or a local image's reference)."""
    return hashlib.sha256(value.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class InputImage:
    """An input as the page lists it: its cache id, and what to call it."""

    id: str
    label: str


class InputImages:
    """Every distinct input of the jobs `add`ed, fetched on first `get` (one fetch at a time per input)."""

    def __init__(
        self,
        output_dir: Path,
        *,
        max_bytes: int = MAX_INPUT_BYTES,
        deadline: float = DEADLINE,
        attempts: int = 2,
    ) -> None:
        self.output_dir = output_dir
        self.max_bytes = max_bytes
        self.deadline = deadline
        self.attempts = attempts
        self._sources: dict[str, tuple[str, Path | None]] = {}
        """id -> (URL or reference, the manifest's folder for a local image)."""
        self._failed: dict[str, str] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def add(self, job: Job) -> list[InputImage]:
        """job's input images (``image_urls``), registered for `get`."""
        values = job.input.get("image_urls")
        found: list[InputImage] = []
        for value in values if isinstance(values, list) else []:
            if not isinstance(value, str):
                continue
            reference = parse_reference(value)
            if reference is None and not value.startswith(("https://", "http://")):
                continue  # a data: URI, or something the schema let through: nothing to show
            ident = input_id(value)
            label = os.path.basename(reference[0]) if reference else value
            with self._guard:
                self._sources.setdefault(ident, (value, job.local.folder if job.local else None))
            found.append(InputImage(ident, label))
        return found

    def known(self) -> list[str]:
        with self._guard:
            return list(self._sources)

    def failure(self, ident: str) -> str | None:
        """Why the input could not be had in this session, or None."""
        return self._failed.get(ident)

    def get(self, ident: str) -> tuple[bytes, str] | None:
        """(bytes, content type) of an input image, fetched or copied the first time; None when it cannot be had."""
        with self._guard:
            source = self._sources.get(ident)
            if source is None:
                return None
            lock = self._locks.setdefault(ident, threading.Lock())
        with lock:
            cached = self._cached(ident)
            if cached is not None:
                return cached
            if ident in self._failed:
                return None
            value, folder = source
            try:
                if value.startswith(("https://", "http://")):
                    anyio.run(self._fetch, value, ident)
                else:
                    self._copy(value, folder, ident)
            except (BatcherError, OSError) as exc:
                self._failed[ident] = str(exc) or type(exc).__name__
                return None
            cached = self._cached(ident)
            if cached is None:
                self._failed[ident] = "not a PNG, JPEG, WebP or GIF image"
            return cached

    def _cached(self, ident: str) -> tuple[bytes, str] | None:
        fd = open_journalled(self.output_dir, f"{INPUTS_DIR}/{ident}")
        if fd is None:
            return None
        with open(fd, "rb") as handle:
            data = handle.read(self.max_bytes + 1)
        kind = sniff(data[:64])
        return (data, kind) if kind is not None and len(data) <= self.max_bytes else None

    async def _fetch(self, url: str, ident: str) -> None:
        async with Downloader(
            max_bytes=self.max_bytes,
            attempts=self.attempts,
            backoff=0.2,
            max_connections=4,
            folder=self.output_dir,
            # Loopback only at the URL's own origin, when the user named a loopback URL: a remote host's
            # redirect must not make the review server a client of whatever listens on this machine.
            loopback_origin=loopback_origin(url),
            deadline=self.deadline,
        ) as downloader:
            await downloader.fetch(url, self.output_dir / INPUTS_DIR / ident)

    def _copy(self, value: str, folder: Path | None, ident: str) -> None:
        reference = parse_reference(value)
        if reference is None or folder is None:
            msg = f"{value!r} is not a local image reference"
            raise BatcherError(msg)
        path = folder / reference[0]
        # What the job sent: the file while it still has the content the job was identified by (re-encoded
        # when the job fitted it); LocalImageError otherwise.
        data = sent_bytes(path, value)
        with OutputDir(self.output_dir) as out:
            out.write_atomically(f"{INPUTS_DIR}/{ident}", data, create_dirs=True)
