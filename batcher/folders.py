"""Which folder holds a manifest's run, and which journals already paid for its jobs.

A journal is the only record of what was paid for, so finding the right one
is part of the money promise. Three rules keep a person from paying twice by
taking an ordinary path:

- **One manifest, one default folder, from anywhere.** The default output is
  ``output/<manifest name>/`` under the manifest's *project root* (see
  `project_root`), never under the current folder: a cron job started from
  ``$HOME`` finds the same journal as a run started in the project.
- **A journal belongs to one API.** Each run's header records the API it
  talked to; a run against another API refuses the folder. Sandbox
  rehearsals default to ``output/sandbox/<name>/``, so "now drop
  ``--sandbox``" starts the real run in a clean folder.
- **A ledger of folders.** Every run notes (manifest, folder, API) in a small
  per-user file (``$XDG_STATE_HOME/batcher/ledger.jsonl``). Before the first
  submit, the journals of the other folders noted for the same manifest are
  read; a job one of them already submitted to the same API is never sent
  again because ``-o`` or the current folder changed (``--new-output`` is the
  explicit way to pay again).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from .errors import BatcherError, UsageError
from .manifest import Manifest
from .netpolicy import is_loopback_host
from .recordtable import RecordTable
from .state import JOURNAL_NAME, FileRecord, read_journal

__all__ = [
    "LOOPBACK_API",
    "SANDBOX_API",
    "FolderView",
    "api_identity",
    "check_journal_api",
    "check_ledger",
    "check_no_overlap",
    "default_output_dir",
    "forget_gone_folders",
    "is_rehearsal",
    "is_shard_folder",
    "ledger_path",
    "noted_folders",
    "parse_shard",
    "project_root",
    "read_folder",
    "refuse_linked_default",
    "rehearsal_only",
    "remember_folder",
    "shard_folder_name",
    "shard_folders",
]

SANDBOX_API = "sandbox"
"""The API identity of the in-process sandbox (``run --sandbox``)."""
LOOPBACK_API = "loopback"
"""The API identity of any server on loopback (``batcher sandbox``, a test's): its port changes
from one start to the next, and plain http is allowed only there, so it is never RunComfy."""
_SHARD_FOLDER = re.compile(r"shard-(\d+)-of-(\d+)")
_LEDGER_ENV = "BATCHER_LEDGER"


# -- where a manifest's run lives -------------------------------------------------------------


def project_root(manifest_path: Path) -> Path:
    """The folder a manifest's ``output/`` belongs in, whatever the current folder.

    The nearest folder at or above the manifest's that holds ``.git``; else,
    for a manifest in a folder named ``manifests``, that folder's parent;
    else the manifest's own folder.
    """
    folder = manifest_path.resolve().parent
    for candidate in (folder, *folder.parents):
        if (candidate / ".git").exists():
            return candidate
    return folder.parent if folder.name == "manifests" else folder


def default_output_dir(manifest: Manifest, shard: tuple[int, int] | None = None, *, sandbox: bool = False) -> Path:
    """``output/<name>/`` under the project root (``output/sandbox/<name>/`` for a rehearsal);
    a shard's is ``shard-K-of-N/`` inside it."""
    root = project_root(manifest.path) / "output"
    folder = (root / "sandbox" if sandbox else root) / manifest.name
    return folder / shard_folder_name(*shard) if shard else folder


def refuse_linked_default(folder: Path, manifest: Manifest) -> None:
    """Refuse a default output folder reached through a link below the project root.

    A repository could commit ``output`` or ``output/<name>`` as a link to make a
    run write elsewhere; a folder given with -o is the user's own choice and
    is followed.
    """
    root = project_root(manifest.path)
    current = root
    for part in folder.relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            msg = (
                f"{current} is a symbolic link (to {os.readlink(current)}): batcher does not follow links "
                "to its default output folder, since a repository could plant one. Give the folder with -o "
                "if you meant it, or remove the link"
            )
            raise UsageError(msg)


def shard_folder_name(part: int, shards: int) -> str:
    return f"shard-{part}-of-{shards}"


def is_shard_folder(folder: Path) -> bool:
    """True for a shard's own folder, ``shard-K-of-N``."""
    return _SHARD_FOLDER.fullmatch(folder.name) is not None


def shard_folders(output_dir: Path) -> list[Path]:
    """The shard folders inside output_dir, in order."""
    found = [p for p in output_dir.glob("shard-*-of-*") if _SHARD_FOLDER.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: tuple(int(n) for n in _SHARD_FOLDER.findall(p.name)[0][::-1]))


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` → ``(2, 4)``; raises UsageError for anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        msg = f"--shard takes K/N with 1 <= K <= N, like 2/4; got {text!r}"
        raise UsageError(msg)
    return int(match[1]), int(match[2])


# -- one view of a folder and its shards ------------------------------------------------------


@dataclass(slots=True)
class FolderView:
    """Every journal of an output folder summed: its own and its shards' (``shard-K-of-N/``).

    File paths in `records` are relative to the folder itself, so a gallery or
    dataset written there links into the shards' folders.
    """

    records: RecordTable = field(default_factory=RecordTable)
    journals: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    headers: list[dict[str, object]] = field(default_factory=list)


def read_folder(output_dir: Path) -> FolderView:
    """Fold output_dir's journal and its shards'; where two know a job, the one that sent more submits wins."""
    view = FolderView()
    for folder in [output_dir, *shard_folders(output_dir)]:
        if not (folder / JOURNAL_NAME).is_file():
            continue
        folded = read_journal(folder / JOURNAL_NAME)
        view.journals.append(folder / JOURNAL_NAME)
        view.warnings += folded.warnings
        view.headers += folded.headers
        prefix = "" if folder == output_dir else folder.name + "/"
        for key, record in folded.records.items():
            known = view.records.get(key)
            if known is not None and known.submits >= record.submits:
                continue
            if prefix:
                files = {i: FileRecord(prefix + f.path, f.bytes, f.sha256) for i, f in record.files.items()}
                record = replace(record, files=files)
            view.records[key] = record
    return view


def check_no_overlap(output_dir: Path, keys: Iterable[str]) -> None:
    """Refuse a run whose jobs another layout of the same output (sharded or not) already submitted.

    A shard's journal knows only its own slice: running 1/2 after 1/4, or
    unsharded after shards, would submit again what the other journal holds.
    """
    if _SHARD_FOLDER.fullmatch(output_dir.name):
        others = [output_dir.parent, *shard_folders(output_dir.parent)]
    else:
        others = shard_folders(output_dir)
    mine = set(keys)
    for other in others:
        if other == output_dir or not (other / JOURNAL_NAME).is_file():
            continue
        overlap = [k for k, r in read_journal(other / JOURNAL_NAME).records.items() if k in mine and r.submits]
        if overlap:
            msg = (
                f"{len(overlap)} of these jobs were already submitted by the run journalled in {other}; "
                "running them here would pay twice. Run with that run's --shard (or without --shard, "
                "if it had none), or give --output a folder of its own"
            )
            raise UsageError(msg)


# -- a journal belongs to one API --------------------------------------------------------------


def api_identity(base_url: str) -> str:
    """The API a base URL names, for comparing journals: scheme://host[:port], `SANDBOX_API`
    or `LOOPBACK_API`."""
    if base_url == SANDBOX_API:
        return SANDBOX_API
    parts = urlsplit(base_url)
    host = (parts.hostname or "").lower()
    if is_loopback_host(host):
        return LOOPBACK_API
    port = f":{parts.port}" if parts.port and parts.port != {"https": 443, "http": 80}.get(parts.scheme) else ""
    return f"{parts.scheme}://{host}{port}"


def check_journal_api(headers: Iterable[dict[str, object]], identity: str, output_dir: Path) -> None:
    """Refuse to use a folder whose journal was written against another API."""
    for header in headers:
        recorded = header.get("api_base")
        if not isinstance(recorded, str) or api_identity(recorded) == identity:
            continue
        msg = (
            f"the journal in {output_dir} belongs to runs against {_spoken(api_identity(recorded))}, and this "
            f"run is against {_spoken(identity)}: its jobs are not this API's. Give this run a folder of its "
            "own with -o (a --sandbox rehearsal's default is output/sandbox/<name>/, a real run's output/<name>/)"
        )
        raise UsageError(msg)


def rehearsal_only(headers: Iterable[dict[str, object]]) -> bool:
    """True when every run a journal's headers record was against a sandbox: its money was never charged."""
    bases = [header.get("api_base") for header in headers]
    return bool(bases) and all(isinstance(b, str) and is_rehearsal(api_identity(b)) for b in bases)


def is_rehearsal(identity: str) -> bool:
    """True for an API that charges nothing: the sandbox, in process or on loopback."""
    return identity in (SANDBOX_API, LOOPBACK_API)


def _spoken(identity: str) -> str:
    return {SANDBOX_API: "the in-process sandbox", LOOPBACK_API: "a server on loopback"}.get(identity, identity)


# -- the ledger of folders ------------------------------------------------------------------------


def ledger_path() -> Path:
    """``$BATCHER_LEDGER``, else ``$XDG_STATE_HOME/batcher/ledger.jsonl`` (``~/.local/state`` by default)."""
    explicit = os.environ.get(_LEDGER_ENV)
    if explicit:
        return Path(explicit)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "batcher" / "ledger.jsonl"


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


def remember_folder(manifest: Manifest, output_dir: Path, identity: str) -> None:
    """Note that output_dir holds a run of manifest against the API `identity` (once per triple)."""
    entry = _Entry(str(manifest.path.resolve()), manifest.name, str(output_dir.resolve()), identity)
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


def noted_folders(manifest: Manifest) -> list[Path]:
    """The output folders the ledger notes for this manifest (by path or name), that still hold a journal."""
    path = str(manifest.path.resolve())
    found = dict.fromkeys(Path(e.output) for e in _entries() if (e.manifest == path or e.name == manifest.name))
    return [folder for folder in found if (folder / JOURNAL_NAME).is_file()]


def check_ledger(manifest: Manifest, keys: Iterable[str], output_dir: Path, identity: str) -> None:
    """Refuse when sending these jobs from output_dir could pay for them twice.

    Two ways: another folder the ledger notes for the same API already
    submitted some of them (by job identity, so a renamed or copied manifest
    is caught too), or a folder noted for this manifest is gone (moved or
    archived: its journal is the only record of what it paid for).
    """
    here = str(output_dir.resolve())
    path = str(manifest.path.resolve())
    mine = set(keys)
    checked: set[str] = set()
    gone: list[Path] = []
    for entry in _entries():
        if entry.api != identity or entry.output in checked:
            continue
        checked.add(entry.output)
        other = Path(entry.output)
        if here.startswith(entry.output + os.sep) or entry.output.startswith(here + os.sep):
            continue  # a shard of this folder, or its parent: check_no_overlap's business
        if not (other / JOURNAL_NAME).is_file() and not shard_folders(other):
            # A rehearsal's folder may go freely (nothing was paid); the others' journals are the money.
            # By path only: another project's manifest may well have the same name (london.yaml).
            if identity != SANDBOX_API and entry.manifest == path:
                gone.append(other)
            continue
        if entry.output == here:
            continue  # this folder's own journal: the run resumes from it
        try:
            view = read_folder(other)
        except BatcherError:
            continue  # a journal that cannot be read is its own run's problem, reported there
        overlap = sum(1 for k, r in view.records.items() if k in mine and r.submits)
        if overlap:
            msg = (
                f"{overlap} of these jobs were already submitted from {other} (noted in {ledger_path()}); "
                f"sending them from {output_dir} would pay for them again. Go on with them there: {_resume_hint(other)} "
                "(or add --new-output to pay for them again here)"
            )
            raise UsageError(msg)
    if gone and not (output_dir / JOURNAL_NAME).is_file():
        # With a journal here, this folder is the run (a project moved whole); without one, the
        # jobs the gone folder paid for would be sent again from scratch.
        msg = (
            f"{gone[0]} held a run of this manifest against this API and its journal is gone: it was the only "
            "record of what that run paid for. If you moved the folder, run with -o <its new place>; if you "
            "deleted it on purpose, add --new-output (any jobs it submitted will be paid for again)"
        )
        raise UsageError(msg)


def _resume_hint(folder: Path) -> str:
    match = _SHARD_FOLDER.fullmatch(folder.name)
    if match:
        return f"-o {folder.parent} --shard {match[1]}/{match[2]}"
    return f"-o {folder}"


def forget_gone_folders() -> None:
    """Drop ledger entries whose folder no longer holds a journal (``--new-output`` said to pay again)."""
    path = ledger_path()
    entries = _entries()
    kept = [e for e in entries if (Path(e.output) / JOURNAL_NAME).is_file() or shard_folders(Path(e.output))]
    if len(kept) == len(entries):
        return
    lines = "".join(json.dumps({k: getattr(e, k) for k in e.__slots__}) + "\n" for e in kept)
    with contextlib.suppress(OSError):
        temporary = path.with_name(f".{path.name}.part")
        temporary.write_text(lines, encoding="utf-8")
        os.replace(temporary, path)
