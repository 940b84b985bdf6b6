"""Which API a run talks to, with which token: RunComfy's, or an in-process sandbox's.

The sandbox is imported only when a run asks for one: the fake server is
not part of a real run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from .client import api_base_from_env, token_from_env
from .folders import SANDBOX_API, api_identity

if TYPE_CHECKING:
    from .sandbox import SandboxConfig

__all__ = ["SANDBOX_TOKEN", "Endpoint", "open_endpoint"]

SANDBOX_TOKEN = "sandbox-token"
"""What a run sends to the in-process sandbox, which accepts any bearer token."""


class Endpoint:
    """An API to talk to: its base URL, the token for it, and its identity for journals and the ledger."""

    __slots__ = ("base_url", "identity", "sandbox", "token")

    def __init__(self, base_url: str, token: str, *, sandbox: bool) -> None:
        self.base_url = base_url
        self.token = token
        self.sandbox = sandbox
        """An in-process sandbox: nothing is charged."""
        self.identity = SANDBOX_API if sandbox else api_identity(base_url)

    def __repr__(self) -> str:  # never the token
        return f"Endpoint({self.base_url!r}, sandbox={self.sandbox})"


@asynccontextmanager
async def open_endpoint(
    *, sandbox: SandboxConfig | None, api_base: str | None, token: str | None
) -> AsyncIterator[Endpoint]:
    """The in-process sandbox (served for as long as the block lasts), or the real API from the
    flag, then ``RUNCOMFY_API_BASE``, and the token given or from ``RUNCOMFY_API_TOKEN``.

    Raises UsageError when the real API is asked for with no token or a bad base.
    """
    if sandbox is not None:
        from .sandbox import Sandbox  # only when asked for

        async with Sandbox(sandbox).running() as url:
            yield Endpoint(url, SANDBOX_TOKEN, sandbox=True)
        return
    token = token or token_from_env()  # the first thing a new user meets: said before anything else
    yield Endpoint(api_base_from_env(api_base), token, sandbox=False)
