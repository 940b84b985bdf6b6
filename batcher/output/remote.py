"""A run whose output is on object storage (S3 or GCS, through `batcher.output.storage.bucket.Bucket`): its journal made
durable in the bucket, its files uploaded, and a lease so that two machines do not run it at once.

The run itself works in a local working copy (`RemoteOutput.cache_dir`,
never under the current folder) exactly as it does in a local folder; the
bucket is the authority. Under the output's prefix::

    journal/00000000.jsonl, 00000001.jsonl, …   segments: consecutive byte ranges of state.jsonl
    journal/base-00000120.jsonl                  segments 0..119 in one object (written at a run's end)
    lease.json                                   which machine runs it, until when
    <job>/<key>-0.png, <job>/<key>.json, metadata.jsonl, index.html   as in a local folder

**The money rule.** A ``submitting`` intent is appended to the local journal
and then `RemoteRun.durable` PUTs every journal byte not yet in the bucket as
the next segment, before the POST leaves. Submits that arrive while a PUT is
out wait for it and go together in the next one (group commit), so
concurrent submits share PUTs. Every other event reaches the bucket within
`FLUSH_SECONDS`. A machine lost at any instant leaves in the bucket every
intent whose POST may have left: a resume elsewhere sees those jobs at
``submitting`` (held as *uncertain*, never resent on its own), and jobs whose
``submitted`` line had not been flushed yet are among them.

**Fencing.** Each segment is PUT only if absent (S3's ``If-None-Match: *``,
GCS's ``ifGenerationMatch=0``) under the next sequence number. Two writers of the same output (a machine thought dead that
is not) race for the same number: one PUT fails, and that run stops before
its POST. The log in the bucket is therefore always one writer's, in order.
The lease (`LEASE_SECONDS`, renewed while the run goes on) makes the common
case polite: a second machine is refused at the start, with who holds it and
until when. A lease is advisory (clocks, a race between two starts); the
conditional PUT is what keeps the journal whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import orjson

from ..confined import OutputDir, write_atomically
from ..errors import BatcherError, JournalCorruptError, JournalLockedError, ObjectTooLargeError, StorageError
from ..journal.records import FileRecord
from ..journal.store import CHECKPOINT_NAME, JOURNAL_NAME, LOCK_NAME
from . import storage
from .folders import shard_folder_name
from .storage import open_bucket
from .storage.bucket import MAX_OBJECT_BYTES, Bucket, RemoteOutput, upload

__all__ = [
    "FLUSH_SECONDS",
    "LEASE_SECONDS",
    "MirrorFigures",
    "RemoteRun",
    "StoredFiles",
    "journal_listing",
    "pull_view",
    "run_output",
]

log = logging.getLogger(__name__)

SEGMENTS = "journal/"
LEASE = "lease.json"
_LEASE_BYTES = 64 * 1024
"""A lease is a line of JSON: anything larger is not one."""
LEASE_SECONDS = float(os.environ.get("BATCHER_LEASE_SECONDS", 60))
"""How long a lease holds without renewal: after a lost machine, another takes over at most this late."""
FLUSH_SECONDS = float(os.environ.get("BATCHER_REMOTE_FLUSH_SECONDS", 1.0))
"""Events other than a submit's intent reach the bucket within this."""
_COMPACT_AFTER = 64
"""At a run's end, more segments than this are folded into one base object (fewer GETs on resume)."""
_SEGMENT = re.compile(r"journal/(\d{8})\.jsonl")
_BASE = re.compile(r"journal/base-(\d{8})\.jsonl")
_LOCAL_ONLY = frozenset({JOURNAL_NAME, CHECKPOINT_NAME, LOCK_NAME})
_SHARD = re.compile(r"(shard-\d+-of-\d+)/")
READ_CONCURRENCY = 16
"""Reads of one output (listings and journal GETs) at a time, on one client: 16 hide the round trips of
a region far away without queueing behind S3's 32 pooled connections."""
MAX_SEGMENTS = int(os.environ.get("BATCHER_MAX_SEGMENTS", 100_000))
"""The most journal segments batcher reads for one layout (a run's end folds more than `_COMPACT_AFTER` into
one base; a run killed again and again for a day flushes about 86,000)."""
MAX_JOURNAL_BYTES = MAX_OBJECT_BYTES
"""The most bytes of one layout's journal batcher reads: what a single base object may hold."""
MAX_VIEW_BYTES = 4 * MAX_OBJECT_BYTES
"""The most journal bytes of all an output's layouts read into one view (`pull_view`)."""


