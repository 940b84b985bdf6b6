"""RunComfy's limits on an inline image, and the re-encode that makes a too-large one fit (``--fit-images``).

RunComfy's own ComfyUI nodes (``runcomfy-com/comfyui-runcomfy-partner-nodes``,
``runcomfy/media.py``) send a local image inline as a PNG data URI and refuse
one over 6 MiB ("PNG input exceeds 6 MiB. Resize the image to fit the Model
API request limit.") or over 32,000,000 pixels ("Input exceeds 32 megapixels.
Resize it before sending to RunComfy."); the whole request stays under
64 MiB (``runcomfy/client.py``, ``runcomfy/inputs.py``). batcher holds local
images to the same numbers when the manifest is loaded.

`fit_image` re-encodes an image over them the way those nodes encode every
image: decoded, turned upright (EXIF orientation), RGB or RGBA, scaled down
(Lanczos) until it has at most 32 MP and its PNG is at most 6 MiB. The same
bytes in give the same bytes out, so a job's identity can be the hash of what
is sent. Pillow is an optional extra (``images``).
"""

from __future__ import annotations

import io
import math
import struct
from collections import OrderedDict
from contextvars import ContextVar
from typing import IO, Any

from ..errors import missing_package

__all__ = [
    "LIMIT_SOURCE",
    "MAX_FIT_SOURCE_BYTES",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "cached_fit",
    "dimensions",
    "fit_image",
    "fit_images_default",
    "remember_fit",
    "set_fit_images",
]

MAX_IMAGE_BYTES = 6 * 1024 * 1024
"""The largest image sent inline: RunComfy's nodes refuse a PNG over 6 MiB (``runcomfy/media.py``)."""
MAX_IMAGE_PIXELS = 32_000_000
"""The most pixels an image sent inline may have: RunComfy's nodes refuse more (``runcomfy/media.py``)."""
MAX_FIT_SOURCE_BYTES = 200 * 1024 * 1024
"""The largest file `fit_image` reads: past it, the image is the user's to shrink."""
LIMIT_SOURCE = (
    "RunComfy's own ComfyUI nodes send an image inline only up to 6 MiB and 32 megapixels, "
    '"to fit the Model API request limit" (runcomfy-com/comfyui-runcomfy-partner-nodes, runcomfy/media.py)'
)
FIT_HINT = "make it smaller, give a public URL instead, or let batcher re-encode it to fit: --fit-images (or fit_images: true in the manifest)"

_fit_default: ContextVar[bool] = ContextVar("fit_images", default=False)
_FIT_CACHE_BYTES = 64 * 1024 * 1024
_fitted: OrderedDict[tuple[str, int, int, int], tuple[str, bytes]] = OrderedDict()
"""(path, mtime, size, inode) → (sha256, re-encoded bytes) of the last files fitted: loading fits each once,
and the run that follows sends those bytes without decoding the image again."""
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def set_fit_images(value: bool) -> Any:
    """Fit too-large local images in later loads in this context (the CLI's --fit-images); returns the undo."""
    token = _fit_default.set(value)
    return lambda: _fit_default.reset(token)


def fit_images_default() -> bool:
    return _fit_default.get()


def dimensions(handle: IO[bytes]) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF, WEBP or JPEG file's header, read from its start; None when not found."""
    handle.seek(0)
    head = handle.read(32)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR" and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        return width, height
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        width, height = struct.unpack("<HH", head[6:10])
        return width, height
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp(head)
    if head[:2] == b"\xff\xd8":
        return _jpeg(handle)
    return None


def _webp(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30:
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25:
        b = head[21:25]
        return 1 + (b[0] | (b[1] & 0x3F) << 8), 1 + (b[1] >> 6 | b[2] << 2 | (b[3] & 0x0F) << 10)
    if chunk == b"VP8X" and len(head) >= 30:
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    return None


def _jpeg(handle: IO[bytes]) -> tuple[int, int] | None:
    """The frame size from a JPEG's first SOF marker, skipping segments by their lengths (no pixel read)."""
    handle.seek(2)
    for _ in range(1000):
        byte = handle.read(1)
        while byte == b"\xff":  # fill bytes before a marker
            byte = handle.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            continue  # markers without a length
        length_bytes = handle.read(2)
        if len(length_bytes) < 2:
            return None
        (length,) = struct.unpack(">H", length_bytes)
        if marker in _SOF:
            frame = handle.read(5)
            if len(frame) < 5:
                return None
            height, width = struct.unpack(">HH", frame[1:5])
            return width, height
        if length < 2:
            return None
        handle.seek(length - 2, io.SEEK_CUR)
        if handle.read(1) != b"\xff":
            return None
    return None


def fit_image(data: bytes) -> bytes:
    """data re-encoded as a PNG within `MAX_IMAGE_PIXELS` and `MAX_IMAGE_BYTES`, as RunComfy's nodes send images.

    Deterministic: the same data gives the same bytes (with the same Pillow). Raises ValueError when the
    image cannot be decoded, UsageError when Pillow is not installed.
    """
    try:
        from PIL import Image, ImageOps
    except ImportError as exc:
        raise missing_package("re-encoding a local image to fit (--fit-images)", "pillow", "images") from exc
    try:
        with Image.open(io.BytesIO(data)) as source:
            source.load()
            image = ImageOps.exif_transpose(source)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        msg = f"cannot be decoded to re-encode it ({exc})"
        raise ValueError(msg) from exc
    alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    mode = "RGBA" if alpha else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    width, height = image.size
    scale = min(1.0, math.sqrt(MAX_IMAGE_PIXELS / (width * height)))
    for _ in range(20):
        size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
        scaled = image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        scaled.save(buffer, format="PNG", icc_profile=image.info.get("icc_profile"))
        encoded = buffer.getvalue()
        if len(encoded) <= MAX_IMAGE_BYTES:
            return encoded
        scale *= math.sqrt(MAX_IMAGE_BYTES / len(encoded)) * 0.95
    msg = "cannot be re-encoded within 6 MiB"
    raise ValueError(msg)


def remember_fit(key: tuple[str, int, int, int], sha256: str, data: bytes) -> None:
    """Keep a fitted file's bytes for `cached_fit` (the last few, at most 64 MiB in all)."""
    _fitted[key] = (sha256, data)
    _fitted.move_to_end(key)
    while sum(len(d) for _, d in _fitted.values()) > _FIT_CACHE_BYTES and len(_fitted) > 1:
        _fitted.popitem(last=False)


def cached_fit(key: tuple[str, int, int, int], sha256: str) -> bytes | None:
    """The bytes `remember_fit` kept for this file as it is now, if they hash to sha256."""
    found = _fitted.get(key)
    return found[1] if found is not None and found[0] == sha256 else None
