"""Where the folded records live in memory: live while a run may change them, settled as bytes otherwise.

A night of 100,000 jobs folds to 100,000 `JobRecord`s, about 1.5 KB each
as Python objects (the record, its lists and dict, a dozen strings and
floats): 150 MB for records nobody will change again. So a record the run
is done with is *settled*: kept as its checkpoint row, one JSON bytes
object of about 500 bytes, and decoded again whenever it is read. Reading
one gives a fresh copy; changing one goes through `RecordTable.live`, which
decodes it and keeps the live object from then on, so a change is never
made to a copy that is then dropped.

The row is also what a checkpoint holds, line by line: settling costs one
encoding, and a checkpoint of settled records copies bytes, not objects.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import orjson

from .records import FileRecord, JobRecord

__all__ = ["RECORD_FIELDS", "RecordTable", "record_from", "record_row"]

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


def _settled(record: JobRecord) -> bytes:
    # Copied to a bytes object of its own size: orjson's comes in a 4 KB allocation that realloc keeps.
    return bytes(memoryview(orjson.dumps(record_row(record))))


def _thawed(row: bytes) -> JobRecord:
    found = orjson.loads(row)
    assert isinstance(found, list)  # rows are only ever made by _settled or read back checked
    return record_from(found)


class RecordTable(MutableMapping[str, JobRecord]):
    """The journal's records by job key (see the module docstring)."""

    __slots__ = ("_rows",)

    def __init__(self) -> None:
        self._rows: dict[str, JobRecord | bytes] = {}

    def __getitem__(self, key: str) -> JobRecord:
        found = self._rows[key]
        return found if isinstance(found, JobRecord) else _thawed(found)

    def get(self, key: str, default: Any = None) -> Any:  # the hot path: no KeyError raised and caught
        found = self._rows.get(key)
        if found is None:
            return default
        return found if isinstance(found, JobRecord) else _thawed(found)

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
        """The record to change (decoded and kept live if it was settled), or None when there is none."""
        found = self._rows.get(key)
        if found is None or isinstance(found, JobRecord):
            return found
        record = self._rows[key] = _thawed(found)
        return record

    def settle(self, key: str) -> None:
        """Keep key's record as bytes until it is changed again: for a job this run is done with."""
        found = self._rows.get(key)
        if isinstance(found, JobRecord):
            self._rows[key] = _settled(found)

    def put_row(self, key: str, row: bytes) -> None:
        """Keep a checkpoint's row as it is, settled (it was checked to decode when read)."""
        self._rows[key] = row

    def rows(self) -> list[bytes]:
        """Every record as its row's bytes, in the table's order: settled ones as kept, live ones encoded now."""
        return [found if isinstance(found, bytes) else _settled(found) for found in self._rows.values()]
