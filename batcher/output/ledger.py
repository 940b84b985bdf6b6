"""Which places already ran a manifest's jobs, for this user: the ledger, and the check made before a run pays.

Every run notes *(manifest, place, API)* in a small per-user file
(``$XDG_STATE_HOME/batcher/ledger.jsonl``). A place is a local output folder
(its absolute path) or a bucket output (its ``s3://`` or ``gs://bucket/prefix`` URL, with
``/shard-K-of-N`` for a shard's; never an endpoint or a credential). Before
the first submit, the journals of every other place noted for the same API
are read — a folder's from disk, a bucket's from the bucket — and a job one
of them already submitted is never sent again because ``-o`` or the current
folder changed, whichever way a run moved between disk and buckets
(``--new-output`` is the explicit way to pay again).

What the ledger cannot see: it is one user's on one machine. A bucket run
from another machine (a cluster's workers) is not in it; the bucket's own
check (`check_no_overlap` over every layout read from the prefix, in
`batcher.engine.runner`) catches another layout of the same prefix from anywhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BatcherError, UsageError
from ..journal.store import JOURNAL_NAME
from ..manifest.loader import Manifest
from .folders import SANDBOX_API, FolderView, read_folder, shard_folders
from .remote import pull_view
from .storage.bucket import RemoteOutput, parse_output

__all__ = [
    "Place",
    "check_ledger",
    "forget_gone_places",
    "ledger_path",
    "noted_buckets",
    "noted_folders",
    "remember_place",
]

log = logging.getLogger(__name__)

Place = Path | RemoteOutput
"""Where a run lives: a local output folder, or an output on object storage."""

_LEDGER_ENV = "BATCHER_LEDGER"
_SHARD_TAIL = re.compile(r"(.*)/shard-(\d+)-of-(\d+)")


def ledger_path() -> Path:
    """``$BATCHER_LEDGER``, else ``$XDG_STATE_HOME/batcher/ledger.jsonl`` (``~/.local/state`` by default)."""
    explicit = os.environ.get(_LEDGER_ENV)
    if explicit:
        return Path(explicit)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "batcher" / "ledger.jsonl"


def _spelled(place: Place) -> str:
    """A place as the ledger writes it: a folder's absolute path, a bucket output's URL."""
    return place.url if isinstance(place, RemoteOutput) else str(place.resolve())


def _place(spelled: str) -> Place | None:
    """A ledger line's place; None for one that is neither (a hand edit)."""
    try:
        remote = parse_output(spelled)
    except UsageError:
        return None
    return Path(spelled) if remote is None else remote


@dataclass(frozen=True, slots=True)
class _Entry:
    manifest: str
    name: str
    output: str
    api: str


def _entries() -> list[_Entry]:
    try:
        text = ledger_path().read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    found: list[_Entry] = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
            found.append(_Entry(str(row["manifest"]), str(row["name"]), str(row["output"]), str(row["api"])))
        except (ValueError, KeyError, TypeError):
            continue  # a torn or foreign line: the ledger is a safety net, not the truth
    return found


def remember_place(manifest: Manifest, place: Place, identity: str) -> None:
    """Note that place holds a run of manifest against the API `identity` (once per triple)."""
    entry = _Entry(str(manifest.path.resolve()), manifest.name, _spelled(place), identity)
    if entry in _entries():
        return
    path = ledger_path()
    line = json.dumps({"t": round(time.time()), **{k: getattr(entry, k) for k in entry.__slots__}}) + "\n"
    with contextlib.suppress(OSError):  # an unwritable home must not stop a run; the journal is the truth
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _of_manifest(manifest: Manifest) -> list[Place]:
    path = str(manifest.path.resolve())
    spelled = dict.fromkeys(e.output for e in _entries() if e.manifest == path or e.name == manifest.name)
    return [place for text in spelled if (place := _place(text)) is not None]


def noted_folders(manifest: Manifest) -> list[Path]:
    """The output folders the ledger notes for this manifest (by path or name), that still hold a journal."""
    return [p for p in _of_manifest(manifest) if isinstance(p, Path) and (p / JOURNAL_NAME).is_file()]


def noted_buckets(manifest: Manifest) -> list[RemoteOutput]:
    """The bucket outputs the ledger notes for this manifest (by path or name); not read (no network for a hint)."""
    return [p for p in _of_manifest(manifest) if isinstance(p, RemoteOutput)]


# -- the check ------------------------------------------------------------------------------------------


def _nested(here: Place, other: Place) -> bool:
    """True when one is a shard of the other (or inside it): `check_no_overlap`'s business, read from the
    folder or the bucket prefix itself, wherever the other run was made."""
    if isinstance(here, RemoteOutput) != isinstance(other, RemoteOutput):
        return False
    mine, theirs = _spelled(here), _spelled(other)
    sep = "/" if isinstance(here, RemoteOutput) else os.sep
    return mine.startswith(theirs + sep) or theirs.startswith(mine + sep)