def run_output(output: RemoteOutput, shard: tuple[int, int] | None) -> RemoteOutput:
    """Where a run (or one shard of it) lives in the bucket: shards in ``shard-K-of-N/`` below the output."""
    return output.child(shard_folder_name(*shard)) if shard else output


@dataclass(frozen=True, slots=True)
class MirrorFigures:
    """What keeping the journal in the bucket cost a run: for the summary and the benchmark."""

    barriers: int
    """Submits that waited for their intent to be durable."""
    barrier_seconds: float
    """Their waits, summed."""
    segments: int
    """Journal PUTs (a submit's barrier and the periodic flushes share them)."""
    requests: int
    """Every call to object storage (journal, lease, uploads, listings)."""


def _journal_objects(url: str, listing: dict[str, int]) -> tuple[list[tuple[str, int]], int]:
    """The objects that make up a layout's journal, in order (the latest base, then the segments after it),
    each with its listed size; and the next segment number. Checked before anything is read: a gap is a
    JournalCorruptError, more than `MAX_SEGMENTS` segments or `MAX_JOURNAL_BYTES` bytes a StorageError
    saying so (a bucket may hold anything; what a read takes into memory is bounded)."""
    numbers = sorted(int(m[1]) for name in listing if (m := _SEGMENT.fullmatch(name)))
    bases = sorted(int(m[1]) for name in listing if (m := _BASE.fullmatch(name)))
    objects: list[tuple[str, int]] = []
    start = 0
    if bases:
        start = bases[-1]
        name = f"{SEGMENTS}base-{start:08d}.jsonl"
        objects.append((name, listing[name]))
    following = [n for n in numbers if n >= start]
    for expected, number in enumerate(following, start):
        if number != expected:
            msg = (
                f"{url}: journal segment {expected:08d} is missing but {number:08d} is there: "
                "segments are written in order, so the bucket's journal was changed by hand"
            )
            raise JournalCorruptError(msg)
    if len(following) > MAX_SEGMENTS:
        msg = (
            f"{url}: the journal is in {len(following):,} segments, over the {MAX_SEGMENTS:,} batcher reads "
            "(a run's end folds them into one; a run killed again and again for days leaves this many). "
            "Set BATCHER_MAX_SEGMENTS higher to read them all once: the next run's end folds them"
        )
        raise StorageError(msg)
    objects += [(f"{SEGMENTS}{number:08d}.jsonl", listing[f"{SEGMENTS}{number:08d}.jsonl"]) for number in following]
    total = sum(size for _, size in objects)
    if total > MAX_JOURNAL_BYTES:
        msg = (
            f"{url}: the journal's objects hold {total:,} bytes, over the {MAX_JOURNAL_BYTES:,} batcher reads "
            "of one journal: they are not what batcher wrote there"
        )
        raise StorageError(msg)
    return objects, start + len(following)


def _fetch(bucket: Bucket, keys: list[tuple[str, int]]) -> Generator[bytes]:
    """The objects' bytes, in order, `READ_CONCURRENCY` GETs at a time on one client (boto3's and
    google-cloud-storage's clients are documented as safe to share between threads). Each GET is bounded by
    the object's listed size (the journal's objects are written once, if absent, and never change) and by
    what one read allows."""

    def one(item: tuple[str, int]) -> bytes:
        name, size = item
        if size == 0:
            return b""  # listed empty: nothing to read (and a ranged GET of nothing is a 416 on GCS)
        data = bucket.get(name, max_bytes=min(size, storage.bucket.MAX_OBJECT_BYTES))
        if data is None:
            msg = f"{bucket.output.url}: {name} vanished while it was read (another machine compacting it?); try again"
            raise StorageError(msg)
        return data

    if len(keys) <= 1:
        yield from map(one, keys)
        return
    with ThreadPoolExecutor(min(READ_CONCURRENCY, len(keys)), thread_name_prefix="batcher-read") as pool:
        futures = [pool.submit(one, item) for item in keys]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()  # the first failure stops what has not started


def _read_segments(bucket: Bucket, listing: dict[str, int]) -> tuple[bytes, int]:
    """The journal the bucket holds, and the next segment number; JournalCorruptError for a gap."""
    objects, following = _journal_objects(bucket.output.url, listing)
    return b"".join(_fetch(bucket, objects)), following


