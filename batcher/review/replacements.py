"""Rejected images become new generations: the jobs `run --replace-rejected` submits.

A replacement is the rejected image's job again (same model, same input)
under a repeat index no manifest reaches: `REPLACEMENT_BASE` + n, where n
counts the images of that input (`decisions.input_group`) in the order they
were first rejected. ``decisions.jsonl`` is append-only, so that order never
changes: the n-th rejection of an input always names the same job, with the
same identity (`job.job_key`), and the journal says whether that job was
already sent, as it does for every other job. Running ``--replace-rejected``
again pays for nothing twice; taking a rejection back after its replacement
was sent keeps the replacement (it was paid for); a replacement rejected in
its turn gets the next index of the same input.

Replacements are jobs of the manifest's from then on (`with_replacements`
adds them with `Manifest.with_jobs`): `status`, `plan`, the gallery, the
review page and the exports see them like any other, named after the job
they replace (``london-giant-2-r1``). They are submitted only with
``--replace-rejected``; once the journal knows one, every run polls and
downloads it like the manifest's own.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import JournalCorruptError
from ..journal.records import JobRecord
from ..manifest.expand import MAX_REPEAT
from ..manifest.job import Job, job_key
from ..manifest.loader import Manifest
from ..manifest.localimages import identity_form
from ..output.folders import FolderView, is_shard_folder, read_folder
from .decisions import Decisions, input_group, read_decisions

__all__ = [
    "REPLACEMENT_BASE",
    "Replacement",
    "decisions_folder",
    "pending_replacements",
    "replacements",
    "with_replacements",
]

log = logging.getLogger(__name__)

_SOUND_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
REPLACEMENT_BASE = MAX_REPEAT
"""The first repeat index of replacements: past any ``repeat:`` a manifest may ask for, so raising a job's
repeat later never meets a replacement's identity."""


@dataclass(frozen=True, slots=True)
class Replacement:
    """The job that replaces one rejected image."""

    job: Job
    replaces: tuple[str, int]
    """The rejected image: (job key, output index)."""
    sent: bool
    """The journal knows the job: it was submitted (or tried), so it is the manifest's from now on."""
    wanted: bool
    """Its image is rejected now: ``--replace-rejected`` submits it if it was not sent."""


def decisions_folder(output_dir: Path) -> Path:
    """Where a folder's decisions are: its own, or for a shard's folder (``shard-K-of-N/``) the folder
    holding the shards, which `batcher review` reviews whole."""
    return output_dir.parent if is_shard_folder(output_dir) else output_dir


def replacements(manifest: Manifest, records: Mapping[str, JobRecord], decisions: Decisions) -> list[Replacement]:
    """Every rejected image's replacement, in the order the images were first rejected.

    An image whose job is neither in the manifest nor a replacement (edited
    away) still takes its number, so the others keep theirs; it has no job to
    copy, so it is not replaced.
    """
    if not decisions.first_rejections:
        return []
    wanted_keys = {key for key, _ in decisions.first_rejections}
    unsharded = manifest if manifest.shard is None else replace(manifest, shard=None)
    known = {job.key: job for job in unsharded.iter_jobs() if job.key in wanted_keys}
    roots: dict[str, str] = {key: job.name for key, job in known.items()}
    per_group: dict[str, int] = {}
    per_root: dict[str, int] = {}
    found: list[Replacement] = []
    for (key, index), recorded_group in decisions.first_rejections.items():
        base = known.get(key)
        group = recorded_group or (input_group(base) if base is not None else "")
        if not group:
            continue  # neither the decision nor the manifest says what it was generated from
        number = per_group.get(group, 0)
        per_group[group] = number + 1
        if base is None:
            continue
        root = roots[key]
        per_root[root] = per_root.get(root, 0) + 1
        repeat_index = REPLACEMENT_BASE + number
        new_key = job_key(base.model, identity_form(base.input, base.local), repeat_index)
        name = f"{root}-r{per_root[root]}"
        job = Job(new_key, name, base.model, base.input, repeat_index, base.line, base.source, base.local)
        known[new_key] = job
        roots[new_key] = root
        record = records.get(key)
        file = record.files.get(index) if record is not None else None
        rejected = decisions.of(key, index, file.sha256 if file is not None else None) == "rejected"
        found.append(Replacement(job, (key, index), sent=new_key in records, wanted=rejected))
    return found


