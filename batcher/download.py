"""Streamed, checked, atomic downloads of output files.

A file is streamed to a hidden temporary file beside its target, checked
(scheme and host, content type, size cap, length against Content-Length),
hashed, fsynced and renamed into place, so a final name never holds a
partial file. Download hosts never see the API token: this client is a
separate ``httpx.AsyncClient`` with no credentials, and follows redirects by
hand so that every hop passes the same checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiofiles
import anyio
import httpx

from . import __version__
from .errors import DownloadError, OutputFolderError
from .netpolicy import resolve_refusal

__all__ = ["DEFAULT_MAX_BYTES", "Downloaded", "Downloader", "ExpiredUrlError", "extension_for", "safe_child"]

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
_MAX_REDIRECTS = 5
_CHUNK = 64 * 1024
_WRITE_BATCH = 4 * 1024 * 1024
"""A file up to this size is held in memory and written in one go (this model's PNGs are 1-3 MB);
a larger one streams to disk. At most concurrency x this much is held at once."""
_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".mp4", ".webm", ".mov")
_TYPE_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "video/mp4": ".mp4",
    "video/webm": ".webm",
}


class ExpiredUrlError(DownloadError):
    """Raised when a download host answers 403 or 404: the signed URL has probably expired."""


class _PermanentDownloadError(DownloadError):
    """A download failure that neither another try nor a fresh URL would mend (refused host, cap, type)."""

    permanent = True


@dataclass(frozen=True, slots=True)
class Downloaded:
    """A file now in place."""

    path: Path
    bytes: int
    sha256: str


def extension_for(url: str, fallback: str = ".png") -> str:
    """The file extension an output URL suggests."""
    suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
    return suffix if suffix in _EXTENSIONS else fallback


def safe_child(root: Path, *parts: str) -> Path:
    """root/parts..., refusing anything that would land outside root.

    Lexical (no file system calls): job names are already restricted to
    ``[A-Za-z0-9._-]``; this is the second line of defence against ``..``
    and absolute parts.
    """
    base = os.path.abspath(root)
    target = os.path.abspath(os.path.join(base, *parts))
    if os.path.commonpath([base, target]) != base or target == base:
        msg = f"refusing to write {'/'.join(parts)!r}: it is outside the output folder {base}"
        raise DownloadError(msg)
    return Path(target)


def _prepare_folder(target: Path) -> None:
    """Create the target's folder; in one that already existed, remove temp files a killed run left."""
    try:
        target.parent.mkdir(parents=True)
    except FileExistsError:
        # The output folder's lock says no other process writes here.
        for stale in target.parent.glob(f".{target.name}.*.part"):
            stale.unlink(missing_ok=True)


def _create(temporary: Path) -> int:
    """A new, empty temporary file, unbuffered."""
    return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)


def _write_whole(target: Path, temporary: Path, data: bytes) -> None:
    """Put a file that arrived within one batch in place: one thread hop instead of four."""
    _prepare_folder(target)
    fd = _create(temporary)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        _seal(fd, temporary, target)
    finally:
        os.close(fd)


async def _open_streaming(target: Path, temporary: Path) -> Any:
    def start() -> int:
        _prepare_folder(target)
        return _create(temporary)

    fd = await anyio.to_thread.run_sync(start)
    with anyio.CancelScope(shield=True):  # the descriptor must end up owned, or closed
        return await aiofiles.open(fd, "wb", buffering=0)


def _seal(fd: int, temporary: Path, target: Path) -> None:
    """Make the file durable, then give it its final name (POSIX allows renaming an open file)."""
    os.fsync(fd)
    os.replace(temporary, target)


def _content_type_ok(content_type: str) -> bool:
    kind = content_type.split(";")[0].strip().lower()
    return (
        not kind or kind.startswith(("image/", "video/")) or kind in ("application/octet-stream", "binary/octet-stream")
    )


