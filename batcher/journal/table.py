"""Where the folded records live in memory: live while a run may change them, settled as bytes otherwise.

A night of 100,000 jobs folds to 100,000 `JobRecord`s, about 1.5 KB each
as Python objects (the record, its lists and dict, a dozen strings and
floats): 150 MB for records nobody will change again. So a record the run
is done with is *settled*: kept as its checkpoint row, one JSON bytes
object of about 500 bytes, and decoded again whenever it is read. Reading
one gives a fresh copy; changing one goes through `RecordTable.live`, which
decodes it and keeps the live object from then on, so a change is never
made to a copy that is then dropped.

The row is also what a checkpoint holds, line by line. Settled in a run,
it is kept deflated with the table's first settled row as the dictionary
(rows of one run share their URLs, model and shape): about 90 bytes instead
of 500, for 5 µs to settle and 1 µs to inflate. A checkpoint's rows load as
they are, undeflated, so a resume spends no time on them.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, MutableMapping
from typing import Any

import orjson

from .records import FileRecord, JobRecord

__all__ = ["RECORD_FIELDS", "RecordTable", "Rows", "record_from", "record_row"]

RECORD_FIELDS = 21
"""The length of a record's row; a row of another length is not one of this version's."""


def record_row(record: JobRecord) -> list[Any]:
    """A record as a positional row (its fields in order). Lists are copied: a checkpoint taken during a
    run is encoded while the records go on changing."""
    files = [[index, f.path, f.bytes, f.sha256] for index, f in record.files.items()]
    return [
        record.key,
        record.name,
        record.phase,
        record.request_id,
        record.remote_state,
        list(record.outputs),
        files,
        record.error,
        record.cost,
        record.submits,
        list(record.request_ids),
        record.submitted_at,
        record.finished_at,
        record.duration,
        record.spent,
        record.refused,
        record.model,
        record.result_url,
        record.account,
        record.failure,
        dict(record.throttled) if record.throttled else None,
    ]


def record_from(row: list[Any]) -> JobRecord:
    """The record a row holds (the row is changed in place: this runs for every record of a resume).

    Raises ValueError, TypeError or IndexError for a row that is not one.
    """
    if len(row) != RECORD_FIELDS:
        msg = f"a record row has {RECORD_FIELDS} fields, not {len(row)}"
        raise ValueError(msg)
    files = row[6]
    row[6] = {index: FileRecord(path, size, digest) for index, path, size, digest in files} if files else {}
    return JobRecord(*row)


# A 1 KB window holds the dictionary row and the row; memory level 2 keeps each compressor's state small.
_WBITS = -10
_DEFLATED = b"\x00"
"""The first byte of a deflated row (a row as JSON starts with ``[``)."""


def _encoded(record: JobRecord) -> bytes:
    return orjson.dumps(record_row(record))


def _thawed(row: bytes) -> JobRecord:
    found = orjson.loads(row)
    assert isinstance(found, list)  # rows are only ever made by _encoded or read back checked
    return record_from(found)


_LENGTH_BITS = 24
"""A stored row's place in the arena is one int: its offset, then 24 bits of length (rows are far shorter)."""


class RecordTable(MutableMapping[str, JobRecord]):
    """The journal's records by job key (see the module docstring).

    Settled rows live in one growing arena, each named by an int (offset and length): 100,000 rows as
    100,000 small bytes objects, scattered among a night's short-lived objects, kept twice their size
    resident in half-used memory pages; one block grows in place.
    """

    __slots__ = ("_arena", "_dictionary", "_rows")

    def __init__(self) -> None:
        self._rows: dict[str, JobRecord | int] = {}
        self._arena = bytearray()
        self._dictionary: bytes | None = None
        """The deflate dictionary: the first row this table settled."""

    def _fits(self, stored: bytes) -> bool:
        """Whether a row's length fits its place's length field (a row of 16 MB stays a live record)."""
        return len(stored) < 1 << _LENGTH_BITS

    def _keep(self, stored: bytes) -> int:
        place = len(self._arena) << _LENGTH_BITS | len(stored)
        self._arena += stored
        return place

    def _row(self, place: int) -> bytes:
        start = place >> _LENGTH_BITS
        return _inflated(bytes(self._arena[start : start + (place & ((1 << _LENGTH_BITS) - 1))]), self._dictionary)

    def _record(self, stored: JobRecord | int) -> JobRecord:
        return stored if isinstance(stored, JobRecord) else _thawed(self._row(stored))

    def __getitem__(self, key: str) -> JobRecord:
        return self._record(self._rows[key])

    def get(self, key: str, default: Any = None) -> Any:  # the hot path: no KeyError raised and caught
        found = self._rows.get(key)
        return default if found is None else self._record(found)

    def __setitem__(self, key: str, record: JobRecord) -> None:
        self._rows[key] = record

    def __delitem__(self, key: str) -> None:
        del self._rows[key]

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def live(self, key: str) -> JobRecord | None:
        """The record to change (decoded and kept live if it was settled), or None when there is none.

        (Its settled bytes stay in the arena, unused: a record settled again is the rare case.)
        """
        found = self._rows.get(key)
        if found is None or isinstance(found, JobRecord):
            return found
        record = self._rows[key] = _thawed(self._row(found))
        return record

    def settle(self, key: str) -> None:
        """Keep key's record as bytes until it is changed again: for a job this run is done with."""
        found = self._rows.get(key)
        if isinstance(found, JobRecord):
            row = _encoded(found)
            if self._dictionary is None:
                self._dictionary = row
            deflate = zlib.compressobj(6, zlib.DEFLATED, _WBITS, 2, zlib.Z_DEFAULT_STRATEGY, self._dictionary)
            stored = _DEFLATED + deflate.compress(row) + deflate.flush()
            if self._fits(stored):
                self._rows[key] = self._keep(stored)

    def put_row(self, key: str, row: bytes) -> None:
        """Keep a checkpoint's row as it is, settled (it was checked to decode when read)."""
        self._rows[key] = self._keep(row) if self._fits(row) else _thawed(row)

    def rows(self) -> Rows:
        """Every record's row, in the table's order: a copy taken now (live records encoded, settled ones as
        kept), inflated to JSON only as it is iterated, so a checkpoint's writer thread does that part."""
        places = [found if isinstance(found, int) else _encoded(found) for found in self._rows.values()]
        # The arena itself, not a copy: it is only ever appended to, and a slice is taken under the GIL,
        # so the bytes a place names never change under the writer (a copy would be 10 MB a checkpoint).
        return Rows(places, self._arena, self._dictionary)


class Rows:
    """Rows copied from a `RecordTable`; iterating gives each as JSON bytes."""

    __slots__ = ("_arena", "_dictionary", "_places")

    def __init__(self, places: list[int | bytes], arena: bytearray, dictionary: bytes | None) -> None:
        self._places = places
        self._arena = arena
        self._dictionary = dictionary

    def __len__(self) -> int:
        return len(self._places)

    def __iter__(self) -> Iterator[bytes]:
        mask = (1 << _LENGTH_BITS) - 1
        for place in self._places:
            if isinstance(place, bytes):
                yield place
            else:
                start = place >> _LENGTH_BITS
                yield _inflated(bytes(self._arena[start : start + (place & mask)]), self._dictionary)


def _inflated(stored: bytes, dictionary: bytes | None) -> bytes:
    """A stored row as JSON (deflated ones start with `_DEFLATED`; JSON rows with ``[``)."""
    if stored[:1] != _DEFLATED:
        return stored
    assert dictionary is not None  # set by the first deflation, before any deflated row exists
    inflate = zlib.decompressobj(_WBITS, zdict=dictionary)
    return inflate.decompress(stored[1:]) + inflate.flush()
