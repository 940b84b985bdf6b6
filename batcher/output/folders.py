"""Which folder holds a manifest's run, and one view of a folder's journals and its shards'.

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
- **A ledger of places.** Every run notes where it lives in a per-user file,
  and a job another noted place already submitted is never sent again
  because ``-o`` or the current folder changed (`batcher.output.ledger`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import UsageError
from ..journal.store import JOURNAL_NAME, FileRecord, read_journal
from ..journal.table import RecordTable
from ..manifest.loader import Manifest
from ..net.policy import is_loopback_host

__all__ = [
    "LOOPBACK_API",
    "SANDBOX_API",
    "FolderView",
    "api_identity",
    "check_journal_api",
    "check_no_overlap",
    "default_output_dir",
    "is_rehearsal",
    "is_shard_folder",
    "parse_shard",
    "project_root",
    "read_folder",
    "refuse_linked_default",
    "rehearsal_only",
    "shard_folder_name",
    "shard_folders",
]

SANDBOX_API = "sandbox"
"""The API identity of the in-process sandbox (``run --sandbox``)."""
LOOPBACK_API = "loopback"
"""The API identity of any server on loopback (``batcher sandbox``, a test's): its port changes
from one start to the next, and plain http is allowed only there, so it is never RunComfy."""
_SHARD_FOLDER = re.compile(r"shard-(\d+)-of-(\d+)")


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
                f"{len(overlap)} of these jobs {'was' if len(overlap) == 1 else 'were'} already submitted by the run journalled in {other}; "
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
            f"run is against {_spoken(identity)}: its jobs are not this API's. To go on with those runs, "
            f"start this one as they were ({_as_started(recorded)}); for a new run, give it a folder of its "
            "own with -o (a --sandbox rehearsal's default is output/sandbox/<name>/, a real run's output/<name>/)"
        )
        raise UsageError(msg)


_SHOWN_BASE = re.compile(r"https?://[!-~]{1,200}")
"""A recorded API base worth repeating in a hint: a URL of visible characters (a journal can say anything)."""


def _as_started(recorded: str) -> str:
    """The option that points a run at the API a journal recorded (forgotten on a resume, most often)."""
    if recorded == SANDBOX_API:
        return "add --sandbox"
    if _SHOWN_BASE.fullmatch(recorded):
        return f"add --api-base {recorded}"
    return "with the --api-base they had"


def rehearsal_only(headers: Iterable[dict[str, object]]) -> bool:
    """True when every run a journal's headers record was against a sandbox: its money was never charged."""
    bases = [header.get("api_base") for header in headers]
    return bool(bases) and all(isinstance(b, str) and is_rehearsal(api_identity(b)) for b in bases)


def is_rehearsal(identity: str) -> bool:
    """True for an API that charges nothing: the sandbox, in process or on loopback."""
    return identity in (SANDBOX_API, LOOPBACK_API)


def _spoken(identity: str) -> str:
    return {SANDBOX_API: "the in-process sandbox", LOOPBACK_API: "a server on loopback"}.get(identity, identity)
