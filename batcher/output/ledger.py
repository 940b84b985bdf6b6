"""Which places already ran a manifest's jobs, for this user: the ledger, and the check made before a run pays.

Every run notes *(manifest, place, API)* in a small per-user file
(``$XDG_STATE_HOME/batcher/ledger.jsonl``). A place is a local output folder
(its absolute path) or a bucket output (its ``s3://`` or ``gs://bucket/prefix`` URL, with
``/shard-K-of-N`` for a shard's; never an endpoint or a credential).

**The rule.** Before the first submit, a job that any other place noted for
the same API already submitted refuses the run — a folder or prefix beside
this one, above it (``-o out`` after ``-o out/m``) or below it (``-o out/m/v2``),
whichever way a run moved between disk and buckets (``--new-output`` is the
explicit way to pay again). Only the shard layout of one run (``X`` and
``X/shard-K-of-N``, or two shards of ``X``) is left to `check_no_overlap`,
which reads every layout of ``X`` itself. A job this place's own journal
already submitted is not counted: the run resumes it, it does not send it.

**A place that cannot be read** (a damaged journal, no permission, a bucket
without credentials here) refuses: its journal may be the only record of what
it paid for. The message says what to do: repair it, ``batcher ledger forget
PLACE``, or ``--new-output``.

**A place that is gone** (its folder or prefix holds no journal): its summary
(below) still says which jobs it submitted. A run that would send one of them
again refuses (moved: ``-o`` its new place; deleted on purpose: ``batcher
ledger forget PLACE`` or ``--new-output``); a run none of whose jobs it sent
goes on. Refusing every run forever for a deleted folder would be wrong, and
so would forgetting a moved one's payments. Without a complete summary (noted
by an older batcher, or its last run was killed before its end) what it paid
is unknown: a place of this manifest refuses as before, another manifest's is
named in a warning.

**Summaries keep it cheap** (`batcher.output.placesummary`). Per place, ``<ledger>.places/<hash>.keys`` holds
the keys of the jobs it submitted (8 bytes each) and a stamp of its journals
(size, mtime and inode of each local journal; a bucket's journal objects and
their sizes, listed without reading them). A run's start reads the stamp and
the summary; a journal is folded again only when its stamp changed. Every
file read here has a size cap.

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
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BatcherError, UsageError
from ..journal.store import JOURNAL_NAME, read_journal
from ..manifest.loader import Manifest
from .folders import SANDBOX_API, FolderView, read_folder, shard_folders
from .placesummary import (
    ledger_path,
    local_stamp,
    mark_open,
    packed,
    read_local,
    read_summary,
    submitted,
    submitted_keys,
    summary_path,
    write_summary,
)
from .remote import pull_view
from .storage.bucket import RemoteOutput, parse_output

__all__ = [
    "NotedPlace",
    "Place",
    "check_ledger",
    "forget_gone_places",
    "forget_place",
    "ledger_path",
    "note_run_end",
    "noted_buckets",
    "noted_folders",
    "noted_places",
    "remember_place",
]

log = logging.getLogger(__name__)

Place = Path | RemoteOutput
"""Where a run lives: a local output folder, or an output on object storage."""

_SHARD_TAIL = re.compile(r"(.*)/shard-(\d+)-of-(\d+)")

LEDGER_MAX_BYTES = 16 * 1024 * 1024
"""The ledger is one short line per (manifest, place, API): past this it is not batcher's, or needs forgetting."""


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


