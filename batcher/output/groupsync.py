"""fsync in groups: every file waiting when a thread is free is synced in that one thread hop.

A downloaded image must be on disk before its final name appears (its hash
goes into the journal). One thread hop per image made the event loop and a
worker thread trade the GIL a few dozen times an image, which cost more CPU
than the fsync itself. Here the image is written on the event loop (a few
page-cache writes), and the fsync, the one slow call, waits for a group: the
first file to arrive leads a hop that syncs every file waiting; files
arriving meanwhile form the next group, led by one of them when the hop ends.
Under load a hop syncs many files; alone, a file waits for its own fsync only,
as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import anyio

__all__ = ["GroupSync"]


@dataclass(eq=False)
class _Group:
    fds: list[int] = field(default_factory=list)
    failed: dict[int, OSError] = field(default_factory=dict)
    broken: BaseException | None = None
    """What stopped the hop itself: then no file of the group is known to be on disk."""
    done: anyio.Event = field(default_factory=anyio.Event)


class GroupSync:
    """fsync file descriptors in groups, one thread hop a group."""

    def __init__(self) -> None:
        self._next = _Group()
        self._syncing: anyio.Event | None = None

    async def sync(self, fd: int) -> None:
        """Return once fd's file is on disk; raises the OSError its fsync met.

        fd must stay open until this returns: callers shield the wait from
        cancellation, since another task's hop may be syncing it.
        """
        group = self._next
        group.fds.append(fd)
        while not group.done.is_set():
            if self._syncing is None:
                await self._lead(group)
            else:
                await self._syncing.wait()
        if group.broken is not None:
            raise OSError(f"the fsync of a group of files did not finish: {group.broken!r}") from group.broken
        error = group.failed.get(fd)
        if error is not None:
            raise error

    async def _lead(self, group: _Group) -> None:
        self._next = _Group()
        self._syncing = syncing = anyio.Event()
        try:
            group.failed = await anyio.to_thread.run_sync(_fsync_all, group.fds)
        except BaseException as exc:
            group.broken = exc
            raise
        finally:
            group.done.set()
            self._syncing = None
            syncing.set()


def _fsync_all(fds: list[int]) -> dict[int, OSError]:
    failed: dict[int, OSError] = {}
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as exc:
            failed[fd] = exc
    return failed
