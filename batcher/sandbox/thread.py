"""The sandbox on a thread of its own, for tests and for driving a run from another process."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel

from ..errors import UsageError
from .server import Sandbox

__all__ = ["SandboxThread"]


class SandboxThread:
    """The sandbox on a thread of its own, for tests and for driving a run from another process."""

    def __init__(self, sandbox: Sandbox | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sandbox = sandbox or Sandbox()
        self._host = host
        self._port = port
        self._ready = threading.Event()
        self._stop: anyio.Event | None = None
        self._portal_token: Any = None
        self._thread = threading.Thread(target=self._main, name="batcher-sandbox", daemon=True)
        self.url = ""
        self._error: BaseException | None = None

    def _main(self) -> None:
        async def serve() -> None:
            self._stop = anyio.Event()
            self._portal_token = anyio.lowlevel.current_token()
            async with self.sandbox.running(self._host, self._port) as url:
                self.url = url
                self._ready.set()
                await self._stop.wait()

        try:
            anyio.run(serve)
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    @property
    def balance_base(self) -> str:
        """Where this sandbox's balance is read (its own host, as RunComfy's: `Sandbox.balance_base`)."""
        return self.sandbox.balance_base or ""

    def start(self) -> SandboxThread:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None or not self.url:
            msg = f"the sandbox did not start: {self._error!r}"
            raise UsageError(msg)
        return self

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            anyio.from_thread.run_sync(self._stop.set, token=self._portal_token)
        self._thread.join(10)

    def __enter__(self) -> SandboxThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
