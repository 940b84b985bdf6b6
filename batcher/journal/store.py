"""The state journal: an append-only JSONL file that is the run's only truth.

Each line is one event, ending in a CRC-32 of the rest of the line so that a
flipped byte is caught even where it would still parse as JSON::

    {"t":1764070000.123,"e":"submitted","job":"3f2a…","request_id":"r-1","crc":"1a2b3c4d"}

Folding the lines in order gives every job's `JobRecord`. A torn last line
(what a crash or power loss leaves) is dropped with a warning and cut off
before the next append; a damaged line anywhere else is an error naming it.

Durability: every event is written with one ``os.write`` on an ``O_APPEND``
descriptor before the caller goes on, so a killed process loses nothing it
journalled; ``fsync`` runs in groups (see `Journal.sync`), so power loss can
lose the last fraction of a second. A lost ``submitted`` line leaves its job
at ``submitting``, which resumes as *uncertain* and is never resent on its own:
power loss can cost a hole to review, never a silent double charge.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import hashlib
import itertools
import os
import re
import stat
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..confined import OutputDir
from ..errors import JournalCorruptError, JournalError, JournalLockedError
from ..lifecycle import EVENT_KINDS, EventKind, Phase
from .records import FileRecord, JobRecord
from .table import RecordTable, Rows, record_from

__all__ = [
    "CHECKPOINT_NAME",
    "EVENT_KINDS",
    "JOURNAL_NAME",
    "MAX_LINE_BYTES",
    "EventKind",
    "FileRecord",
    "FoldedJournal",
    "JobRecord",
    "Journal",
    "Phase",
    "decode_event",
    "encode_event",
    "read_journal",
]

JOURNAL_NAME = "state.jsonl"
CHECKPOINT_NAME = "state.checkpoint"
CHECKPOINT_MIN_BYTES = int(os.environ.get("BATCHER_CHECKPOINT_MIN_BYTES", 1024 * 1024))
CHECKPOINT_EVERY_BYTES = int(os.environ.get("BATCHER_CHECKPOINT_EVERY_BYTES", 16 * 1024 * 1024))
"""During a run, a checkpoint after this many journal bytes since the last: a kill then leaves at most this
much to fold again on resume (~100,000 events), not the whole night's."""
"""Journals smaller than this fold in well under a second: no checkpoint (the torture test sets 0)."""
LOCK_NAME = ".batcher.lock"

_CRC_TAIL = len(',"crc":"00000000"}')
MAX_LINE_BYTES = 16 * 1024 * 1024
"""The longest journal line batcher writes or reads. Its largest events are a ``completed`` of 1,000 output
URLs (4 MiB at most, `batcher.runcomfy.results`) and a failure's text (from answers of 1 MiB at most); folding
one line costs about five times its length in memory, so a planted 100 MB line would take half a GB."""


def encode_event(event: dict[str, Any]) -> bytes:
    """One journal line, newline included, with its CRC; never fails, and never writes what cannot be read.

    Written by orjson, the library that reads it back, so writer and reader
    agree on what JSON is. What they would refuse is made to fit rather than
    refused: NaN and infinities become null (orjson's own rule), integers past
    64 bits become strings, lone surrogates U+FFFD, other keys and values
    their ``str``. Refusing would stop a run at its worst moments: the
    ``submitting`` intent of a job about to be sent, or the ``completed``
    answer of one already paid for. (``json.dumps``, the writer before, wrote
    NaN, which orjson refuses: one odd number from a server made the journal
    unreadable for good.) Fields change only where they could not be read back.
    """
    body = _dumps(event)
    crc = zlib.crc32(body)
    return body[:-1] + b',"crc":"%08x"}\n' % crc