class RemoteRun:
    """The bucket side of one run: open it with `RemoteRun.open`, which pulls, leases and keeps flushing."""

    def __init__(self, bucket: Bucket, folder: Path) -> None:
        self.bucket = bucket
        self.folder = folder
        self.holder = uuid.uuid4().hex
        self.stored: dict[str, int] = {}
        """Objects in the bucket (path relative to the output → size), as listed and as uploaded."""
        self._seq = 0
        self._flushed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pending: list[str] = []
        self._lease_until = 0.0
        self._barriers = 0
        self._barrier_seconds = 0.0
        self._segments = 0
        self.failed: str | None = None
        """Why flushing stopped (the bucket failed or another machine took over): no submit goes after it."""

    # -- opening: lease, then the journal from the bucket ----------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(cls, output: RemoteOutput, folder: Path) -> AsyncIterator[RemoteRun]:
        """Check the bucket, take the lease, rebuild the local journal from the bucket, and keep it
        flushed while the block runs; at its end, flush, upload every file, compact, let the lease go."""
        with open_bucket(output) as bucket:
            await anyio.to_thread.run_sync(bucket.check)
            run = cls(bucket, folder)
            await anyio.to_thread.run_sync(run._take_lease)
            await anyio.to_thread.run_sync(run._pull)
            flusher = threading.Thread(target=run._keep_flushing, name="batcher-remote", daemon=True)
            flusher.start()
            # No task group around the caller's block: its errors must reach the CLI as themselves.
            try:
                yield run
            except BaseException:
                with anyio.CancelScope(shield=True), contextlib.suppress(BatcherError, OSError):
                    await anyio.to_thread.run_sync(run._finish, flusher)  # save what can be saved
                raise
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(run._finish, flusher)

    def _take_lease(self) -> None:
        raw = self.bucket.get(LEASE, max_bytes=_LEASE_BYTES)
        if raw is not None:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                held = json.loads(raw)
                until = float(held["until"])
                if until > time.time() and not _dead_here(held):
                    when = time.strftime("%H:%M:%S", time.localtime(until))
                    msg = (
                        f"{self.bucket.output.url} is being run on {held.get('host', '?')} (pid {held.get('pid', '?')}); "
                        f"its lease runs until {when} and is renewed while that run goes on. If that machine is "
                        f"gone, the same command works once the lease lapses (at most {LEASE_SECONDS:g}s)"
                    )
                    raise JournalLockedError(msg)
        self._renew()

    def _renew(self) -> None:
        until = time.time() + LEASE_SECONDS
        lease = {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(), "until": until}
        self.bucket.put(LEASE, json.dumps(lease).encode())
        self._lease_until = until

    def _pull(self) -> None:
        """Make the local journal the bucket's; keep a longer local one only if the bucket's is its start (this
        machine's own events not flushed before a kill: its ``submitted`` lines are worth keeping)."""
        self.stored = self.bucket.listing()
        remote, self._seq = _read_segments(self.bucket, self.stored)
        self._flushed = len(remote)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        local = b""
        with contextlib.suppress(FileNotFoundError):
            local = (self.folder / JOURNAL_NAME).read_bytes()
        if len(local) >= len(remote) and local.startswith(remote):
            return
        with contextlib.suppress(FileNotFoundError):
            (self.folder / CHECKPOINT_NAME).unlink()  # derived from the local journal, which changes
        write_atomically(self.folder, JOURNAL_NAME, remote, mode=0o600)

    # -- the money rule ------------------------------------------------------------------------------

    async def durable(self) -> None:
        """Return once every journal line written so far is in the bucket (one PUT, shared by the submits
        waiting meanwhile). Raises StorageError, and the run stops, when that cannot be done."""
        if self.failed is not None:
            raise StorageError(self.failed)
        started = time.monotonic()
        target = os.stat(self.folder / JOURNAL_NAME).st_size
        if self._flushed < target:
            await anyio.to_thread.run_sync(self._flush_to, target)
        self._barriers += 1
        self._barrier_seconds += time.monotonic() - started

    def _flush_to(self, target: int) -> None:
        # Submits that came while a PUT was out find their lines flushed by it, or go together in the next.
        with self._lock:
            if self._flushed < target:
                self._flush()
        if self.failed is not None:
            raise StorageError(self.failed)

    def _flush(self) -> None:
        with open(self.folder / JOURNAL_NAME, "rb") as handle:
            handle.seek(self._flushed)
            data = handle.read()
        data = data[: data.rfind(b"\n") + 1]  # whole lines only: each append is one
        if not data:
            return
        name = f"{SEGMENTS}{self._seq:08d}.jsonl"
        # An SDK's retry of a PUT whose answer was lost finds the segment there: its own bytes mean it was ours.
        if not self.bucket.put(name, data, if_absent=True) and self._read_back(name, len(data)) != data:
            msg = (
                f"another machine wrote {self.bucket.output.url}'s journal ({name} exists): this run stops before "
                "sending anything more. Only one machine may run an output at a time"
            )
            self.failed = msg
            raise StorageError(msg)
        self._seq += 1
        self._segments += 1
        self._flushed += len(data)
        self.stored[name] = len(data)
        for line in data.splitlines():
            if b'"e":"downloaded"' in line:
                with contextlib.suppress(ValueError):
                    path = orjson.loads(line).get("path")
                    if isinstance(path, str):
                        self._pending.append(path)

    def _read_back(self, name: str, size: int) -> bytes | None:
        """The segment the bucket holds under name, if it is no larger than the one this run wrote."""
        try:
            return self.bucket.get(name, max_bytes=size)
        except ObjectTooLargeError:
            return None  # larger than what was written: not this run's

    def _keep_flushing(self) -> None:
        """The flusher thread: every `FLUSH_SECONDS`, the journal's new lines, the new files, the lease."""
        while not self._stop.wait(FLUSH_SECONDS):
            try:
                with self._lock:
                    self._flush()
                self._upload_pending()
                if self._lease_until - time.time() < LEASE_SECONDS * 2 / 3:
                    self._renew()
            except (BatcherError, OSError) as exc:
                # Kept for the next submit's `durable` to raise: no POST leaves after the bucket failed.
                self.failed = str(exc)
                log.error("object storage: %s", exc)
                return

    # -- files -----------------------------------------------------------------------------------------

    def present(self, known: FileRecord) -> bool:
        """True when the bucket holds the journalled file at its recorded size (uploaded by a run that
        checked its sha256 first): a resume on another machine does not fetch it again."""
        return self.stored.get(known.path) == known.bytes

    def _upload_pending(self) -> None:
        with self._lock:
            waiting, self._pending = self._pending, []
        self._upload(waiting)

    def _upload(self, paths: list[str]) -> None:
        if paths:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(self._upload_one, paths))

    def _upload_one(self, relative: str) -> None:
        local = self.folder / relative
        with contextlib.suppress(FileNotFoundError):
            size = local.stat().st_size
            if self.stored.get(relative) == size:
                return
            upload(self.bucket, local, relative)  # transient failures tried again; a refusal stops the run
            self.stored[relative] = size

    def _finish(self, flusher: threading.Thread) -> None:
        """The run's end (or its failure): the journal's last lines, every file not yet up, then the lease."""
        self._stop.set()
        flusher.join()
        with self._lock:
            self._flush()
        if self.failed is not None:
            raise StorageError(self.failed)
        self._upload_pending()
        self._upload(self._changed_files())
        self._compact()
        with contextlib.suppress(StorageError):
            self.bucket.delete([LEASE])

    def _changed_files(self) -> list[str]:
        found: list[str] = []
        for top, folders, files in os.walk(self.folder):
            folders[:] = [f for f in folders if not f.startswith(".")]
            for name in files:
                relative = os.path.relpath(os.path.join(top, name), self.folder).replace(os.sep, "/")
                if name.startswith(".") or relative in _LOCAL_ONLY:
                    continue
                if top == str(self.folder) or self.stored.get(relative) != os.path.getsize(os.path.join(top, name)):
                    found.append(relative)  # top-level files (metadata.jsonl, index.html) change in place
        return found

    def _compact(self) -> None:
        """Fold the segments into one base object when there are many (a resume then reads one object)."""
        numbers = sorted(int(m[1]) for name in self.stored if (m := _SEGMENT.fullmatch(name)))
        if len(numbers) <= _COMPACT_AFTER:
            return
        with open(self.folder / JOURNAL_NAME, "rb") as handle:
            data = handle.read(self._flushed)
        base = f"{SEGMENTS}base-{self._seq:08d}.jsonl"
        if not self.bucket.put(base, data, if_absent=True):
            return
        old = [name for name in self.stored if name != base and (_SEGMENT.fullmatch(name) or _BASE.fullmatch(name))]
        self.bucket.delete(old)
        for name in old:
            self.stored.pop(name, None)
        self.stored[base] = len(data)

    def files(self) -> StoredFiles:
        """The working copy, open, with the bucket's files counted as there (for metadata.jsonl)."""
        return StoredFiles(self.folder, self.stored)

    @property
    def figures(self) -> MirrorFigures:
        return MirrorFigures(self._barriers, self._barrier_seconds, self._segments, self.bucket.requests)


