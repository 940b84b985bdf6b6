"""What one job is, and what it is called: its content identity, its shard, its folder name.

A job's identity (`Job.key`) is a hash of what is sent (model, input with
schema defaults filled) and its repeat index, so reordering jobs changes
nothing and editing a job re-runs that job alone; shards are cut by it, so
they are stable under reordering too. A local image counts by its content
(`batcher.manifest.localimages.identity_form`: its sha256, not its path), so editing
the image re-runs its jobs and moving or renaming the folder does not.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from .localimages import LocalSource

__all__ = ["Job", "in_shard", "job_key", "shard_of", "slug_name"]

_SLUG_DROP = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True, slots=True)
class Job:
    """One generation to run: what to send, and how to name what comes back."""

    key: str
    """Content identity: the journal's key for this job."""
    name: str
    """Safe for a folder name: the manifest's ``id`` or a slug of the prompt."""
    model: str
    input: dict[str, Any] = field(hash=False, compare=False)
    repeat_index: int = 0
    line: int | None = None
    """Where the job comes from, for messages: a line of `source`."""
    source: str = ""
    """The manifest, or the prompt file holding the job's row."""
    local: LocalSource | None = field(default=None, compare=False)
    """Where its local images are read from when it is sent (`batcher.manifest.payload.payload_for`); None without."""

    @property
    def origin(self) -> str:
        """``file:line`` of the job's entry or row."""
        return f"{self.source}:{self.line}" if self.line is not None else self.source


def job_key(model: str, payload: dict[str, Any], repeat_index: int) -> str:
    """The stable identity of a job; see the module docstring.

    payload is the input as its identity counts it: local images as their
    hashes (`batcher.manifest.localimages.identity_form`), everything else as sent.
    """
    canonical = _canonical(model, payload, repeat_index)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# One encoder for every key: json.dumps with options builds a new one per call, a third of the hash's cost.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_SHARED: dict[int, tuple[object, str]] = {}
"""Lists and objects many jobs share (an entry's image_urls), encoded once, by identity (kept alive)."""


def _canonical(model: str, payload: dict[str, Any], repeat_index: int) -> str:
    """``_CANONICAL.encode({"model": model, "input": payload, "repeat": repeat_index})``, the same string
    built from each value's own encoding: a str is encoded without building the encoder's machinery, a
    list shared by many jobs once. (Without indent, a value encodes alike alone and inside its object; a
    key that is not a str is left to the encoder, which sorts and words such keys its own way.)"""
    encode = _CANONICAL.encode
    if type(repeat_index) is not int:
        return encode({"model": model, "input": payload, "repeat": repeat_index})
    if not all(type(name) is str for name in payload):
        return encode({"model": model, "input": payload, "repeat": repeat_index})
    items = []
    for name in sorted(payload):
        label = _NAMES.get(name)
        if label is None:
            if len(_NAMES) >= 256:
                _NAMES.clear()
            label = _NAMES[name] = f"{encode(name)}:"
        value = payload[name]
        if type(value) is str:
            items.append(label + encode(value))
            continue
        if type(value) is not list and type(value) is not dict:
            items.append(label + encode(value))
            continue
        shared = _SHARED.get(id(value))
        if shared is None or shared[0] is not value:
            if len(_SHARED) >= 256:
                _SHARED.clear()
            shared = _SHARED[id(value)] = (value, encode(value))
        items.append(label + shared[1])
    return f'{{"input":{{{",".join(items)}}},"model":{encode(model)},"repeat":{repeat_index}}}'


_NAMES: dict[str, str] = {}
"""Each field's name encoded, with its colon."""


def shard_of(key: str, shards: int) -> int:
    """Which of `shards` slices (1-based) a job belongs to: by identity, so stable under reordering."""
    return int(key, 16) % shards + 1


def in_shard(key: str, shard: tuple[int, int] | None) -> bool:
    """Whether the job with this key is in shard ``(K, N)``, the K-th of N slices; every job is in None."""
    return shard is None or shard_of(key, shard[1]) == shard[0]


def slug_name(text: str, key: str) -> str:
    """A job's name when it has no ``id``: the first words of text (its prompt) and 12 hex digits of its key."""
    words = _SLUG_DROP.sub(" ", text.lower()).split()[:6]
    stem = "-".join(words)[:48].strip("-") or "job"
    return f"{stem}-{key[:12]}"
