"""Local reference images: a path in ``image_urls`` is read, checked and sent inline as a ``data:`` URI.

Most people building a dataset have their reference images on disk. RunComfy's
own ComfyUI nodes (``runcomfy-com/comfyui-runcomfy-partner-nodes``) send local
images the same way: inline, as ``data:image/png;base64,...`` strings in the
image field, the whole request held under 64 MiB (``MAX_REQUEST_BYTES`` in
their ``runcomfy/client.py``, checked again in ``runcomfy/inputs.py``).

A local image goes through three forms:

- **as written**: ``refs/a.png`` (relative to the manifest's folder) or a
  ``file:`` URL, in any field whose schema format is ``image_uri``;
- **the reference**, what `Job.input` holds and so what the journal, the
  sidecars and ``metadata.jsonl`` record: ``file:refs/a.png#sha256=<hex>``
  — the path and the content hash, never the bytes. The job's identity
  counts only the hash (`identity_form`): editing the image re-runs its
  jobs, moving or renaming the folder does not;
- **as sent**: ``data:<mime>;base64,...``, built by `batcher.manifest.payload.payload_for` at submit
  time only, after checking that the file still has the hash the job was
  made with.

Loading checks each file once per load (`LocalImages`, cached by path,
mtime and size): inside the manifest's folder tree (`manifestfolder`'s
rules, links followed), a regular file, a PNG, JPEG, WEBP or GIF **by its
bytes** (a ``.png`` that is an HTML page is refused), within RunComfy's
limits for an inline image (`batcher.manifest.imagefit`: 6 MiB, 32 MP), with
the whole request under `MAX_REQUEST_BYTES`. With ``fit_images`` a file over
those limits is re-encoded to fit (`imagefit.fit_image`) and its reference
says so, ``file:refs/a.png#fit&sha256=<hex>``: the hash, and so the job's
identity, is of the re-encoded bytes, the bytes sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from ..confined import open_regular
from .folder import Confinement
from .imagefit import (
    FIT_HINT,
    LIMIT_SOURCE,
    MAX_FIT_SOURCE_BYTES,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    dimensions,
    fit_image,
    remember_fit,
)
from .problems import shorten
from .schema import FieldError, ModelSchema

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_REQUEST_BYTES",
    "STAND_IN",
    "LocalImages",
    "LocalSource",
    "Normalised",
    "check_inline_images",
    "decode_data_uri",
    "identity_form",
    "is_fitted",
    "is_local",
    "parse_reference",
    "sniff",
]

MAX_REQUEST_BYTES = 64 * 1024 * 1024
"""The largest request body, data URIs included: RunComfy's nodes refuse to send more (``client.py``)."""
STAND_IN = "data:image/png;base64,"
MAX_INLINE_IN_MANIFEST = 4096
"""The longest data: URI a manifest may hold itself (a tiny test image); longer ones belong in a file."""
"""What a checked local image (or a decoded data URI) is validated as: the shape it is sent in, without the bytes."""

# Magic numbers: the file's first bytes say what it is, whatever its name says.
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"WEBP", 8, "image/webp"),  # after "RIFF" and a length
)
_MIMES = frozenset(mime for _, _, mime in _MAGIC)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_REFERENCE = re.compile(r"^file:(?P<path>[^#]+)#(?P<fit>fit&)?sha256=(?P<sha>[0-9a-f]{64})$")
_DATA_URI = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),")
_SAFE = "/!$&'()*+,;=:@-._~"  # kept as written in a file: URL's path; '#', '%' and the rest are escaped


@dataclass(frozen=True, slots=True)
class LocalSource:
    """Where a job's local images are read from at submit time."""

    folder: Path
    """The manifest's folder: references are relative to it."""
    fields: tuple[tuple[str, bool], ...]
    """(name, whether it is a list) of the input fields holding references; no other field is read as one."""


@dataclass(slots=True)
class Normalised:
    """One job's input with its local images checked: what `Job.input` holds, and what the schema checks."""

    input: dict[str, Any]
    """Local paths replaced by their references (unchanged values are shared, not copied)."""
    for_schema: dict[str, Any]
    """The same with each local image as the `STAND_IN` data URI it will be sent as."""
    problems: list[tuple[str, str]] = field(default_factory=list)
    """(dotted field, message) for each file that failed its checks."""
    source: LocalSource | None = None
    """Set when the input names local images."""


def sniff(head: bytes) -> str | None:
    """The image type of bytes starting with head (at least 12 bytes of them), or None when not an image we send."""
    for magic, offset, mime in _MAGIC:
        if head[offset : offset + len(magic)] == magic and (mime != "image/webp" or head[:4] == b"RIFF"):
            return mime
    return None


