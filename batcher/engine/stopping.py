"""Why and how hard is a run stopping? The one place a run's reasons to stop are kept.

Stopping comes in two strengths. `RunStop.stop` sends no more submits (the
budget is reached, Ctrl-C, the balance ran out). `RunStop.halt` also ends
every poll and download at once (a refused token, SIGTERM, an outage past
its patience) while submits in flight still get their answers recorded, so a
halt never leaves a job uncertain. A refused token is kept as `halt_error`,
for the loop to raise once the workers are done. The loop (`batcher.engine.runner`)
and the steps (`batcher.engine.steps` and its step modules) share one `RunStop`:
the loop's signal handler, feeder and workers write it, the steps read it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import anyio

from ..errors import AuthError, ManifestChangedError
from ..lifecycle import StopKind
from .progress import RunProgress

__all__ = ["RunStop"]


class RunStop:
    """A run's reasons to stop, and the waits a halt cuts short."""

    __slots__ = (
        "changed",
        "fatal",
        "halt_error",
        "halted",
        "interrupted",
        "kind",
        "preparing",
        "progress",
        "reason",
        "waits",
    )

    def __init__(self, progress: RunProgress) -> None:
        self.progress = progress
        """Where a halt's reason is shown."""
        self.reason: str | None = None
        """Set when no more submits are sent: the first reason given, the one reported."""
        self.kind: StopKind | None = None
        self.halted: str | None = None
        """Set when every wait must end now (a refused token, SIGTERM, an outage past its patience)."""
        self.halt_error: AuthError | None = None
        self.changed: ManifestChangedError | None = None
        """Set when the jobs read again were not the jobs loaded (see `JobSelection.checked`)."""
        self.interrupted = False
        """A signal came (Ctrl-C or SIGTERM)."""
        self.fatal: BaseException | None = None
        """An error that ended the workers (the journal or the output folder failed): raised by the loop."""
        self.waits: dict[anyio.CancelScope, str | None] = {}
        """Polls and downloads in progress, with the account each polls through (None: no account's): a halt
        cancels them all (submits in flight get their answers), a refused account its own (`cut`)."""
        self.preparing: set[anyio.CancelScope] = set()
        """Submits still being made ready (local images read), nothing journalled or sent yet: any stop
        cancels them, and the job stays pending."""

    def stop(self, kind: StopKind, reason: str) -> None:
        """Send no more submits this run (the first reason given is the one reported)."""
        if self.reason is None:
            self.reason, self.kind = reason, kind
        for scope in list(self.preparing):
            scope.cancel()

    def halt(self, kind: StopKind, reason: str, error: AuthError | None = None) -> None:
        """Stop submitting and end every poll and download now; submits in flight still get their
        answers recorded, so none is left uncertain by the halt itself."""
        self.stop(kind, reason)
        if self.halted is None:
            self.halted, self.halt_error = reason, error
            self.progress.stopping = reason
        for scope in list(self.waits):
            scope.cancel()

    def cut(self, account: str) -> None:
        """End every wait on account now (its token was refused: its jobs are held for the next run)."""
        for scope, on in list(self.waits.items()):
            if on == account:
                scope.cancel()

    @contextmanager
    def preparing_scope(self) -> Iterator[anyio.CancelScope]:
        """A submit being made ready, before its intent: any stop (Ctrl-C included) cuts it short."""
        with anyio.CancelScope() as scope:
            if self.reason:
                scope.cancel()
            self.preparing.add(scope)
            try:
                yield scope
            finally:
                self.preparing.discard(scope)

    @contextmanager
    def wait_scope(self, account: str | None = None) -> Iterator[anyio.CancelScope]:
        """A poll or download that a halt may cut short (its job resumes next run); account: the one it
        polls through, whose refusal (`cut`) cuts it short too."""
        with anyio.CancelScope() as scope:
            if self.halted:
                scope.cancel()
            self.waits[scope] = account
            try:
                yield scope
            finally:
                self.waits.pop(scope, None)
