"""Which images a person accepted or rejected: ``decisions.jsonl``, beside the journal.

`batcher review` appends one line per click or key press::

    {"t":1764070000.1,"e":"decision","job":"3f2a…","index":0,"sha256":"9c…","decision":"rejected","input":"77…","crc":"…"}

The crash rules are the journal's (`batcher.journal.store`): each line carries a
CRC and is written with one ``os.write`` on an ``O_APPEND`` descriptor, then
fsynced before the page is told it is saved; a torn last line (a crash, a
power loss) is dropped with a warning and the file is cut back to its last
sound line before the next append, whatever its last byte; a damaged line
anywhere else is an error naming it. The file is append-only,
so the order in which images were first rejected never changes: the
replacements `run --replace-rejected` submits are numbered by it
(`batcher.review.replacements`).

It is a file of its own, not journal events, because the journal has one
writer holding the folder's lock for a whole run, and a person reviews while
a run goes on. Appends take an ``flock`` of the file itself, so two review
pages never interleave a tail repair with a write.

A decision is about one image, (job key, output index), and names the
sha256 of the file it was made on: it applies while that is the file the
journal records (an image whose bytes changed since is undecided again).
``input`` names the job's model and input (`input_group`), so a rejection
can be replaced even after its job left the manifest's numbering.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from ..confined import OutputDir
from ..errors import JournalCorruptError, JournalError, UsageError
from ..journal.store import decode_event, encode_event
from ..manifest.job import Job, job_key
from ..manifest.localimages import identity_form

__all__ = [
    "DECISIONS",
    "DECISIONS_NAME",
    "Decision",
    "DecisionLog",
    "Decisions",
    "ImageDecision",
    "ReviewCounts",
    "fold_decisions",
    "input_group",
    "read_decisions",
    "review_counts",
]

Decision = Literal["accepted", "rejected", "undecided"]
"""What a person said about one image; ``undecided`` also takes a decision back."""
DECISIONS: tuple[Decision, ...] = get_args(Decision)
DECISIONS_NAME = "decisions.jsonl"
_TAIL = 64 * 1024
"""How far back from the end a tail repair looks for the last newline (a line is a few hundred bytes)."""


def input_group(job: Job) -> str:
    """What a job generates from (model and input, not the repeat): its replacements are counted per group."""
    return job_key(job.model, identity_form(job.input, job.local), -1)


@dataclass(frozen=True, slots=True)
class ImageDecision:
    """The latest decision about one image."""

    decision: Decision
    sha256: str
    """The file it was made on."""
    t: float


@dataclass(slots=True)
class Decisions:
    """``decisions.jsonl`` folded: the latest decision per image, and every image's first rejection, in order."""

    latest: dict[tuple[str, int], ImageDecision] = field(default_factory=dict)
    first_rejections: dict[tuple[str, int], str] = field(default_factory=dict)
    """(job key, output index) -> input group, in the order the images were first rejected (dicts keep it)."""
    warnings: list[str] = field(default_factory=list)
    lines: int = 0
    skipped: int = 0
    """Damaged lines passed over (only when read with ``skip_damaged``)."""

    def of(self, key: str, index: int, sha256: str | None) -> Decision:
        """The decision that applies to the image now: undecided when none was made on these bytes.

        sha256 None (the journal records no file for it now): the latest decision stands.
        """
        found = self.latest.get((key, index))
        if found is None or (sha256 is not None and found.sha256 != sha256):
            return "undecided"
        return found.decision


def fold_decisions(data: bytes, source: str = DECISIONS_NAME, *, skip_damaged: bool = False) -> Decisions:
    """Fold the bytes of a decisions file; a torn last line is dropped with a warning, other damage raises
    (with skip_damaged, every damaged line is passed over and counted in `Decisions.skipped` instead)."""
    folded = Decisions()
    lines = data.split(b"\n")
    damaged: int | None = None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        event = decode_event(line)
        decision = _decision(event) if event is not None else None
        if decision is None:
            damaged = damaged or number
            folded.skipped += skip_damaged
            continue
        if damaged is not None and not skip_damaged:
            msg = (
                f"{source} line {damaged} is damaged but later lines are sound: the file was changed or the disk "
                "corrupted it. Keep a copy, then remove that line by hand to go on (its decision is then lost)"
            )
            raise JournalCorruptError(msg)
        folded.lines += 1
        key, index, made = decision
        folded.latest[(key, index)] = made
        if made.decision == "rejected" and (key, index) not in folded.first_rejections:
            group = event.get("input") if event is not None else None
            folded.first_rejections[(key, index)] = group if isinstance(group, str) else ""
    if damaged is not None and not skip_damaged:
        folded.warnings.append(
            f"{source}: dropped a torn last line (line {damaged}), as a crash or power loss leaves; nothing else was lost"
        )
    return folded


