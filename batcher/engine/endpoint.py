"""Which API a run talks to, with which token: RunComfy's, or an in-process sandbox's.

The engine never imports the sandbox (a contract in pyproject.toml checks it): a
rehearsal's server comes from the caller as a `LocalApi` (`batcher.SandboxConfig`
is one, filled in by `batcher.run_manifest`), so the fake server is no part of a
real run's code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from ..output.folders import SANDBOX_API, api_identity
from ..runcomfy.client import api_base_from_env
from ..runcomfy.tokens import token_source, tokens_from_env

__all__ = ["SANDBOX_TOKEN", "Endpoint", "LocalApi", "open_endpoint"]


class LocalApi(Protocol):
    """An API served in this process for a rehearsal (the sandbox's settings): nothing is charged."""

    def serve(self) -> AbstractAsyncContextManager[str]:
        """Serve it on loopback for as long as the block lasts; the block gets its base URL."""
        ...

    @property
    def balance_base(self) -> str | None:
        """Where its balance is read while served (a host of its own, as RunComfy's); None: not served."""
        ...


SANDBOX_TOKEN = "sandbox-token"
"""What a run sends to the in-process sandbox, which accepts any bearer token."""


class Endpoint:
    """An API to talk to: its base URL, the tokens for it (one per account; the first is the one single
    calls use), and its identity for journals and the ledger."""

    __slots__ = ("balance_base", "base_url", "identity", "sandbox", "token", "token_env", "tokens")

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        sandbox: bool,
        tokens: tuple[str, ...] = (),
        token_env: str = "",
        balance_base: str | None = None,
    ) -> None:
        self.base_url = base_url
        self.balance_base = balance_base
        """The balance's host when this endpoint knows it (an in-process sandbox's); None: derived from the base
        (`batcher.runcomfy.account.balance_base`)."""
        self.token = token
        self.tokens = tokens or (token,)
        self.token_env = token_env or ("RunOptions.tokens" if tokens else "RunOptions.token")
        """Where the tokens came from: the environment variable's name, or the option given to the run."""
        self.sandbox = sandbox
        """An in-process sandbox: nothing is charged."""
        self.identity = SANDBOX_API if sandbox else api_identity(base_url)

    def __repr__(self) -> str:  # never the token
        return f"Endpoint({self.base_url!r}, sandbox={self.sandbox})"


@asynccontextmanager
async def open_endpoint(
    *,
    sandbox: LocalApi | None,
    api_base: str | None,
    token: str | None,
    tokens: tuple[str, ...] | None = None,
) -> AsyncIterator[Endpoint]:
    """The in-process sandbox (served for as long as the block lasts), or the real API from the
    flag, then ``RUNCOMFY_API_BASE``, and the tokens given (tokens, else token) or from the
    environment (see `batcher.runcomfy.tokens`).

    Raises UsageError when the real API is asked for with no token or a bad base.
    """
    if sandbox is not None:
        async with sandbox.serve() as url:
            yield Endpoint(url, SANDBOX_TOKEN, sandbox=True, balance_base=sandbox.balance_base)
        return
    # The first thing a new user meets: said before anything else.
    given = tuple(tokens) if tokens else (token,) if token else ()
    held = given or tokens_from_env()
    source = ("RunOptions.tokens" if tokens else "RunOptions.token") if given else token_source()
    yield Endpoint(api_base_from_env(api_base), held[0], sandbox=False, tokens=held, token_env=source)
