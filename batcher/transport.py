"""The HTTP transport of batcher's clients: httpx's own, with sockets that answer "readable?" cheaply.

Before each request, httpcore's pool asks every idle keep-alive connection
whether its server closed it ("is the socket readable?"). Through anyio that
question builds a table of the socket's attributes, with a ``getpeername``
call, before a zero-timeout ``poll``: at 64 connections, 64 tables and 128
system calls per request, about a tenth of a run's CPU. The streams here
keep their socket from the start and only poll it.

The swap reaches into httpx's transport (``_pool``) and httpcore's pool
(``_network_backend``); where a later version moves them, `pooled_transport`
leaves httpx's transport as it is: slower, never wrong.
"""

# httpcore's stream and backend interfaces take timeouts as parameters: implemented as they are.
# ruff: noqa: ASYNC109

from __future__ import annotations

import select
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

__all__ = ["pooled_transport"]


def pooled_transport(max_connections: int) -> httpx.AsyncHTTPTransport:
    """httpx's transport, all of its max_connections kept alive, its connections made by `_Backend`."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    transport = httpx.AsyncHTTPTransport(limits=limits)
    pool = getattr(transport, "_pool", None)
    if isinstance(pool, httpcore.AsyncConnectionPool) and isinstance(
        getattr(pool, "_network_backend", None), httpcore.AsyncNetworkBackend
    ):
        pool._network_backend = _Backend()
    return transport


def _readable(sock: socket.socket | None) -> bool:
    """httpcore's own test: a closed socket counts as readable (the pool then drops the connection)."""
    if sock is None:
        return False
    fd = sock.fileno()
    if fd == -1:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class _Stream(httpcore.AsyncNetworkStream):
    """httpcore's anyio stream, its raw socket looked up once."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._socket: socket.socket | None = inner.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return _readable(self._socket)
        return self._inner.get_extra_info(info)


class _Backend(httpcore.AsyncNetworkBackend):
    """httpcore's anyio backend, its streams wrapped in `_Stream`."""

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )
        return _Stream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout=timeout, socket_options=socket_options)
        return _Stream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
