"""The short form of benchmarks/torture.py: faults on the wire and SIGKILLs, resumed until done."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.torture import torture


@pytest.mark.slow
def test_torture_short(tmp_path: Path) -> None:
    report = torture(tmp_path, jobs=50, kills=5, fault_rate=0.15, seed=3)
    assert report.violations == []
    assert report.kills == 5
    assert sum(report.faults.values()) >= 20, report.faults
    assert report.files_verified == 50