def with_replacements(
    manifest: Manifest,
    output_dir: Path,
    *,
    submit_new: bool = False,
    view: FolderView | None = None,
    said: list[str] | None = None,
) -> Manifest:
    """manifest with the replacements of the images rejected in output_dir: those the journal already knows,
    and with submit_new those of the images rejected now that were not sent yet (``--replace-rejected``).

    Nothing is read but ``decisions.jsonl`` when there is none (the usual case). A damaged one
    (JournalCorruptError) is raised with submit_new; otherwise it must not stop a run: the replacements the
    journal knows are found past the damaged lines (`_sent_replacements`), and what to say about it goes
    into said (a run's caller shows it whatever ``-q`` says), else to the log.
    """
    folder = decisions_folder(output_dir)
    try:
        decisions = read_decisions(folder)
    except JournalCorruptError as exc:
        if submit_new:
            raise
        message = f"{exc}; until then no rejected image is replaced (the replacements already sent are finished)"
        if said is None:
            log.warning("%s", message)
        else:
            said.append(message)
        salvaged = read_decisions(folder, skip_damaged=True)
        return manifest.with_jobs(_sent_replacements(manifest, (view or read_folder(folder)).records, salvaged))
    if not decisions.first_rejections:
        return manifest
    records = (view or read_folder(folder)).records
    jobs = [r.job for r in replacements(manifest, records, decisions) if r.sent or (submit_new and r.wanted)]
    return manifest.with_jobs(jobs)


def _sent_replacements(manifest: Manifest, records: Mapping[str, JobRecord], decisions: Decisions) -> list[Job]:
    """The replacements the journal knows, from a decisions file read past its damaged lines.

    A lost line may have been an input's first rejection, which shifts the numbers of that input's later
    ones: so every input is tried at each number up to its rejections found plus the lines lost. Only
    the journal's jobs that the manifest does not hold are looked for, and none when there is none.
    """
    unknown = {key for key in records if not manifest.holds(key)}
    if not unknown:
        return []
    per_group: dict[str, int] = {}
    for group in decisions.first_rejections.values():
        per_group[group] = per_group.get(group, 0) + 1
    unsharded = manifest if manifest.shard is None else replace(manifest, shard=None)
    seen: set[str] = set()
    found: list[Job] = []
    for base in unsharded.iter_jobs():
        group = input_group(base)
        if group in seen:
            continue
        seen.add(group)
        identity = identity_form(base.input, base.local)
        for number in range(per_group.get(group, 0) + decisions.skipped):
            key = job_key(base.model, identity, REPLACEMENT_BASE + number)
            if key not in unknown:
                continue
            name = records[key].name
            name = name if _SOUND_NAME.fullmatch(name) else f"{base.name}-r{number + 1}"
            found.append(
                Job(key, name, base.model, base.input, REPLACEMENT_BASE + number, base.line, base.source, base.local)
            )
    return found


def pending_replacements(manifest: Manifest, output_dir: Path, *, view: FolderView | None = None) -> list[Job]:
    """The replacements ``run --replace-rejected`` would submit now: images rejected, replacements not sent;
    none while ``decisions.jsonl`` is damaged (``run --replace-rejected`` refuses then, naming the line)."""
    folder = decisions_folder(output_dir)
    try:
        decisions = read_decisions(folder)
    except JournalCorruptError:
        return []
    if not decisions.first_rejections:
        return []
    records = (view or read_folder(folder)).records
    return [r.job for r in replacements(manifest, records, decisions) if r.wanted and not r.sent]