def _dumps(value: Any) -> bytes:
    """orjson's JSON for value, made readable first where orjson would refuse it (see `encode_event`)."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: a big integer, a lone surrogate, a foreign type, deep nesting
        return orjson.dumps(_readable(value, 0))


_INT64 = range(-(2**63), 2**64)
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_DEPTH = 200
"""orjson writes at most 254 levels of nesting; past this, a value is kept as its text."""


def _readable(value: Any, depth: int) -> Any:
    """value, with what orjson cannot write turned into something it can (see `encode_event`)."""
    if isinstance(value, str):
        return value if value.isascii() else _SURROGATE.sub("\ufffd", value)
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if value in _INT64 else str(value)
    if depth >= _MAX_DEPTH:
        return _readable(str(value), depth)
    if isinstance(value, dict):
        return {
            _readable(k if isinstance(k, str) else str(k), depth): _readable(v, depth + 1) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_readable(item, depth + 1) for item in value]
    return _readable(str(value), depth)


_CRC_MARK = b',"crc":"'


def decode_event(line: bytes) -> dict[str, Any] | None:
    """The event on a line (without its newline), or None when the line is damaged or not an event."""
    if len(line) <= _CRC_TAIL or line[-_CRC_TAIL : -_CRC_TAIL + 8] != _CRC_MARK or line[-2:] != b'"}':
        return None
    body = line[:-_CRC_TAIL] + b"}"
    try:
        # Compared as text, not as a number: int("B", 16) == int("b", 16) would let a flipped bit through.
        if line[-10:-2] != b"%08x" % zlib.crc32(body):
            return None
        event = orjson.loads(body)
    except ValueError:  # orjson.JSONDecodeError is a ValueError
        return None
    return event if isinstance(event, dict) and "e" in event else None


@dataclass(slots=True)
class FoldedJournal:
    """The journal folded: one record per job, the run headers, and any warnings."""

    records: RecordTable = field(default_factory=RecordTable)
    headers: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    good_length: int = 0
    """Bytes up to the end of the last sound line: where the next append goes."""


def fold_bytes(
    data: bytes, source: str = JOURNAL_NAME, *, onto: FoldedJournal | None = None, line_offset: int = 0
) -> FoldedJournal:
    """Fold raw journal bytes; see the module docstring for what is tolerated.

    With onto (a checkpoint's state), data is the journal's tail after it and
    line_offset the number of lines before it, for messages.
    """
    folded = onto if onto is not None else FoldedJournal()
    records = folded.records
    damaged: tuple[int, bytes] | None = None
    lines = data.split(b"\n")
    last = len(lines) - 1  # the piece after the last newline: b"" when the file ends well
    end = folded.good_length
    for index, line in enumerate(lines, line_offset):
        terminated = index - line_offset < last
        if len(line) > MAX_LINE_BYTES and len(line.rstrip(b"\0")) > MAX_LINE_BYTES:  # NULs: power loss's padding
            msg = (
                f"{source} line {index + 1} is {len(line):,} bytes long, over the {MAX_LINE_BYTES:,} of any line "
                "batcher writes: it is not a journal line (the file was changed or damaged). Keep a copy, then "
                "remove that line by hand to go on (its job may then be treated as not yet submitted)."
            )
            raise JournalCorruptError(msg)
        end += len(line) + terminated
        event = decode_event(line)
        good_end = end
        if event is None:
            # The slow path: blank lines, NUL padding, damage.
            if not terminated and not line:
                break
            if terminated and not line.strip(b" \t\r"):
                if damaged is None:
                    folded.good_length = end
                continue
            # JSON escapes control characters, so NULs are never ours: power loss pads files with them.
            content = line.rstrip(b"\0")
            event = decode_event(content) if len(content) < len(line) else None
            if event is None:
                if damaged is None:
                    damaged = (index + 1, line)
                continue
            good_end = end - (len(line) - len(content)) - terminated
        if damaged is not None:
            bad_number, bad_line = damaged
            msg = (
                f"{source} line {bad_number} is damaged ({bad_line[:60]!r}…) but later lines are sound: "
                "the journal was changed or the disk corrupted it. Keep a copy, then remove that line "
                "by hand to go on (its job may then be treated as not yet submitted)."
            )
            raise JournalCorruptError(msg)
        folded.good_length = good_end
        key = event.get("job")
        if key is None:
            if event["e"] == "run":
                folded.headers.append(event)
            continue
        record = records.live(key)
        if record is None:
            record = records[key] = JobRecord(key)
        try:
            record.apply(event)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            msg = f"{source} line {index + 1} is sound JSON but not a valid {event['e']!r} event: {exc!r}"
            raise JournalCorruptError(msg) from exc
    if damaged is not None:
        folded.warnings.append(
            f"{source}: dropped a torn last line (line {damaged[0]}), as a crash or power loss leaves; nothing else was lost"
        )
    return folded


def _read_regular_file(path: Path) -> bytes:
    """The bytes of the regular file at path, refusing a link or a device (a planted
    ``state.jsonl -> /dev/zero`` must not hang `status`)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a link or a device?); remove it")
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read()
    finally:
        os.close(fd)


def read_journal(path: Path) -> FoldedJournal:
    """Fold the journal at path without locking it (safe while a run writes it); empty if absent.

    Where a checkpoint beside it matches the journal's first bytes, only the
    lines after those are folded.
    """
    try:
        data = _read_regular_file(path)
    except FileNotFoundError:
        return FoldedJournal()
    except OSError as exc:
        msg = f"cannot read the journal {path}: {exc.strerror or exc}"
        raise JournalError(msg) from exc
    # The fold allocates millions of short-lived dicts and no cycles: the cyclic
    # collector would only rescan the growing record table again and again.
    collecting = gc.isenabled()
    gc.disable()
    try:
        start = _load_checkpoint(path.with_name(CHECKPOINT_NAME), data)
        if start is None:
            return fold_bytes(data, str(path))
        folded, lines = start
        return fold_bytes(data[folded.good_length :], str(path), onto=folded, line_offset=lines)
    finally:
        if collecting:
            gc.enable()


