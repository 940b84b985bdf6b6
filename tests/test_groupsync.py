"""fsync in groups (`batcher.output.groupsync`): every caller's file is synced, in fewer hops than files, errors kept apart."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from batcher.output import groupsync
from batcher.output.groupsync import GroupSync


async def test_files_arriving_together_are_synced_in_few_hops_and_each_caller_waits_for_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops: list[list[int]] = []
    real = groupsync._fsync_all

    def counted(fds: list[int]) -> dict[int, OSError]:
        hops.append(list(fds))
        return real(fds)

    monkeypatch.setattr(groupsync, "_fsync_all", counted)
    synced = GroupSync()
    fds = [os.open(tmp_path / f"{i}.png", os.O_WRONLY | os.O_CREAT) for i in range(40)]
    returned: list[int] = []

    async def one(fd: int) -> None:
        await synced.sync(fd)
        # Returned only after a hop that held this descriptor had finished.
        assert any(fd in hop for hop in hops)
        returned.append(fd)

    try:
        async with anyio.create_task_group() as group:
            for fd in fds:
                group.start_soon(one, fd)
    finally:
        for fd in fds:
            os.close(fd)
    assert sorted(returned) == sorted(fds)
    assert sorted(fd for hop in hops for fd in hop) == sorted(fds)  # each file synced once
    assert len(hops) <= 3  # the first alone, then everyone who arrived meanwhile


async def test_a_file_whose_fsync_fails_raises_for_its_caller_alone(tmp_path: Path) -> None:
    synced = GroupSync()
    good = os.open(tmp_path / "good.png", os.O_WRONLY | os.O_CREAT)
    read_end, write_end = os.pipe()  # fsync of a pipe fails (EINVAL)
    outcomes: dict[str, str] = {}

    async def one(name: str, fd: int) -> None:
        try:
            await synced.sync(fd)
        except OSError as exc:
            outcomes[name] = type(exc).__name__
        else:
            outcomes[name] = "synced"

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(one, "good", good)
            group.start_soon(one, "pipe", write_end)
            group.start_soon(one, "good again", good)
    finally:
        for fd in (good, read_end, write_end):
            os.close(fd)
    assert outcomes == {"good": "synced", "pipe": "OSError", "good again": "synced"}