def is_local(value: object) -> bool:
    """Whether value names a local file: a ``file:`` URL, or a path with no URL scheme at all."""
    if not isinstance(value, str) or not value or value.startswith("//"):  # "//host/x": a URL without a scheme
        return False
    return value[:5].lower() == "file:" or not _SCHEME.match(value)


def parse_reference(value: object) -> tuple[str, str] | None:
    """(path, sha256) of a reference ``file:<path>#sha256=<hex>``, or None when value is not one."""
    if not isinstance(value, str):
        return None
    found = _REFERENCE.match(value)
    return (unquote(found["path"]), found["sha"]) if found else None


def is_fitted(value: str) -> bool:
    """Whether a reference names a file sent re-encoded to fit (``#fit&sha256=``): its hash is of those bytes."""
    found = _REFERENCE.match(value)
    return bool(found and found["fit"])


def _reference(path_text: str, sha256: str, fitted: bool = False) -> str:
    # Percent-encoded so that a '#' or '%' in a file name cannot be read as the hash.
    return f"file:{quote(path_text, safe=_SAFE)}#{'fit&' if fitted else ''}sha256={sha256}"


def image_values(payload: dict[str, Any], fields: dict[str, bool]) -> Iterator[tuple[str, int | None, Any]]:
    """(field, index in its list or None, value) for every value of the image fields."""
    for name, is_list in fields.items():
        value = payload.get(name)
        if is_list and isinstance(value, list):
            for index, item in enumerate(value):
                yield name, index, item
        elif not is_list and name in payload:
            yield name, None, value


def _only_urls(value: object) -> bool:
    """Whether value (a field's value, or list of them) holds no local image for certain: URLs, or nothing."""
    if isinstance(value, str):
        return value.startswith(("https://", "http://"))
    if isinstance(value, list):
        return all(isinstance(item, str) and item.startswith(("https://", "http://")) for item in value)
    return True  # no string: nothing to read, the schema says what is wrong


def replaced(payload: dict[str, Any], changes: dict[tuple[str, int | None], Any]) -> dict[str, Any]:
    """A copy of payload with the given values replaced; lists are copied, never changed (jobs share them)."""
    if not changes:
        return payload
    result = dict(payload)
    for (name, index), value in changes.items():
        if index is None:
            result[name] = value
        else:
            if result[name] is payload[name]:
                result[name] = list(payload[name])
            result[name][index] = value
    return result


def dotted(name: str, index: int | None) -> str:
    return name if index is None else f"{name}.{index}"


def identity_form(payload: dict[str, Any], source: LocalSource | None) -> dict[str, Any]:
    """payload as a job's identity counts it: each local image as ``sha256:<hex>``, its content, not its path."""
    if source is None:
        return payload
    changes: dict[tuple[str, int | None], Any] = {}
    for name, index, value in image_values(payload, dict(source.fields)):
        found = parse_reference(value)
        if found is not None:
            changes[(name, index)] = f"sha256:{found[1]}"
    return replaced(payload, changes)


@dataclass(frozen=True, slots=True)
class _Checked:
    """A file that passed: its reference's hash, its type and size (of the re-encoded bytes when fitted)."""

    sha256: str
    mime: str
    size: int
    fitted: bool = False