def _decision(event: dict[str, object]) -> tuple[str, int, ImageDecision] | None:
    """(job key, output index, decision) of a sound decision event, else None."""
    key, index, sha256, decision, t = (event.get(k) for k in ("job", "index", "sha256", "decision", "t"))
    if event.get("e") != "decision" or not isinstance(key, str) or not isinstance(sha256, str):
        return None
    if isinstance(index, bool) or not isinstance(index, int) or decision not in DECISIONS:
        return None
    made = ImageDecision(decision, sha256, float(t) if isinstance(t, int | float) else 0.0)
    return key, index, made


def read_decisions(output_dir: Path, *, skip_damaged: bool = False) -> Decisions:
    """The decisions recorded in output_dir (none when it has no ``decisions.jsonl``), read without a lock.

    Raises JournalCorruptError for a damaged line before the last (unless skip_damaged: see
    `fold_decisions`), JournalError for a link or a device there.
    """
    try:
        with OutputDir(output_dir, error=JournalError) as folder:
            fd = folder.open_file((DECISIONS_NAME,), os.O_RDONLY)
    except FileNotFoundError:
        return Decisions()
    except OSError as exc:
        msg = f"cannot read {output_dir / DECISIONS_NAME}: {exc.strerror or exc}"
        raise JournalError(msg) from exc
    with open(fd, "rb") as handle:
        return fold_decisions(handle.read(), str(output_dir / DECISIONS_NAME), skip_damaged=skip_damaged)


class DecisionLog:
    """The one writer of decisions: `append` records one, durably, before it returns. Use it as a context manager."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / DECISIONS_NAME
        try:
            with OutputDir(output_dir, error=JournalError) as folder:
                # Never through a link: a repository could commit decisions.jsonl -> ~/.bashrc.
                self._fd: int | None = folder.open_file((DECISIONS_NAME,), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            msg = f"cannot open {self.path}: {exc.strerror or exc}"
            raise JournalError(msg) from exc

    def __enter__(self) -> DecisionLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def append(self, key: str, index: int, sha256: str, decision: Decision, group: str) -> None:
        """Record a decision about image (key, index), made on the file with this sha256; fsynced on return.

        Raises UsageError for a decision that is not one, JournalError when it cannot be written.
        """
        if decision not in DECISIONS:
            msg = f"{decision!r} is not a decision; expected one of {', '.join(DECISIONS)}"
            raise UsageError(msg)
        if self._fd is None:
            msg = f"{self.path} is closed"
            raise JournalError(msg)
        event = {"t": round(time.time(), 3), "e": "decision", "job": key, "index": index, "sha256": sha256}
        line = encode_event({**event, "decision": decision, "input": group})
        fd = self._fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                self._mend_tail(fd)
                if os.write(fd, line) != len(line):
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            msg = f"cannot write {self.path}: {exc.strerror or exc}; the decision was not saved"
            raise JournalError(msg) from exc

    def _mend_tail(self, fd: int) -> None:
        """Before an append, as the journal does: the file is cut back to its last sound line, whatever its
        last byte (a damaged line that ends in a newline too: appending after it would make it a damaged line
        before a sound one); a sound last line that lost only its newline gets it back."""
        size = os.fstat(fd).st_size
        if not size:
            return
        start = max(0, size - _TAIL)
        tail = os.pread(fd, size - start, start)
        end = len(tail)
        while end:
            terminated = tail[end - 1 : end] == b"\n"
            begin = tail.rfind(b"\n", 0, end - terminated) + 1
            line = tail[begin : end - terminated]
            event = decode_event(line) if b"\0" not in line else None
            if event is not None and _decision(event) is not None:
                if not terminated:
                    os.write(fd, b"\n")
                break
            if begin == 0 and start > 0:
                msg = f"{self.path} ends in a line longer than {_TAIL} bytes: it is not batcher's; move it aside"
                raise JournalCorruptError(msg)
            end = begin  # a damaged, torn or blank line after the last sound one: cut off
        if end < len(tail):
            os.ftruncate(fd, start + end)


@dataclass(slots=True)
class ReviewCounts:
    """Images by decision, as `status` and the review page count them."""

    accepted: int = 0
    rejected: int = 0
    undecided: int = 0

    @property
    def images(self) -> int:
        return self.accepted + self.rejected + self.undecided


def review_counts(images: Iterable[tuple[str, int, str]], decisions: Decisions) -> ReviewCounts:
    """Count images, given as (job key, output index, sha256), by the decision that applies to each."""
    counts = ReviewCounts()
    for key, index, sha256 in images:
        found = decisions.of(key, index, sha256)
        setattr(counts, found, getattr(counts, found) + 1)
    return counts