# -- checkpoints ---------------------------------------------------------------------------
#
# Folding a million events takes seconds; a run's end writes the folded state
# beside the journal, with the length and sha256 of the journal bytes it
# covers. The next read checks those bytes (a hash of 100 MB is a tenth of a
# second) and folds only the tail. The checkpoint is derived data: any
# mismatch, damage or version change means it is ignored, never trusted.

_CHECKPOINT_VERSION = 7


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """The folded state at one length of the journal, copied: safe to write from another thread."""

    length: int
    headers: list[dict[str, Any]]
    rows: Rows
    """Each record's row (`batcher.journal.table`): bytes, which do not change under the writer."""


def _snapshot(folded: FoldedJournal, length: int) -> _Snapshot:
    collecting = gc.isenabled()
    gc.disable()  # 200,000 short lists and no cycles: see read_journal
    try:
        return _Snapshot(length, list(folded.headers), folded.records.rows())
    finally:
        if collecting:
            gc.enable()


def write_checkpoint(journal_path: Path, folded: FoldedJournal, length: int) -> None:
    """Save folded, the state of journal_path's first length bytes, for `read_journal` to start from."""
    _write_snapshot(journal_path, _snapshot(folded, length))


def _write_snapshot(journal_path: Path, snapshot: _Snapshot) -> None:
    """A header line (what the checkpoint covers), then one line per record: written in blocks, so a
    checkpoint of 100,000 records is never one 50 MB string."""
    length = snapshot.length
    digest = hashlib.sha256()
    lines = 0
    with OutputDir(journal_path.parent, error=JournalError) as folder:
        fd = folder.open_file((journal_path.name,), os.O_RDONLY)
        with open(fd, "rb") as handle:
            left = length
            while left:
                chunk = handle.read(min(left, 1 << 17))
                if not chunk:
                    return  # shorter than we thought: write nothing rather than something wrong
                digest.update(chunk)
                lines += chunk.count(b"\n")
                left -= len(chunk)
        header = {
            "version": _CHECKPOINT_VERSION,
            "length": length,
            "lines": lines,
            "sha256": digest.hexdigest(),
            "headers": snapshot.headers,
            "records": len(snapshot.rows),
        }
        with folder.stage(CHECKPOINT_NAME, mode=0o600) as staged:
            staged.write(_dumps(header) + b"\n")
            rows = iter(snapshot.rows)
            # Blocks of ~100 KB: a larger one would be a big allocation a checkpoint, and glibc keeps those.
            while block := list(itertools.islice(rows, 256)):
                staged.write(b"\n".join(block) + b"\n")
            staged.commit()


def _load_checkpoint(path: Path, data: bytes) -> tuple[FoldedJournal, int] | None:
    """The checkpoint's state and line count, or None when there is none that matches data.

    Its records are kept settled, as the bytes of their lines (`batcher.journal.table`): each is
    decoded once here, to check it and find its key, then let go.
    """
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        lines = raw.split(b"\n")
        saved = orjson.loads(lines[0])
        length = saved["length"]
        if saved["version"] != _CHECKPOINT_VERSION or not 0 < length <= len(data) or data[length - 1] != 0x0A:
            return None
        if len(lines) != saved["records"] + 2 or lines[-1]:
            return None  # cut short, or more than it says
        if hashlib.sha256(memoryview(data)[:length]).hexdigest() != saved["sha256"]:
            return None
        records = RecordTable()
        for line in lines[1:-1]:
            row = orjson.loads(line)
            key = row[0]
            record_from(row)  # only to check it: a row that does not decode makes the checkpoint worthless
            if not isinstance(key, str) or key in records:
                return None
            records.put_row(key, line)
        folded = FoldedJournal(records=records, headers=saved["headers"], good_length=length)
        return folded, int(saved["lines"])
    except (ValueError, KeyError, TypeError, IndexError):
        return None