class LocalImages:
    """Checks and hashes the local images of one load, each distinct file once (by path, mtime and size)."""

    def __init__(self, confined: Confinement | None, *, fit: bool = False) -> None:
        self.confined = confined
        """Where the files must lie; None when the user allows files outside the manifest's folder."""
        self.fit = fit
        """Re-encode a file over RunComfy's inline limits to fit (`imagefit.fit_image`), rather than refuse it."""
        self._found: dict[tuple[str, int, int, int], _Checked] = {}
        self._where: dict[tuple[Path, str], tuple[Path, str] | str] = {}
        self._refs: dict[tuple[str, str, bool], str] = {}
        self._loaded: dict[str, _Checked] = {}
        self._url_lists: dict[int, tuple[list[Any], bool]] = {}
        self._frozen = False

    def normalise(self, schema: ModelSchema, payload: dict[str, Any], folder: Path) -> Normalised:
        """payload with every local image in the schema's image fields checked and replaced by its reference."""
        fields = schema.image_fields
        if not fields or all(self._only_urls(payload.get(name)) for name in fields):
            return Normalised(payload, payload)  # the common case, 50,000 rows of URLs: kept cheap
        changes: dict[tuple[str, int | None], Any] = {}
        stand_ins: dict[tuple[str, int | None], Any] = {}
        problems: list[tuple[str, str]] = []
        sizes: list[_Checked] = []
        local_fields: dict[str, bool] = {}
        for name, index, value in image_values(payload, fields):
            if isinstance(value, str) and value[:5].lower() == "data:" and len(value) > MAX_INLINE_IN_MANIFEST:
                # Job.input goes into the journal's "submitting" line: a big data: URI would be copied there for
                # every job and every retry. A file beside the manifest is sent the same way, and journalled small.
                problems.append(
                    (
                        dotted(name, index),
                        f"a data: URI of {len(value):,} characters in the manifest would be copied into the journal "
                        "for every job; save the image beside the manifest and give its path instead",
                    )
                )
                continue
            if not is_local(value):
                continue
            local_fields[name] = fields[name]
            stand_ins[(name, index)] = STAND_IN  # a bad file is reported once, here, not again as "not a URL"
            checked = self._check(folder, value)
            if isinstance(checked, str):
                problems.append((dotted(name, index), f"{shorten(value)}: {checked}"))
                continue
            path_text, found = checked
            sizes.append(found)
            ref = self._refs.get((path_text, found.sha256, found.fitted))
            if ref is None:  # one string for every job naming the file: 50,000 rows share it
                ref = _reference(path_text, found.sha256, found.fitted)
                self._refs[(path_text, found.sha256, found.fitted)] = ref
            changes[(name, index)] = ref
        if not local_fields:
            return Normalised(payload, payload, problems)
        normalised = replaced(payload, changes)
        source = LocalSource(folder, tuple(local_fields.items()))
        if not problems and sizes:
            size = _request_size(normalised, source, sizes)
            if size > MAX_REQUEST_BYTES:
                problems.append(
                    (
                        next(iter(local_fields)),
                        f"with its local images inline the request would be {size / 2**20:.1f} MiB; RunComfy takes "
                        f"at most {MAX_REQUEST_BYTES / 2**20:g} MiB (use fewer or smaller images, or public URLs)",
                    )
                )
        return Normalised(normalised, replaced(payload, stand_ins), problems, source)

    def _only_urls(self, value: object) -> bool:
        """`_only_urls`, remembered for lists by identity: jobs of one entry (or of the defaults) share theirs."""
        if not isinstance(value, list):
            return _only_urls(value)
        known = self._url_lists.get(id(value))
        if known is not None and known[0] is value:
            return known[1]
        found = _only_urls(value)
        if len(self._url_lists) >= 256:
            self._url_lists.clear()
        self._url_lists[id(value)] = (value, found)  # the list kept alive, so its id names it alone
        return found

    def _check(self, folder: Path, value: str) -> tuple[str, _Checked] | str:
        """(reference path, what was found) for a local image that passes every check, else why not."""
        where = self._where.get((folder, value))
        if where is None:
            where = self._where[(folder, value)] = self._locate(folder, value)
        if isinstance(where, str):
            return where
        path, path_text = where
        if self._frozen and str(path) in self._loaded:
            return path_text, self._loaded[str(path)]
        try:
            status = path.stat()
        except FileNotFoundError:
            return f"no file {path} (local images are relative to the manifest's folder)"
        except OSError as exc:
            return f"cannot read {path}: {exc.strerror}"
        if stat.S_ISDIR(status.st_mode):
            return f"{path} is a folder, not an image file"
        if not stat.S_ISREG(status.st_mode):
            return f"{path} is not a regular file"
        key = (str(path), status.st_mtime_ns, status.st_size, status.st_ino)
        found = self._found.get(key)
        if found is None:
            checked = _read_checked(path, key, fit=self.fit)
            if isinstance(checked, str):
                return checked
            found = self._found[key] = checked
        self._loaded[str(path)] = found
        return path_text, found

    def freeze(self) -> None:
        """From now on, each file is what the load found: the jobs expanded again (a run streams them)
        keep the keys they were loaded with, and a file edited since is refused when it is sent."""
        self._frozen = True

    def _locate(self, folder: Path, value: str) -> tuple[Path, str] | str:
        """The file value names and the path its reference records, or why it may not be read."""
        text = _path_text(value)
        if text is None:
            return "a file: URL must name a file on this machine (file:relative/path or file:///absolute/path)"
        base = Path(os.path.abspath(folder))
        path = Path(os.path.normpath(base / text))
        if self.confined is not None and self.confined.escapes(path):
            # Checked before anything else: whether a file outside exists is none of the manifest's business.
            return self.confined.refusal("the image")
        # Recorded relative to the manifest's folder, so that moving the project changes nothing; a file
        # outside it (allowed by the user) as written: absolute, or relative with "..".
        inside = path.is_relative_to(base)
        recorded = str(path) if os.path.isabs(text) and not inside else os.path.relpath(path, base)
        return path, Path(recorded).as_posix()


def _path_text(value: str) -> str | None:
    """The file path value names: itself, or a ``file:`` URL's path (percent-decoded); None for another host's."""
    if value[:5].lower() != "file:":
        return value
    parts = urlsplit(value)
    if parts.netloc not in ("", "localhost"):
        return None
    text = unquote(parts.path)
    return text or None