def _dead_here(held: dict[str, object]) -> bool:
    """True when the lease's holder was a process on this machine that is gone (a kill, a crash)."""
    pid = held.get("pid")
    if held.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# -- reading an output from anywhere ---------------------------------------------------------------


class StoredFiles(OutputDir):
    """A local view folder whose `has_file` answers from the bucket's listing (for status and report)."""

    def __init__(self, root: Path, stored: dict[str, int]) -> None:
        super().__init__(root, create=True)
        self.stored = stored

    def has_file(self, relative: str) -> bool:
        return relative in self.stored or super().has_file(relative)


def journal_listing(output: RemoteOutput) -> dict[str, int]:
    """The journal objects of the output and of its shards (path relative to the output → size), listed
    without reading one: a segment's name and size never change, so this says whether the journals did."""
    with open_bucket(output) as bucket:
        bucket.check()
        return _journal_listing(bucket)


def _journal_listing(bucket: Bucket) -> dict[str, int]:
    # One delimited listing finds the shard folders; their segments are then listed a few at a time (1,000
    # shards listed one after another took minutes against a store far away).
    found = [name for name in bucket.subfolders("shard-") if _SHARD.fullmatch(f"{name}/")]
    layouts = ["", *found]
    with ThreadPoolExecutor(min(READ_CONCURRENCY, len(layouts)), thread_name_prefix="batcher-list") as pool:
        listed = list(pool.map(lambda layout: bucket.listing(_within(layout, SEGMENTS)), layouts))
    return {name: size for part in listed for name, size in part.items()}


