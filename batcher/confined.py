"""Files below the output folder, written and read without ever following a link.

A repository can carry its ``output/`` folder, and a symbolic link committed
there (``output/x/.batcher.lock -> ~/.bashrc``, a job folder pointing at
``~/.ssh``) would make ``run`` or ``report`` write wherever the link points.
So below the output folder nothing is followed: each folder is opened
relative to its parent's descriptor with ``O_DIRECTORY | O_NOFOLLOW`` (the
``openat`` family), each file with ``O_NOFOLLOW``, and a final name is
checked before a rename gives it new content. A link found there is an
error naming it. The output folder itself is the user's choice and may be
reached through links (``-o /data/link``): only what lies inside it is checked.

Descriptors rather than an ``lstat`` of each component: a check by name
followed by an open by name leaves a moment in which a component can be
swapped for a link; opening each component relative to the one before
leaves none, for the same number of system calls.

Paths the journal records are checked again whenever they are used
(`relative_parts`, `OutputDir.has_file`, `open_journalled`): a tampered
journal must not make the gallery link to, or the runner read, a file
outside the folder.

Files the user names (local images, prompt files) lie outside the output
folder and may be reached through links, but they too are read only as
regular files (`open_regular`): a FIFO put in an image's place must not
block the process in ``open`` for good.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import io
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from .errors import BatcherError, OutputFolderError

__all__ = [
    "NotRegularFileError",
    "OutputDir",
    "StagedFile",
    "open_journalled",
    "open_regular",
    "relative_parts",
    "write_atomically",
]

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
ErrorKind = type[BatcherError]


def relative_parts(relative: str) -> tuple[str, ...] | None:
    """The components of a path relative to the output folder, or None when it is not a sound one.

    Sound: a non-empty string, ``/``-separated, not absolute, with no empty,
    ``.`` or ``..`` component, no backslash (a browser reads it as ``/``) and
    no NUL. Lexical only: links are caught when the path is opened.
    """
    if not isinstance(relative, str) or not relative or relative.startswith("/") or "\\" in relative:
        return None
    if "\0" in relative:
        return None
    parts = tuple(relative.split("/"))
    if any(part in ("", ".", "..") for part in parts):
        return None
    return parts


class OutputDir:
    """The output folder, open: files below it are made, replaced and read without following links.

    error is the class raised for a link (OutputFolderError, or JournalError
    for the journal's own files); other OSErrors pass through unchanged, for
    callers that already explain them. Use it as a context manager.
    """

    def __init__(self, root: Path, *, error: ErrorKind = OutputFolderError, create: bool = False) -> None:
        self.root = root
        self.error = error
        if create:
            os.makedirs(root, exist_ok=True)
        # Followed on purpose: the folder itself (and any link leading to it) is the user's choice.
        self.fd: int | None = os.open(root, os.O_RDONLY | os.O_DIRECTORY)

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def shown(self, parts: Sequence[str]) -> Path:
        """root/parts, for messages."""
        return self.root.joinpath(*parts)

    # -- the checks ----------------------------------------------------------------------

    def refuse_link(self, dir_fd: int, name: str, parts: Sequence[str]) -> None:
        """Raise `error` when name (shown as root/parts) is a symbolic link; nothing when it is absent."""
        try:
            found = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(found.st_mode):
            msg = (
                f"{self.shown(parts)} is a symbolic link, and batcher never follows links inside the output "
                f"folder {self.root} (a repository could have planted it to make batcher overwrite the file it "
                "points at). Remove it, then run again"
            )
            raise self.error(msg)

    def refuse_links_in_root(self) -> None:
        """Raise `error` for the first symbolic link directly inside the folder (one directory listing)."""
        assert self.fd is not None
        with os.scandir(self.fd) as entries:
            for entry in entries:
                if entry.is_symlink():
                    self.refuse_link(self.fd, entry.name, (entry.name,))

    def _open_at(self, dir_fd: int, name: str, flags: int, mode: int, parts: Sequence[str]) -> int:
        try:
            return os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
        except OSError:
            self.refuse_link(dir_fd, name, parts)  # ELOOP (EMLINK on BSD) on a link: say so in plain words
            raise

    # -- folders and files ---------------------------------------------------------------

    def open_dir(self, parts: Sequence[str], *, create: bool = False) -> int:
        """A descriptor of root/parts, every component a real folder (made when create); the caller closes it."""
        return self._open_dir(parts, create)[0]

    def _open_dir(self, parts: Sequence[str], create: bool) -> tuple[int, bool]:
        """`open_dir`, and whether this call made its last folder (then empty, but for other writers)."""
        assert self.fd is not None
        fd = os.dup(self.fd)
        made = False
        try:
            for depth, name in enumerate(parts):
                shown = parts[: depth + 1]
                made = False
                try:
                    child = self._open_at(fd, name, _DIRECTORY, 0, shown)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(name, 0o777, dir_fd=fd)
                        made = True
                    except FileExistsError:  # another worker made it first
                        pass
                    child = self._open_at(fd, name, _DIRECTORY, 0, shown)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd, made

    def open_file(self, parts: Sequence[str], flags: int, mode: int = 0o666, *, create_dirs: bool = False) -> int:
        """root/parts opened with flags, never through a link, and only if it is a regular file."""
        dir_fd = self.open_dir(parts[:-1], create=create_dirs)
        try:
            # O_NONBLOCK: opening a FIFO must not hang; it is refused just below.
            fd = self._open_at(dir_fd, parts[-1], flags | os.O_NONBLOCK, mode, parts)
        finally:
            os.close(dir_fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                msg = f"{self.shown(parts)} is not a regular file; remove it, then run again"
                raise self.error(msg)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def has_file(self, relative: str) -> bool:
        """True when relative is a sound path to a regular file reached without links (nothing is opened)."""
        parts = relative_parts(relative)
        if parts is None:
            return False
        try:
            dir_fd = self.open_dir(parts[:-1])
        except (OSError, BatcherError):
            return False
        try:
            found = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return False
        finally:
            os.close(dir_fd)
        return stat.S_ISREG(found.st_mode)

    def stage(
        self,
        relative: str,
        *,
        part_name: str | None = None,
        exclusive: bool = False,
        mode: int = 0o666,
        create_dirs: bool = False,
        stale: str | None = None,
    ) -> StagedFile:
        """A new hidden file beside relative (``.<name>.part`` unless part_name), for `StagedFile.commit`.

        exclusive: fail rather than reuse an existing part file. stale: a
        pattern of leftover part files (a killed run's) to remove first.
        """
        parts = self._parts(relative)
        dir_fd, made = self._open_dir(parts[:-1], create_dirs)
        try:
            part = part_name or f".{parts[-1]}.part"
            if stale is not None and not made:  # a folder this call made holds no leftovers
                for name in os.listdir(dir_fd):
                    if fnmatch.fnmatchcase(name, stale):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(name, dir_fd=dir_fd)  # a link is removed, never followed
            flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
            fd = self._open_at(dir_fd, part, flags, mode, (*parts[:-1], part))
        except BaseException:
            os.close(dir_fd)
            raise
        return StagedFile(self, parts, dir_fd, fd, part)

    def write_atomically(self, relative: str, data: bytes, *, mode: int = 0o666, create_dirs: bool = False) -> Path:
        """Put data under relative in one step (written to a ``.part`` file, then renamed); returns the path."""
        with self.stage(relative, mode=mode, create_dirs=create_dirs) as staged:
            staged.write(data)
            staged.commit()
        return staged.path

    def _parts(self, relative: str) -> tuple[str, ...]:
        parts = relative_parts(relative)
        if parts is None:
            msg = f"refusing to write {relative!r}: it is not a plain path inside the output folder {self.root}"
            raise self.error(msg)
        return parts


class StagedFile:
    """A hidden file beside its final name: `commit` gives it that name, `close` removes it if not committed."""

    def __init__(self, folder: OutputDir, parts: tuple[str, ...], dir_fd: int, fd: int, part: str) -> None:
        self._folder = folder
        self._parts = parts
        self._dir_fd = dir_fd
        self.fd = fd
        self._part = part
        self.committed = False
        self.closed = False
        self.path = folder.shown(parts)
        """The final name, for messages and return values."""

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def write(self, data: bytes) -> None:
        """Write all of data (os.write may write less than asked)."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def commit(self, *, durable: bool = False) -> None:
        """Give the file its final name; durable: fsync it first (downloads, whose hash the journal records).

        A final name that is a link is refused rather than replaced: a rename
        would not follow it, but it means someone planted it.
        """
        if durable:
            os.fsync(self.fd)
        self._folder.refuse_link(self._dir_fd, self._parts[-1], self._parts)
        os.replace(self._part, self._parts[-1], src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        self.committed = True

    def close(self) -> None:
        """Close the descriptors; an uncommitted part file is removed."""
        if self.closed:
            return
        self.closed = True
        os.close(self.fd)
        if not self.committed:
            with contextlib.suppress(OSError):
                os.unlink(self._part, dir_fd=self._dir_fd)
        os.close(self._dir_fd)


def write_atomically(
    root: Path,
    relative: str,
    data: bytes,
    *,
    mode: int = 0o666,
    create_dirs: bool = False,
    error: ErrorKind = OutputFolderError,
) -> Path:
    """Put data at root/relative in one step, via ``.<name>.part`` and a rename, never through a link.

    The one way batcher writes a derived file (gallery, metadata, sidecars,
    checkpoint). Raises error for a link below root, OSError for the rest.
    """
    with OutputDir(root, error=error) as folder:
        return folder.write_atomically(relative, data, mode=mode, create_dirs=create_dirs)


def open_journalled(root: Path, relative: str) -> int | None:
    """A read-only descriptor of a file the journal recorded at relative, or None.

    None (and nothing opened) when the path is not sound, crosses a link,
    names something other than a regular file, or is missing: the caller
    treats the file as not downloaded.
    """
    parts = relative_parts(relative)
    if parts is None:
        return None
    try:
        with OutputDir(root) as folder:
            return folder.open_file(parts, os.O_RDONLY)
    except (OSError, BatcherError):
        return None


class NotRegularFileError(OSError):
    """A file the user named is not a regular file (a FIFO, a device, a socket, a folder): it is not read."""


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"


def open_regular(path: str | os.PathLike[str]) -> io.BufferedReader:
    """path opened for reading (links followed: the user named it), only if it is a regular file.

    Opened with ``O_NONBLOCK``, so that a FIFO (or a device) cannot block the
    open, then checked with ``fstat`` on the descriptor, so nothing can be
    swapped in between; reads then block as usual. Raises NotRegularFileError
    (an OSError whose strerror says what the path is) or the open's OSError.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, f"not a regular file but {_kind(mode)}", os.fspath(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