def _read_checked(path: Path, key: tuple[str, int, int, int], *, fit: bool) -> _Checked | str:
    """Hash and type of the image file at path (key: its path, mtime, size and inode), or why it cannot be sent.

    A file over RunComfy's inline limits is refused, or with fit re-encoded: then the hash, type and size
    are the re-encoded bytes'.
    """
    size = key[2]
    if size == 0:
        return f"{path} is empty"
    digest = hashlib.sha256()
    try:
        with open_regular(path) as handle:  # a FIFO swapped in since the stat is refused, never waited on
            head = handle.read(64)
            mime = sniff(head)
            if mime is None:
                shown = head[:16].decode("ascii", "replace")
                return f"{path} is not a PNG, JPEG, WEBP or GIF image by its content (it starts {shown!r})"
            found = dimensions(handle)
            pixels = found[0] * found[1] if found else 0
            if size <= MAX_IMAGE_BYTES and pixels <= MAX_IMAGE_PIXELS:
                handle.seek(0)
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
                return _Checked(digest.hexdigest(), mime, size)
            over = f"{size / 2**20:.1f} MiB" if size > MAX_IMAGE_BYTES else f"{pixels / 1e6:.1f} megapixels"
            if not fit:
                return f"{path} is {over}; {LIMIT_SOURCE}: {FIT_HINT}"
            if size > MAX_FIT_SOURCE_BYTES:
                return f"{path} is {size / 2**20:.1f} MiB, too large to re-encode to fit (at most {MAX_FIT_SOURCE_BYTES // 2**20} MiB)"
            handle.seek(0)
            data = handle.read(MAX_FIT_SOURCE_BYTES + 1)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    try:
        fitted = fit_image(data)
    except ValueError as exc:
        return f"{path} is {over} and {exc}"
    sha256 = hashlib.sha256(fitted).hexdigest()
    remember_fit(key, sha256, fitted)
    return _Checked(sha256, "image/png", len(fitted), fitted=True)


def _data_uri_length(mime: str, size: int) -> int:
    return len(f"data:{mime};base64,") + 4 * math.ceil(size / 3)


def _request_size(payload: dict[str, Any], source: LocalSource, images: list[_Checked]) -> int:
    """The JSON body's size once every reference is replaced by its data URI (base64 needs no JSON escaping)."""
    bare = identity_form(payload, source)
    hashes = len(images) * len(json.dumps("sha256:" + "0" * 64))
    inline = sum(_data_uri_length(found.mime, found.size) + 2 for found in images)  # +2: the quotes
    return len(json.dumps(bare).encode()) - hashes + inline


# -- at submit time ---------------------------------------------------------------------------------

# -- receiving (the sandbox) -----------------------------------------------------------------------


def decode_data_uri(value: str) -> tuple[str, bytes]:
    """(mime, bytes) of an image data URI as RunComfy's nodes send it; ValueError saying what is wrong."""
    head = _DATA_URI.match(value)
    if head is None:
        msg = "is not a data: URI (data:<image type>;base64,<bytes>)"
        raise ValueError(msg)
    mime = head["mime"].strip().lower()
    if ";base64" not in head["params"].lower():
        msg = "is a data: URI without ';base64': images are sent base64-encoded"
        raise ValueError(msg)
    if mime not in _MIMES:
        msg = f"is a data: URI of {mime or 'no type'!r}; expected one of: {', '.join(sorted(_MIMES))}"
        raise ValueError(msg)
    encoded = value[head.end() :]
    if len(encoded) > _data_uri_length(mime, MAX_IMAGE_BYTES):
        msg = f"holds more than {MAX_IMAGE_BYTES // 2**20} MiB ({LIMIT_SOURCE})"
        raise ValueError(msg)
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        msg = f"is a data: URI whose content is not base64 ({exc})"
        raise ValueError(msg) from exc
    found = sniff(data[:64])
    if found is None:
        msg = "is a data: URI whose bytes are not a PNG, JPEG, WEBP or GIF image"
        raise ValueError(msg)
    if found != mime:
        msg = f"is a data: URI that says {mime} but holds {found}"
        raise ValueError(msg)
    return mime, data


def check_inline_images(schema: ModelSchema, payload: dict[str, Any]) -> tuple[dict[str, Any], list[FieldError]]:
    """Decode every data URI in the schema's image fields: payload with each as `STAND_IN`, and what was wrong.

    The stand-ins keep megabytes of base64 out of the schema check's cache of values.
    """
    problems: list[FieldError] = []
    changes: dict[tuple[str, int | None], Any] = {}
    for name, index, value in image_values(payload, schema.image_fields):
        if not (isinstance(value, str) and value[:5].lower() == "data:"):
            continue
        changes[(name, index)] = STAND_IN
        try:
            decode_data_uri(value)
        except ValueError as exc:
            problems.append(FieldError(dotted(name, index), str(exc)))
    return replaced(payload, changes), problems
