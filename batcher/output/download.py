"""Streamed, checked, atomic downloads of output files.

A file is streamed to a hidden temporary file beside its target, checked
(scheme and host, content type, size cap, length against Content-Length),
hashed, fsynced and renamed into place, so a final name never holds a
partial file. Download hosts never see the API token: this client is a
separate ``httpx2.AsyncClient`` with no credentials, and follows redirects by
hand so that every hop passes the same checks (`batcher.net.redirects`).
Loopback is reached only at the API base's own origin when that base is
loopback (the sandbox). A failed try is repeated with the same backoff as API
calls (`batcher.net.retrying`), unless a fresh URL or nothing would help; each
file has a total deadline, so a host trickling a byte a second cannot hold a
worker for ever; and nothing below the output folder is written through a
link (see `batcher.confined`).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import aiofiles
import anyio
import httpx2

from .._version import __version__
from ..confined import OutputDir, StagedFile
from ..errors import DownloadError, ExpiredUrlError, OutputFolderError
from ..net.policy import OutputHosts, origin
from ..net.redirects import RefusedHopError, TooManyRedirectsError, anonymous_client, display_url, follow
from ..net.retrying import RetryPolicy, TryAgain, retrying
from ..net.transport import pooled_transport
from .groupsync import GroupSync

__all__ = [
    "DEFAULT_DEADLINE",
    "DEFAULT_MAX_BYTES",
    "Downloaded",
    "Downloader",
    "deadline_for",
    "extension_for",
    "safe_child",
]

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
"""The default cap on one output file (``--max-download-bytes``)."""
DEFAULT_DEADLINE = 300.0
"""Seconds one file may take, every try, redirect and backoff included (at least; see `deadline_for`)."""
_SLOWEST_RATE = 512 * 1024
"""Bytes a second a file at the size cap may need: a larger cap buys a proportionally longer deadline."""
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


_PLAIN_NAMES = os.sep == "/" and os.altsep is None
"""Whether a name without "/" is one path component here (POSIX): then `safe_child` joins plain names as they are."""


def safe_child(root: Path, *parts: str) -> Path:
    """root/parts..., refusing anything that would land outside root.

    Lexical (no file system calls): job names are already restricted to
    ``[A-Za-z0-9._-]``; this is the second line of defence against ``..``
    and absolute parts.
    """
    base = os.path.abspath(root)
    if _PLAIN_NAMES and parts and all(part and part not in (".", "..") and "/" not in part for part in parts):
        # Plain names (a job's): nothing to resolve, nowhere to climb.
        return Path(base.rstrip("/") + "/" + "/".join(parts))
    target = os.path.abspath(os.path.join(base, *parts))
    if os.path.commonpath([base, target]) != base or target == base:
        msg = f"refusing to write {'/'.join(parts)!r}: it is outside the output folder {base}"
        raise DownloadError(msg)
    return Path(target)


def deadline_for(max_bytes: int, floor: float = DEFAULT_DEADLINE) -> float:
    """The default per-file deadline: floor seconds, or longer when the size cap needs it at 512 KiB/s."""
    return max(floor, max_bytes / _SLOWEST_RATE)


def _create(root: Path | OutputDir, relative: str, part_name: str) -> StagedFile:
    """A new temporary file beside root/relative, in folders made as needed, never through a link.

    root: a folder, or one already open (the output folder, held by the `Downloader`). Leftover
    temporary files of the same target (a killed run's) are removed: the output folder's lock says
    no other process writes here.
    """
    name = relative.rsplit("/", 1)[-1]
    if isinstance(root, OutputDir):
        return root.stage(relative, part_name=part_name, exclusive=True, create_dirs=True, stale=f".{name}.*.part")
    with OutputDir(root, create=True) as folder:
        return folder.stage(relative, part_name=part_name, exclusive=True, create_dirs=True, stale=f".{name}.*.part")


def _content_type_ok(content_type: str) -> bool:
    """Only an image or a video: a missing type, a web page or an octet stream is not an output file."""
    kind = content_type.split(";")[0].strip().lower()
    major, _, minor = kind.partition("/")
    return major in ("image", "video") and bool(minor)


class Downloader:
    """Fetches output files; use it as an async context manager."""

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        attempts: int = 4,
        backoff: float = 0.5,
        transport: httpx2.AsyncBaseTransport | None = None,
        timeout: httpx2.Timeout | None = None,
        max_connections: int = 100,
        folder: Path | None = None,
        loopback_origin: str | None = None,
        deadline: float | None = None,
        output_hosts: OutputHosts | None = None,
    ) -> None:
        """folder: the output folder; targets must lie inside it, and no component below it may be a link
        (without one, only the target's own name is checked). loopback_origin: the one loopback
        ``scheme://host:port`` files may come from (`batcher.net.policy.loopback_origin` of a loopback
        API base), or None for no loopback at all. deadline: seconds one `fetch` may take in all
        (default `deadline_for` max_bytes); the per-read timeout alone lets a trickle last for ever.
        attempts, backoff: tries per file, and the first backoff bound (`RetryPolicy`: doubling, full jitter).
        output_hosts: the hosts output files may come from, every hop checked (`OutputHosts`: RunComfy's,
        the API base's origin, those allowed; its loopback origins join loopback_origin's); None: any host.
        """
        self.max_bytes = max_bytes
        self.retry = RetryPolicy(attempts=attempts, base=backoff)
        self._synced = GroupSync()
        self.folder = folder
        self.loopback_origin: str | tuple[str, ...] | None = origin(loopback_origin) if loopback_origin else None
        self.output_hosts = output_hosts
        if output_hosts is not None:
            extra = output_hosts.loopback_origins()
            own = (self.loopback_origin,) if isinstance(self.loopback_origin, str) else ()
            self.loopback_origin = tuple(dict.fromkeys((*own, *extra))) or None
        self.deadline = deadline if deadline is not None else deadline_for(max_bytes)
        self._open_folder: OutputDir | None = None
        """The output folder, opened once (made if need be) by the first file saved, closed with the Downloader:
        not made and opened again for each file."""
        self._http = anonymous_client(
            user_agent=f"batcher/{__version__}",
            timeout=timeout or httpx2.Timeout(60.0, connect=10.0),
            transport=transport or pooled_transport(max_connections),
        )

    async def __aenter__(self) -> Downloader:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self._http.aclose()
        finally:
            if self._open_folder is not None:
                self._open_folder.close()
                self._open_folder = None

    async def fetch(self, url: str, target: Path) -> Downloaded:
        """Download url to target, retrying transient faults; raises DownloadError when it cannot.

        The whole fetch (tries, redirects, backoffs) has `deadline` seconds;
        past it, a DownloadError that is not permanent (a fresh URL may be faster).
        """
        with anyio.move_on_after(self.deadline):
            return await self._fetch(url, target)
        msg = (
            f"downloading {display_url(url)} took over {self.deadline:g}s, the per-file deadline: "
            "the host is too slow or has stalled"
        )
        raise DownloadError(msg)

    async def _fetch(self, url: str, target: Path) -> Downloaded:
        return await retrying(
            partial(self._fetch_once, url, target),
            policy=self.retry,
            retry_on=_worth_another_try,
            name=f"download {display_url(url)}",
        )

    async def _fetch_once(self, url: str, target: Path) -> Downloaded:
        try:
            check = self.output_hosts.refusal if self.output_hosts is not None else None
            async with follow(self._http, url, loopback=self.loopback_origin, check=check) as response:
                return await self._save(response, str(response.url), target)
        except RefusedHopError as exc:
            raise _PermanentDownloadError(f"refusing to download {display_url(exc.url)}: {exc.reason}") from exc
        except TooManyRedirectsError as exc:
            raise _PermanentDownloadError(f"too many redirects downloading {display_url(url)}") from exc
        except httpx2.TransportError as exc:
            msg = f"download of {display_url(_hop_url(exc, url))} failed: {type(exc).__name__}: {exc}"
            raise DownloadError(msg) from exc

    async def _save(self, response: httpx2.Response, url: str, target: Path) -> Downloaded:
        status = response.status_code
        if status in (403, 404, 410):
            msg = f"the output URL answered HTTP {status}; it has probably expired"
            raise ExpiredUrlError(msg)
        if status >= 500 or status == 429:
            msg = f"the download host answered HTTP {status} for {display_url(url)}"
            raise DownloadError(msg)
        if status != 200:
            raise _PermanentDownloadError(f"the download host answered HTTP {status} for {display_url(url)}")
        content_type = response.headers.get("content-type", "")
        if not _content_type_ok(content_type):
            kind = repr(content_type) if content_type.strip() else "sent without a Content-Type"
            raise _PermanentDownloadError(f"{display_url(url)} is {kind}, not an image or video (image/*, video/*)")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise _PermanentDownloadError(f"{display_url(url)} came {encoding}-encoded although we asked for identity")
        declared = response.headers.get("content-length")
        expected = int(declared) if declared and declared.isdigit() else None
        if expected is not None and expected > self.max_bytes:
            raise _PermanentDownloadError(
                f"{display_url(url)} is {expected:,} bytes, over the {self.max_bytes:,}-byte cap (--max-download-bytes)"
            )

        root, relative = self._place(target)
        part_name = f".{target.name}.{secrets.token_hex(4)}.part"
        digest = hashlib.sha256()
        size = 0
        staged: StagedFile | None = None
        out: Any = None
        pending: list[bytes] = []
        pending_size = 0
        try:
            async for chunk in response.aiter_bytes(_CHUNK):  # identity-encoded: checked above
                size += len(chunk)
                if size > self.max_bytes:
                    raise _PermanentDownloadError(
                        f"{display_url(url)} is over the {self.max_bytes:,}-byte cap (--max-download-bytes)"
                    )
                digest.update(chunk)
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= _WRITE_BATCH:
                    # A large file: stream it through aiofiles, a batch a thread hop.
                    if out is None:
                        staged = await anyio.to_thread.run_sync(_create, self._held(root), relative, part_name)
                        with anyio.CancelScope(shield=True):  # the descriptor must end up owned, or closed
                            out = await aiofiles.open(staged.fd, "wb", buffering=0, closefd=False)
                    await out.write(b"".join(pending))
                    pending, pending_size = [], 0
            if expected is not None and size != expected:
                msg = f"{display_url(url)} sent {size:,} bytes of the {expected:,} it announced"
                raise DownloadError(msg)
            if size == 0:
                msg = f"{display_url(url)} sent an empty file"
                raise DownloadError(msg)
            if staged is None:
                # A typical image (this model's are 1-3 MB): written here, a few page-cache writes that cost
                # less than a thread hop; the fsync, the slow part, in a group (`batcher.output.groupsync`).
                staged = _create(self._held(root), relative, part_name)
                staged.write(b"".join(pending))
                with anyio.CancelScope(shield=True):  # the descriptor stays open until its group's hop is done
                    await self._synced.sync(staged.fd)
                staged.commit()
            else:
                if pending:
                    await out.write(b"".join(pending))
                await anyio.to_thread.run_sync(partial(staged.commit, durable=True))
        except OSError as exc:
            msg = f"cannot write {target}: {exc.strerror or exc}; free space or fix permissions, then run again"
            raise OutputFolderError(msg) from exc
        finally:
            if out is not None:
                with anyio.CancelScope(shield=True):
                    await out.close()
            if staged is not None:
                staged.close()  # removes the temporary file unless it was committed
        return Downloaded(path=target, bytes=size, sha256=digest.hexdigest())

    def _held(self, root: Path) -> Path | OutputDir:
        """root, open when it is the output folder (opened, and made if need be, by the first file saved)."""
        if root is not self.folder:
            return root
        if self._open_folder is None:
            self._open_folder = OutputDir(root, create=True)
        return self._open_folder

    def _place(self, target: Path) -> tuple[Path, str]:
        """(root, target relative to it): the output folder when known, else the target's own folder."""
        if self.folder is None:
            return target.parent, target.name
        try:
            relative = target.relative_to(self.folder).as_posix()
        except ValueError:
            relative = ""
        if not relative or relative == ".":
            msg = f"refusing to write {target}: it is outside the output folder {self.folder}"
            raise _PermanentDownloadError(msg)
        return self.folder, relative


def _worth_another_try(exc: Exception) -> TryAgain | None:
    """Downloads' rule: a fault another try may mend; not an expired URL (a fresh one is needed) nor a permanent one."""
    if isinstance(exc, DownloadError) and not isinstance(exc, ExpiredUrlError) and not exc.permanent:
        return TryAgain()
    return None


def _hop_url(exc: httpx2.TransportError, fallback: str) -> str:
    """The URL of the hop that failed: httpx2 attaches its request to the error."""
    try:
        return str(exc.request.url)
    except RuntimeError:  # raised before any request was made
        return fallback
