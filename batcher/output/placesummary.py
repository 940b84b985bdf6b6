"""What did one noted place submit? Its summary beside the per-user ledger, kept cheap to read.

Per place, ``<ledger>.places/<hash>.keys`` holds the keys of the jobs it
submitted (8 bytes each, sorted) and a stamp of its journals (size, mtime and
inode of each local journal; a bucket's journal objects and their sizes,
listed without reading them). A run's start reads the stamp and the summary;
a journal is folded again only when its stamp changed, and what a summary knew
a place paid for stays known when the journal was rewritten rather than
appended to. Every file read here has a size cap. The rule that uses them is
`batcher.output.ledger`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..journal.store import JOURNAL_NAME
from .folders import FolderView, read_folder, shard_folders
from .remote import journal_listing, pull_view
from .storage.bucket import RemoteOutput

__all__ = [
    "JOURNAL_MAX_BYTES",
    "LEDGER_ENV",
    "SUMMARY_MAX_KEYS",
    "Known",
    "Summary",
    "ledger_path",
    "local_stamp",
    "mark_open",
    "packed",
    "read_local",
    "read_summary",
    "submitted",
    "submitted_keys",
    "summary_path",
    "write_summary",
]

Place = Path | RemoteOutput

LEDGER_ENV = "BATCHER_LEDGER"
_HEX_KEY = re.compile(r"[0-9a-f]{16}")
SUMMARY_MAX_KEYS = 32 * 1024 * 1024
"""A summary's keys (8 bytes each, 256 MiB): a place with more submitted jobs is refused, not read."""
_HEADER_MAX_BYTES = 16 * 1024 * 1024
"""A summary's first line (its stamp: a bucket's journal objects are listed there)."""
JOURNAL_MAX_BYTES = 1024**3
"""A local journal read for a summary, as a bucket's journal object is capped: past it the place is refused."""
_SUMMARY_VERSION = 1


def ledger_path() -> Path:
    """``$BATCHER_LEDGER``, else ``$XDG_STATE_HOME/batcher/ledger.jsonl`` (``~/.local/state`` by default)."""
    explicit = os.environ.get(LEDGER_ENV)
    if explicit:
        return Path(explicit)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "batcher" / "ledger.jsonl"


def summaries_folder() -> Path:
    path = ledger_path()
    return path.with_name(f"{path.stem}.places")


def summary_path(spelled: str) -> Path:
    return summaries_folder() / f"{hashlib.sha256(spelled.encode()).hexdigest()[:32]}.keys"


def packed(key: str) -> int:
    """A job key as 8 bytes: batcher's keys are 16 hex digits; anything else (a foreign journal's) is hashed."""
    if _HEX_KEY.fullmatch(key):
        return int(key, 16)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def submitted_keys(records: Iterable[tuple[str, Any]]) -> array[int]:
    return array("Q", sorted({packed(key) for key, record in records if record.submits}))


@dataclass(slots=True)
class Summary:
    stamp: object
    """The stamp of the journals the keys were read from (None: stale, read them again)."""
    keys: array[int]
    running: bool
    """A run of the place started and has not ended (or was killed): the keys may miss its submits."""
    t: float