def _holds_journal(folder: Path) -> bool:
    return (folder / JOURNAL_NAME).is_file() or bool(shard_folders(folder))


def _read_place(place: Place) -> FolderView | None:
    """Every journal of a place (a bucket's read from the bucket); None when it holds none (gone).

    Raises BatcherError or OSError when a bucket cannot be read (no credentials here, no such bucket).
    """
    if isinstance(place, Path):
        return read_folder(place) if _holds_journal(place) else None
    folder, _ = pull_view(place, journals_only=True)
    view = read_folder(folder)
    # pull_view writes each layout's journal as the bucket holds it: all empty when the prefix has none.
    return view if any(journal.stat().st_size for journal in view.journals) else None


def check_ledger(
    manifest: Manifest, keys: Iterable[str], here: Place, identity: str, *, journal_here: bool = False
) -> None:
    """Refuse when sending these jobs to here could pay for them twice.

    Three ways: another place the ledger notes for the same API already
    submitted some of them (by job identity, so a renamed or copied manifest
    is caught too); a place noted for this manifest is gone (a folder moved
    or archived, a prefix deleted: its journal was the only record of what it
    paid for), unless journal_here (here already holds this run's journal: a
    project moved whole); or a bucket noted for this manifest cannot be read
    now (it may hold the only record).
    """
    path = str(manifest.path.resolve())
    mine = set(keys)
    checked: set[str] = set()
    gone: list[str] = []
    for entry in _entries():
        if entry.api != identity or entry.output in checked:
            continue
        checked.add(entry.output)
        other = _place(entry.output)
        if other is None or _nested(here, other):
            continue
        # A rehearsal's place may go freely (nothing was paid); the others' journals are the money.
        # By path only: another project's manifest may well have the same name (london.yaml).
        ours = identity != SANDBOX_API and entry.manifest == path
        if entry.output == _spelled(here):  # this place's own entry: the run resumes from its journal
            there = _holds_journal(other) if isinstance(other, Path) else journal_here
            if ours and not there:
                gone.append(entry.output)
            continue
        try:
            view = _read_place(other)
        except (BatcherError, OSError) as exc:
            if isinstance(other, Path):
                continue  # a journal that cannot be read is its own run's problem, reported there
            if ours:
                msg = (
                    f"{entry.output} held a run of this manifest (noted in {ledger_path()}) and cannot be read "
                    f"now ({exc}): its journal is the only record of what that run paid for. Run where its bucket "
                    f"can be read, or go on there: {_resume_hint(entry.output)} (or add --new-output to pay again "
                    "for anything it submitted)"
                )
                raise UsageError(msg) from exc
            log.warning("could not read %s, noted in %s: %s", entry.output, ledger_path(), exc)
            continue
        if view is None:
            if ours:
                gone.append(entry.output)
            continue
        overlap = sum(1 for k, r in view.records.items() if k in mine and r.submits)
        if overlap:
            msg = (
                f"{overlap} of these jobs {'was' if overlap == 1 else 'were'} already submitted from {entry.output} (noted in {ledger_path()}); "
                f"sending them from {_spelled(here)} would pay for them again. Go on with them there: "
                f"{_resume_hint(entry.output)} (or add --new-output to pay for them again here)"
            )
            raise UsageError(msg)
    if gone and not journal_here:
        # With a journal here, this place is the run (a project moved whole); without one, the
        # jobs the gone place paid for would be sent again from scratch.
        msg = (
            f"{gone[0]} held a run of this manifest against this API and its journal is gone: it was the only "
            "record of what that run paid for. If you moved it, run with -o <its new place>; if you "
            "deleted it on purpose, add --new-output (any jobs it submitted will be paid for again)"
        )
        raise UsageError(msg)


def _resume_hint(spelled: str) -> str:
    match = _SHARD_TAIL.fullmatch(spelled)
    if match:
        return f"-o {match[1]} --shard {match[2]}/{match[3]}"
    return f"-o {spelled}"


def forget_gone_places() -> None:
    """Drop ledger entries whose place no longer holds a journal (``--new-output`` said to pay again).

    A bucket that cannot be read now is kept: unreadable is not gone.
    """
    path = ledger_path()
    entries = _entries()
    views: dict[str, bool] = {}
    for entry in entries:
        if entry.output not in views:
            views[entry.output] = _still_there(entry.output)
    kept = [e for e in entries if views[e.output]]
    if len(kept) == len(entries):
        return
    lines = "".join(json.dumps({k: getattr(e, k) for k in e.__slots__}) + "\n" for e in kept)
    with contextlib.suppress(OSError):
        temporary = path.with_name(f".{path.name}.part")
        temporary.write_text(lines, encoding="utf-8")
        os.replace(temporary, path)


def _still_there(spelled: str) -> bool:
    place = _place(spelled)
    if place is None:
        return False
    if isinstance(place, Path):
        return _holds_journal(place)
    try:
        return _read_place(place) is not None
    except (BatcherError, OSError):
        return True