class Downloader:
    """Fetches output files; use it as an async context manager."""

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        attempts: int = 4,
        backoff: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: httpx.Timeout | None = None,
        max_connections: int = 100,
    ) -> None:
        self.max_bytes = max_bytes
        self.attempts = attempts
        self.backoff = backoff
        self._http = httpx.AsyncClient(
            transport=transport,
            timeout=timeout or httpx.Timeout(60.0, connect=10.0),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            # identity: a compressed body could expand past the size cap (a "gzip bomb").
            headers={"User-Agent": f"batcher/{__version__}", "Accept-Encoding": "identity"},
        )

    async def __aenter__(self) -> Downloader:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.aclose()

    async def fetch(self, url: str, target: Path) -> Downloaded:
        """Download url to target, retrying transient faults; raises DownloadError when it cannot."""
        error: DownloadError | None = None
        for attempt in range(self.attempts):
            try:
                return await self._fetch_once(url, target)
            except ExpiredUrlError:
                raise
            except _PermanentDownloadError:
                raise
            except DownloadError as exc:
                error = exc
            if attempt + 1 < self.attempts:
                await anyio.sleep(self.backoff * 2**attempt)
        assert error is not None
        raise error

    async def _fetch_once(self, url: str, target: Path) -> Downloaded:
        current = url
        for _ in range(_MAX_REDIRECTS + 1):
            refusal = await resolve_refusal(current)
            if refusal:
                raise _PermanentDownloadError(f"refusing to download {_short(current)}: {refusal}")
            try:
                async with self._http.stream("GET", current) as response:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        current = urljoin(current, location)
                        continue
                    return await self._save(response, current, target)
            except httpx.TransportError as exc:
                msg = f"download of {_short(current)} failed: {type(exc).__name__}: {exc}"
                raise DownloadError(msg) from exc
        raise _PermanentDownloadError(f"too many redirects downloading {_short(url)}")

    async def _save(self, response: httpx.Response, url: str, target: Path) -> Downloaded:
        status = response.status_code
        if status in (403, 404, 410):
            msg = f"the output URL answered HTTP {status}; it has probably expired"
            raise ExpiredUrlError(msg)
        if status >= 500 or status == 429:
            msg = f"the download host answered HTTP {status} for {_short(url)}"
            raise DownloadError(msg)
        if status != 200:
            raise _PermanentDownloadError(f"the download host answered HTTP {status} for {_short(url)}")
        content_type = response.headers.get("content-type", "")
        if not _content_type_ok(content_type):
            raise _PermanentDownloadError(f"{_short(url)} is {content_type!r}, not an image or video")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise _PermanentDownloadError(f"{_short(url)} came {encoding}-encoded although we asked for identity")
        declared = response.headers.get("content-length")
        expected = int(declared) if declared and declared.isdigit() else None
        if expected is not None and expected > self.max_bytes:
            raise _PermanentDownloadError(
                f"{_short(url)} is {expected:,} bytes, over the {self.max_bytes:,}-byte cap (--max-download-bytes)"
            )

        temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        digest = hashlib.sha256()
        size = 0
        placed = False
        out: Any = None
        pending: list[bytes] = []
        pending_size = 0
        try:
            async for chunk in response.aiter_bytes(_CHUNK):  # identity-encoded: checked above
                size += len(chunk)
                if size > self.max_bytes:
                    raise _PermanentDownloadError(
                        f"{_short(url)} is over the {self.max_bytes:,}-byte cap (--max-download-bytes)"
                    )
                digest.update(chunk)
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= _WRITE_BATCH:
                    # A large file: stream it through aiofiles, a batch a thread hop.
                    if out is None:
                        out = await _open_streaming(target, temporary)
                    await out.write(b"".join(pending))
                    pending, pending_size = [], 0
            if expected is not None and size != expected:
                msg = f"{_short(url)} sent {size:,} bytes of the {expected:,} it announced"
                raise DownloadError(msg)
            if size == 0:
                msg = f"{_short(url)} sent an empty file"
                raise DownloadError(msg)
            if out is None:
                # A typical image: folder, file, fsync and name in one thread hop.
                await anyio.to_thread.run_sync(_write_whole, target, temporary, b"".join(pending))
            else:
                if pending:
                    await out.write(b"".join(pending))
                await anyio.to_thread.run_sync(_seal, out.fileno(), temporary, target)
            placed = True
        except OSError as exc:
            msg = f"cannot write {target}: {exc.strerror or exc}; free space or fix permissions, then run again"
            raise OutputFolderError(msg) from exc
        finally:
            if out is not None:
                with anyio.CancelScope(shield=True):
                    await out.close()
            if not placed:
                with contextlib.suppress(OSError):
                    temporary.unlink(missing_ok=True)
        return Downloaded(path=target, bytes=size, sha256=digest.hexdigest())


def _short(url: str) -> str:
    """A URL for messages: without its query, which may hold a signature."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
