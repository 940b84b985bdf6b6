"""What do the views of a command need of each job, without expanding the manifest again?

`status`, `plan` and the run's summary read of each job its key, its name,
its model and its price, nothing else. Expanding a 100,000-row prompt file
again for them (reading it, rendering templates, hashing each job) took
longer than the load itself. So the load's one checked pass keeps a compact
table: each job's name, its model (an index) and the few input fields its
price table reads (an index into the distinct sets of them, which are few:
quality x size, not one per prompt). A million jobs cost their names' bytes
and 16 bytes each, never their inputs.

The fields kept are those the model's price tables name at load time. A view
whose price table reads another field (a hand-written live table) is not
covered, and `Manifest.priced_jobs` expands the manifest as before.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from .cost import PriceTable, load_price_table
from .job import Job

__all__ = ["JobTable"]


class JobTable:
    """Each loaded job's name, model and price fields, in manifest order (see the module docstring)."""

    def __init__(self, price_dirs: Sequence[Path]) -> None:
        self._price_dirs = tuple(price_dirs)
        self._names = bytearray()
        """Every name in UTF-8, one after another: a str object each would be 50 bytes more a job."""
        self._ends = array("Q")
        self._models: dict[str, int] = {}
        self._fields: list[tuple[str, ...]] = []
        """Per model (by index): the input fields kept."""
        self._model_of = array("I")
        self._priced: dict[tuple[Any, ...], int] = {}
        self._inputs: list[dict[str, Any]] = []
        self._input_of = array("I")

    def add(self, name: str, model: str, payload: dict[str, Any]) -> None:
        index = self._models.get(model)
        if index is None:
            index = self._models[model] = len(self._models)
            table = load_price_table(model, self._price_dirs)
            self._fields.append(_read_by(table) if table is not None else ())
        fields = self._fields[index]
        # The price reads str() of each value: inputs alike in those are one entry.
        alike = (index, *[(field, str(payload[field])) for field in fields if field in payload])
        found = self._priced.get(alike)
        if found is None:
            found = self._priced[alike] = len(self._inputs)
            self._inputs.append({field: payload[field] for field in fields if field in payload})
        self._names += name.encode()
        self._ends.append(len(self._names))
        self._model_of.append(index)
        self._input_of.append(found)

    def covers(self, prices: Sequence[Path]) -> bool:
        """Whether the fields kept are all that each model's price table under prices reads."""
        for model, index in self._models.items():
            table = load_price_table(model, prices)
            if table is not None and not set(_read_by(table)) <= set(self._fields[index]):
                return False
        return True

    def jobs(self, keys: Sequence[int]) -> Iterator[Job]:
        """Each job as a `Job` whose input holds only its price fields; keys are the manifest's, in its order
        (the table's jobs first: any after them are jobs added later, which the table does not hold)."""
        models = list(self._models)
        names = self._names
        start = 0
        ours = islice(keys, len(self._ends))
        for packed, end, model, payload in zip(ours, self._ends, self._model_of, self._input_of, strict=True):
            yield Job(f"{packed:016x}", names[start:end].decode(), models[model], self._inputs[payload])
            start = end


def _read_by(table: PriceTable) -> tuple[str, ...]:
    """The input fields a price table reads: its keys, and the field a per-unit price multiplies by (duration)."""
    return (*table.keys, table.per) if table.per is not None and table.per not in table.keys else table.keys