class Journal:
    """The one writer of a run's journal; holds the output folder's lock while open."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_NAME
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._dirty = False
        self._failed = False
        self.events_written = 0
        self.folded = FoldedJournal()
        """The journal's state: folded on open, and kept up to date by `append`."""
        self._checkpointed = 0
        """The journal's length at the last checkpoint this run wrote (0: none yet, so a long journal
        gets one early in the run, whatever tail the last run left after its own)."""

    def open(self) -> FoldedJournal:
        """Lock the folder, fold what is there, cut a torn tail, and get ready to append.

        Raises JournalError naming any symbolic link directly inside the
        folder, before anything is read or sent: a repository could have
        committed one (``state.jsonl -> ~/.bashrc``, a job folder pointing
        elsewhere) to make the run write through it. Deeper links are caught
        where batcher writes (see `batcher.confined`).
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            msg = f"cannot create the output folder {self.directory}: {exc.strerror}"
            raise JournalError(msg) from exc
        self._lock()
        try:
            with OutputDir(self.directory, error=JournalError) as folder:
                folder.refuse_links_in_root()
                # Opened before it is read: a link there must be neither read nor cut short.
                self._fd = folder.open_file((JOURNAL_NAME,), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            folded = self.folded = read_journal(self.path)
            if os.fstat(self._fd).st_size != folded.good_length:
                os.ftruncate(self._fd, folded.good_length)
            if folded.good_length and os.pread(self._fd, 1, folded.good_length - 1) != b"\n":
                os.write(self._fd, b"\n")  # a sound last line that lost only its newline
            folded.good_length = os.fstat(self._fd).st_size
        except OSError as exc:
            self.close()
            msg = f"cannot open the journal {self.path}: {exc.strerror}"
            raise JournalError(msg) from exc
        except BaseException:
            self.close()
            raise
        return folded

    def _lock(self) -> None:
        lock_path = self.directory / LOCK_NAME
        try:
            with OutputDir(self.directory, error=JournalError) as folder:
                fd = folder.open_file((LOCK_NAME,), os.O_RDWR | os.O_CREAT, 0o600)  # never through a link
        except OSError as exc:
            msg = f"cannot create the lock file {lock_path}: {exc.strerror}"
            raise JournalError(msg) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                msg = (
                    f"another batcher run (pid {holder}) is using {self.directory}; "
                    "wait for it to finish or stop it, then try again"
                )
                raise JournalLockedError(msg) from exc
            msg = f"cannot lock {lock_path}: {exc.strerror}"
            raise JournalError(msg) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def append(self, kind: EventKind, job: str | None = None, **fields: Any) -> JobRecord | None:
        """Write one event now and fold it into `folded`; returns the job's record.

        Raises JournalError (disk full, folder gone) so the run stops.
        """
        if self._fd is None:
            msg = "the journal is not open"
            raise JournalError(msg)
        event: dict[str, Any] = {"t": round(time.time(), 3), "e": kind}
        if job is not None:
            event["job"] = job
        event.update(fields)
        line = encode_event(event)
        if len(line) > MAX_LINE_BYTES:
            # Refused before a byte is written: no reader would take it, and a run must never write what its
            # resume cannot read. For a ``submitting`` intent this is a certain refusal (nothing was sent).
            msg = (
                f"the {kind!r} event of job {job} would be a journal line of {len(line):,} bytes, over the "
                f"{MAX_LINE_BYTES:,} batcher writes or reads; it is not written to {self.path}, and the run "
                "stops so that nothing goes unrecorded"
            )
            raise JournalCorruptError(msg)
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            self._failed = True
            msg = f"cannot write the journal {self.path}: {exc.strerror or exc}; the run stops so that nothing goes unrecorded"
            raise JournalError(msg) from exc
        self._dirty = True
        self.events_written += 1
        self.folded.good_length += len(line)
        if job is None:
            if kind == "run":
                self.folded.headers.append(event)
            return None
        record = self.folded.records.live(job)
        if record is None:
            record = self.folded.records[job] = JobRecord(job)
        record.apply(event)
        return record

    def due_checkpoint(self) -> Callable[[], None] | None:
        """A checkpoint of the journal as it stands now, to be written off the event loop, once
        `CHECKPOINT_EVERY_BYTES` were appended since the last one; None when none is due.

        The state is copied here, at a length every line of which is written, so the writing
        thread never sees a record change under it.
        """
        length = self.folded.good_length
        if self._fd is None or self._failed or length < CHECKPOINT_MIN_BYTES:
            return None
        if length - self._checkpointed < CHECKPOINT_EVERY_BYTES:
            return None
        self._checkpointed = length
        snapshot = _snapshot(self.folded, length)

        def write() -> None:
            with contextlib.suppress(OSError, JournalError):  # only a speed-up: a run never fails for want of one
                _write_snapshot(self.path, snapshot)

        return write

    def sync(self) -> None:
        """fsync what was appended since the last sync (called in groups, off the event loop)."""
        fd = self._fd
        if fd is not None and self._dirty:
            self._dirty = False
            with contextlib.suppress(OSError):
                os.fsync(fd)

    def close(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None
            if self.events_written and not self._failed and self.folded.good_length >= CHECKPOINT_MIN_BYTES:
                collecting = gc.isenabled()
                gc.disable()  # 200,000 short lists and no cycles: see read_journal
                try:
                    with contextlib.suppress(OSError):  # only a speed-up: a run never fails for want of one
                        write_checkpoint(self.path, self.folded, self.folded.good_length)
                finally:
                    if collecting:
                        gc.enable()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