def pull_view(output: RemoteOutput, *, journals_only: bool = False) -> tuple[Path, dict[str, int]]:
    """A read-only local copy of the output's journals, its own and every shard's (``shard-K-of-N/``), laid
    out as a local output folder is, for `status`, `plan` and `report`; and the bucket's listing.

    One client, and the reads overlap (`READ_CONCURRENCY` at a time): a prefix of 1,000 shard folders is
    a few thousand small requests, not a few thousand round trips in a row. Before any journal is read,
    each layout's segments are counted and sized from the listing (`MAX_SEGMENTS`, `MAX_JOURNAL_BYTES`,
    and `MAX_VIEW_BYTES` for them all): past a cap, a StorageError says which and nothing is read.

    journals_only: list the journals alone (the listing returned holds nothing else): the shard folders in
    one delimited listing, then each one's ``journal/``, however many images the output holds, for a
    caller that reads what was paid for and no file.
    """
    with open_bucket(output) as bucket:
        bucket.check()
        listing = _journal_listing(bucket) if journals_only else bucket.listing()
        own: dict[str, dict[str, int]] = {"": {}}
        for name, size in listing.items():
            match = _SHARD.match(name)
            if match is None:
                own[""][name] = size
            else:
                own.setdefault(match[1], {})[name[match.end() :]] = size
        shards = sorted(shard for shard in own if shard)
        plans = {
            shard: _journal_objects(output.child(shard).url if shard else output.url, own[shard])[0]
            for shard in ["", *shards]
        }
        total = sum(size for objects in plans.values() for _, size in objects)
        if total > MAX_VIEW_BYTES:
            msg = (
                f"{output.url}: its {len(plans):,} layouts' journals hold {total:,} bytes, over the "
                f"{MAX_VIEW_BYTES:,} batcher reads at once; read one shard at a time (-o {output.url}/shard-K-of-N)"
            )
            raise StorageError(msg)
        keys = [(_within(shard, name), size) for shard, objects in plans.items() for name, size in objects]
        view = output.cache_dir().with_name(output.cache_dir().name + "-view")
        with contextlib.closing(_fetch(bucket, keys)) as data:
            for shard, objects in plans.items():
                journal = b"".join(next(data) for _ in objects)
                folder = view / shard if shard else view
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                with contextlib.suppress(FileNotFoundError):
                    (folder / CHECKPOINT_NAME).unlink()
                if journal or (folder / JOURNAL_NAME).exists():
                    write_atomically(folder, JOURNAL_NAME, journal, mode=0o600)
    return view, listing


def _within(layout: str, name: str) -> str:
    """name (``journal/00000000.jsonl``) in a layout's folder (``shard-2-of-4``), relative to the output."""
    return f"{layout}/{name}" if layout else name