def _entries(*, strict: bool = False) -> list[_Entry]:
    """The ledger's lines. strict (the check before paying): a ledger that cannot be read whole refuses;
    otherwise (a hint) what can be read."""
    path = ledger_path()
    try:
        with path.open("rb") as handle:
            data = handle.read(LEDGER_MAX_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        if strict:
            msg = (
                f"cannot read the ledger of places runs went to, {path} ({exc.strerror or exc}): the jobs "
                "other places already submitted cannot be checked. Fix its permissions, or add --new-output "
                "to go on without the check"
            )
            raise UsageError(msg) from exc
        return []
    if len(data) > LEDGER_MAX_BYTES and strict:
        msg = (
            f"the ledger of places runs went to, {path}, is over {LEDGER_MAX_BYTES // 2**20} MiB: that is not "
            "batcher's (one short line per place; `batcher ledger forget PLACE` forgets one). Move it aside "
            "(the places it notes are then no longer checked), or add --new-output to go on without the check"
        )
        raise UsageError(msg)
    found: list[_Entry] = []
    for line in data[:LEDGER_MAX_BYTES].decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            found.append(_Entry(str(row["manifest"]), str(row["name"]), str(row["output"]), str(row["api"])))
        except (ValueError, KeyError, TypeError):
            continue  # a torn or foreign line: the ledger is a safety net, not the truth
    return found


def _write_entries(entries: list[_Entry]) -> None:
    """Rewrite the ledger with entries; never one read only in part (past `LEDGER_MAX_BYTES`)."""
    path = ledger_path()
    with contextlib.suppress(OSError):
        if path.stat().st_size > LEDGER_MAX_BYTES:
            msg = f"{path} is over {LEDGER_MAX_BYTES // 2**20} MiB, so it was not read whole: move it aside"
            raise UsageError(msg)
    lines = "".join(json.dumps({k: getattr(e, k) for k in e.__slots__}) + "\n" for e in entries)
    temporary = path.with_name(f".{path.name}.part")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(lines)
    os.replace(temporary, path)


def remember_place(manifest: Manifest, place: Place, identity: str) -> None:
    """Note that place holds a run of manifest against the API `identity` (once per triple), and that a
    run of it is under way (`note_run_end` says it ended: until then its summary may miss jobs)."""
    entry = _Entry(str(manifest.path.resolve()), manifest.name, _spelled(place), identity)
    with contextlib.suppress(OSError):  # an unwritable home must not stop a run; the journal is the truth
        mark_open(entry.output)
    if entry in _entries():
        return
    path = ledger_path()
    line = json.dumps({"t": round(time.time()), **{k: getattr(entry, k) for k in entry.__slots__}}) + "\n"
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def note_run_end(place: Place, working_copy: Path | None = None) -> None:
    """A run of place ended (its journal closed, a bucket's flushed): its summary is made from its journals.

    working_copy: a bucket run's local journal folder (the bucket's journal as this run left it), read
    instead of the bucket; the summary is then stamped stale, so the next check lists the bucket again.
    Never raises: the summary is derived data, and a run's end must not fail on it.
    """
    spelled = _spelled(place)
    try:
        if isinstance(place, RemoteOutput):
            if working_copy is None:
                return
            keys = submitted_keys(read_journal(working_copy / JOURNAL_NAME).records.items())
            write_summary(spelled, None, keys, running=False)
        else:
            stamp = local_stamp(place, None)
            view = read_local(place, stamp) if stamp is not None else None
            write_summary(spelled, stamp, submitted_keys(view.records.items()) if view else array("Q"), running=False)
    except (BatcherError, OSError, ValueError) as exc:
        log.debug("could not summarize %s for the ledger: %s", spelled, exc)


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


def _run_root(spelled: str) -> str:
    match = _SHARD_TAIL.fullmatch(spelled)
    return match[1] if match else spelled


def _same_run(here: Place, other: Place) -> bool:
    """True for two layouts of one sharded run (X and X/shard-K-of-N, or two shards of X):
    `check_no_overlap` reads every layout of X itself, from the folder or the bucket prefix."""
    if isinstance(here, RemoteOutput) != isinstance(other, RemoteOutput):
        return False
    mine, theirs = _spelled(here), _spelled(other)
    return mine != theirs and _run_root(mine) == _run_root(theirs)


def _own_submitted(here: Place) -> set[int]:
    """The jobs here's own journal already submitted (a resume does not send them again); empty if unknown."""
    try:
        if isinstance(here, RemoteOutput):
            folder, _ = pull_view(here, journals_only=True)
        else:
            folder = here
        return set(submitted_keys(read_journal(folder / JOURNAL_NAME).records.items()))
    except (BatcherError, OSError):
        return set()


def check_ledger(
    manifest: Manifest, keys: Iterable[str], here: Place, identity: str, *, journal_here: bool = False
) -> None:
    """Refuse when sending these jobs to here could pay for them twice (see the module docstring).

    A place noted for the same API already submitted some of them (by job identity, so a renamed or
    copied manifest is caught too); a noted place cannot be read; or a place noted for this manifest
    is gone and what it paid is unknown, unless journal_here (here already holds this run's journal:
    a project moved whole).
    """
    path = str(manifest.path.resolve())
    mine = {packed(key) for key in keys}
    spelled_here = _spelled(here)
    places: dict[str, bool] = {}
    for entry in _entries(strict=True):
        if entry.api == identity:
            # A rehearsal's place may go freely (nothing was paid); the others' journals are the money.
            # By path only: another project's manifest may well have the same name (london.yaml).
            ours = identity != SANDBOX_API and entry.manifest == path
            places[entry.output] = places.get(entry.output, False) or ours
    own: set[int] | None = None
    gone: list[str] = []
    for spelled, ours in places.items():
        other = _place(spelled)
        if other is None or _same_run(here, other):
            continue
        if spelled == spelled_here:  # this place's own entry: the run resumes from its journal
            there = _holds_journal(other) if isinstance(other, Path) else journal_here
            if ours and not there:
                gone.append(spelled)
            continue
        try:
            known = submitted(other, spelled)
        except (BatcherError, OSError) as exc:
            raise UsageError(_unreadable(spelled, other, exc, mine)) from exc
        if known.keys is None:
            if ours:
                gone.append(spelled)
            else:
                log.warning(
                    "%s (noted in %s) is gone and which jobs it submitted is unknown: not checked. If it moved, "
                    "run it with -o <its new place>; else `batcher ledger forget %s`",
                    spelled,
                    ledger_path(),
                    spelled,
                )
            continue
        overlap = mine.intersection(known.keys)
        if overlap:
            own = _own_submitted(here) if own is None else own
            overlap -= own
        if not overlap:
            continue
        raise UsageError(_paid_there(spelled, spelled_here, len(overlap), gone=known.gone, ours=ours))
    if gone and not journal_here:
        # With a journal here, this place is the run (a project moved whole); without one, the
        # jobs the gone place paid for would be sent again from scratch.
        msg = (
            f"{gone[0]} held a run of this manifest against this API and its journal is gone: it was the only "
            "record of what that run paid for. If you moved it, run with -o <its new place>; if you "
            f"deleted it on purpose, `batcher ledger forget {gone[0]}` or add --new-output (any jobs it "
            "submitted will be paid for again)"
        )
        raise UsageError(msg)


def _paid_there(spelled: str, spelled_here: str, count: int, *, gone: bool, ours: bool) -> str:
    """Why a run is refused: count of its jobs were submitted from spelled (a place now gone, or not)."""
    if gone:
        held = (
            f"{spelled} held a run of this manifest against this API, which submitted {count} of these jobs,"
            if ours
            else f"{count} of these jobs {_were(count)} already submitted from {spelled} (noted in {ledger_path()}),"
        )
        return (
            f"{held} and its journal is gone: it was the only record of what that run paid for. If you moved it, "
            f"run with -o <its new place>; if you deleted it on purpose, `batcher ledger forget {spelled}` "
            "(or add --new-output): those jobs will be paid for again"
        )
    return (
        f"{count} of these jobs {_were(count)} already submitted from {spelled} (noted in {ledger_path()}); "
        f"sending them from {spelled_here} would pay for them again. Go on with them there: "
        f"{_resume_hint(spelled)} (or add --new-output to pay for them again here)"
    )


def _unreadable(spelled: str, place: Place, exc: BaseException, mine: set[int]) -> str:
    summary = read_summary(spelled)
    said = ""
    count = len(mine.intersection(summary.keys)) if summary is not None else 0
    if count:
        said = f"; when last read it had submitted {count} of these jobs"
    if isinstance(place, RemoteOutput):
        todo = f"Run where its bucket can be read, or go on there: {_resume_hint(spelled)}"
    else:
        todo = f"Repair it (`batcher status -o {spelled}` says what is wrong) or give it back its permissions"
    return (
        f"{spelled} held a run against this API (noted in {ledger_path()}) and cannot be read now ({exc}){said}: "
        f"its journal is the only record of what that run paid for. {todo}; if you no longer need it, "
        f"`batcher ledger forget {spelled}`; or add --new-output to pay again for anything it submitted"
    )


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


def _resume_hint(spelled: str) -> str:
    match = _SHARD_TAIL.fullmatch(spelled)
    if match:
        return f"-o {match[1]} --shard {match[2]}/{match[3]}"
    return f"-o {spelled}"


# -- pruning: --new-output, and `batcher ledger forget` ---------------------------------------------------


def forget_gone_places() -> None:
    """Drop ledger entries whose place no longer holds a journal (``--new-output`` said to pay again).

    A bucket that cannot be read now is kept: unreadable is not gone.
    """
    entries = _entries()
    views: dict[str, bool] = {}
    for entry in entries:
        if entry.output not in views:
            views[entry.output] = _still_there(entry.output)
    kept = [e for e in entries if views[e.output]]
    if len(kept) == len(entries):
        return
    with contextlib.suppress(OSError, UsageError):
        _write_entries(kept)
        for spelled, there in views.items():
            if not there:
                summary_path(spelled).unlink(missing_ok=True)


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


def forget_place(text: str) -> list[str]:
    """Drop a place (a folder, or a bucket URL) and its shards' from the ledger, with their summaries:
    their jobs are no longer checked. Returns the places forgotten (none: it was not noted)."""
    remote = parse_output(text)
    spelled = remote.url if remote is not None else str(Path(text).expanduser().resolve())
    entries = _entries()
    forgotten = {e.output for e in entries if e.output in (spelled, text) or _run_root(e.output) == spelled}
    if forgotten:
        _write_entries([e for e in entries if e.output not in forgotten])
        for place in forgotten:
            summary_path(place).unlink(missing_ok=True)
    return sorted(forgotten)


@dataclass(frozen=True, slots=True)
class NotedPlace:
    """One place in the ledger, as `batcher ledger list` shows it."""

    place: str
    apis: tuple[str, ...]
    manifests: tuple[str, ...]
    submitted: int | None
    """Jobs it submitted, as its summary says (None: no summary yet)."""
    as_of: float | None


def noted_places() -> list[NotedPlace]:
    """Every place the ledger notes, in the order first noted (nothing is read but the summaries)."""
    grouped: dict[str, tuple[dict[str, None], dict[str, None]]] = {}
    for entry in _entries():
        apis, manifests = grouped.setdefault(entry.output, ({}, {}))
        apis[entry.api] = None
        manifests[entry.manifest] = None
    found: list[NotedPlace] = []
    for spelled, (apis, manifests) in grouped.items():
        summary = read_summary(spelled)
        count = len(summary.keys) if summary is not None else None
        found.append(NotedPlace(spelled, tuple(apis), tuple(manifests), count, summary.t if summary else None))
    return found


def _were(count: int) -> str:
    return "was" if count == 1 else "were"