def read_summary(spelled: str) -> Summary | None:
    """The place's summary; None when there is none or it is not sound (it is derived data: made again)."""
    try:
        with summary_path(spelled).open("rb") as handle:
            header = json.loads(handle.readline(_HEADER_MAX_BYTES))
            count = int(header["count"])
            if (
                header.get("v") != _SUMMARY_VERSION
                or header.get("place") != spelled
                or not 0 <= count <= SUMMARY_MAX_KEYS
            ):
                return None
            data = handle.read(count * 8 + 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(data) != count * 8:
        return None
    keys = array("Q")
    keys.frombytes(data)
    if sys.byteorder != "little":
        keys.byteswap()
    return Summary(header.get("stamp"), keys, bool(header.get("running")), float(header.get("t") or 0))


def write_summary(spelled: str, stamp: object, keys: array[int], *, running: bool) -> None:
    folder = summaries_folder()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    header = {"v": _SUMMARY_VERSION, "place": spelled, "count": len(keys), "running": running, "t": time.time()}
    data = array("Q", keys)
    if sys.byteorder != "little":
        data.byteswap()
    target = summary_path(spelled)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.part")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(json.dumps({**header, "stamp": stamp}).encode() + b"\n")
        handle.write(data.tobytes())
    os.replace(temporary, target)


def mark_open(spelled: str) -> None:
    """A run of the place starts: its summary keeps its keys, says so, and is stamped stale."""
    known = read_summary(spelled)
    write_summary(spelled, None, known.keys if known else array("Q"), running=True)


def local_stamp(folder: Path, known: object) -> dict[str, Any] | None:
    """Size, mtime and inode of each journal of folder (its own and its shards'); None when it holds none.

    known: the stamp a summary holds: while the folder's own mtime is the same, no shard folder came or
    went, so its list of shards is used and the folder (thousands of job folders) is not listed.
    Raises OSError when the folder cannot be read (no permission).
    """
    try:
        mtime = os.stat(folder).st_mtime_ns
    except (FileNotFoundError, NotADirectoryError):
        return None
    shards: list[str]
    if isinstance(known, dict) and known.get("dir") == mtime and isinstance(known.get("shards"), list):
        shards = [str(name) for name in known["shards"]]
    else:
        shards = [p.name for p in shard_folders(folder)]
    journals: dict[str, list[int]] = {}
    for name in ["", *shards]:
        try:
            found = os.stat(folder / name / JOURNAL_NAME)
        except (FileNotFoundError, NotADirectoryError):
            continue
        journals[name] = [found.st_size, found.st_mtime_ns, found.st_ino]
    if not journals:
        return None
    return {"dir": mtime, "shards": shards, "journals": journals}


def read_local(folder: Path, stamp: dict[str, Any]) -> FolderView:
    for name, (size, _, _) in stamp["journals"].items():
        if size > JOURNAL_MAX_BYTES:
            msg = f"its journal {folder / name / JOURNAL_NAME} is over {JOURNAL_MAX_BYTES // 2**30} GiB"
            raise UsageError(msg)
    return read_folder(folder)


@dataclass(frozen=True, slots=True)
class Known:
    """What the ledger knows a place submitted."""

    keys: array[int] | None
    """None: unknown (gone, and no complete summary)."""
    gone: bool


def submitted(place: Place, spelled: str) -> Known:
    """The jobs place submitted: from its summary while its journals' stamp holds, else read again.

    Raises BatcherError or OSError when the place cannot be read (damage, permission, a bucket without
    credentials here).
    """
    summary = read_summary(spelled)
    known_stamp = summary.stamp if summary is not None else None
    running = summary is not None and summary.running
    stamp: object
    if isinstance(place, RemoteOutput):
        listing = journal_listing(place)
        stamp = {"objects": listing} if listing else None
    else:
        stamp = local_stamp(place, known_stamp)
    if stamp is None:
        if summary is None or summary.running:
            return Known(None, gone=True)
        return Known(summary.keys, gone=True)
    if summary is not None and same_journals(summary.stamp, stamp):
        if summary.stamp != stamp:  # only the folder's own mtime moved: keep the shards' list it found
            with contextlib.suppress(OSError):
                write_summary(spelled, stamp, summary.keys, running=running)
        return Known(summary.keys, gone=False)
    if isinstance(place, RemoteOutput):
        folder, _ = pull_view(place, journals_only=True)
        view = read_folder(folder)
    else:
        assert isinstance(stamp, dict)
        view = read_local(place, stamp)
    keys = submitted_keys(view.records.items())
    if summary is not None and len(summary.keys) and not appended(summary.stamp, stamp):
        # Not only appended to since (rewritten, truncated, replaced, or unknown): what the summary
        # knew it paid for stays known, whatever the journal says now.
        keys = array("Q", sorted({*keys, *summary.keys}))
    if len(keys) > SUMMARY_MAX_KEYS:
        msg = f"it submitted over {SUMMARY_MAX_KEYS:,} jobs, more than the ledger summarizes"
        raise UsageError(msg)
    with contextlib.suppress(OSError):
        write_summary(spelled, stamp, keys, running=running)
    return Known(keys, gone=False)


def appended(stored: object, fresh: object) -> bool:
    """True when every journal the stored stamp names was only appended to (a bucket: its segments all
    still there): the journals read now are the whole truth, a refused submit taken back included."""
    if not isinstance(stored, dict) or not isinstance(fresh, dict):
        return False
    if "objects" in fresh:
        before, now = stored.get("objects"), fresh["objects"]
        return isinstance(before, dict) and all(now.get(name) == size for name, size in before.items())
    before, now = stored.get("journals"), fresh.get("journals")
    if not isinstance(before, dict) or not isinstance(now, dict):
        return False
    for name, (size, mtime, inode) in before.items():
        found = now.get(name)
        if found is None or found[2] != inode or found[0] < size or (found[0] == size and found[1] != mtime):
            return False
    return True


def same_journals(stored: object, fresh: object) -> bool:
    if not isinstance(stored, dict) or not isinstance(fresh, dict):
        return False
    if "objects" in fresh:
        return bool(stored.get("objects") == fresh["objects"])
    return bool(stored.get("journals") == fresh.get("journals"))
