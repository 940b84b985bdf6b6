"""The sandbox's outputs: small, valid, deterministic PNGs."""

from __future__ import annotations

import hashlib
import struct
import zlib

__all__ = ["make_png"]


def make_png(seed: str, size: int = 64) -> bytes:
    """A small, valid RGB PNG whose pixels depend on seed."""
    digest = hashlib.sha256(seed.encode()).digest()
    rows = []
    for y in range(size):
        row = bytearray(b"\x00")
        for x in range(size):
            row += bytes(((digest[0] + x * 3) % 256, (digest[1] + y * 3) % 256, digest[2 + (x * y) % 30]))
        rows.append(bytes(row))
    raw = b"".join(rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
