"""The HTTP transport of batcher's clients: httpx's own, with a pool that scales and cheap "closed?" checks.

Two costs of httpcore 1.0's connection pool grow with the number of kept-alive
connections, and batcher keeps many idle ones (a job between polls holds none
busy): measured at 64 connections, they were most of batcher's CPU above a
bare httpx loop.

- Each time a request arrives or ends, the pool walks its connections and,
  for every idle one, counts the connections again (it means to count the
  idle ones: ``len([c.is_idle() for c in ...])``): 64 x 64 calls a step.
  `_Pool` walks once, with the same decisions (and counts idle connections
  where httpcore meant to).
- It also asks every idle connection, at each of those steps, whether its
  server closed it ("is the socket readable?"): a system call each. `_Pool`
  asks the one it is about to reuse, and the rest at most every 0.1 s. And
  through anyio that question builds a table of the socket's attributes, with
  a ``getpeername`` call, before a zero-timeout ``poll``: the streams here
  keep their socket from the start and only poll it.

Both reach into httpx's transport (``_pool``) and httpcore's pool (its class,
``_network_backend`` and the attributes `_Pool` reads); where a later version
moves them, `pooled_transport` leaves httpx's transport as it is: slower,
never wrong. A test fails when that happens.
"""

# httpcore's stream and backend interfaces take timeouts as parameters: implemented as they are.
# ruff: noqa: ASYNC109

from __future__ import annotations

import select
import socket
import ssl
import time
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
    if type(pool) is httpcore.AsyncConnectionPool and isinstance(
        getattr(pool, "_network_backend", None), httpcore.AsyncNetworkBackend
    ):
        pool._network_backend = _Backend()
        if _POOL_KNOWN and all(hasattr(pool, name) for name in _POOL_ATTRIBUTES):
            pool.__class__ = _Pool
    return transport


_POOL_KNOWN = httpcore.__version__.startswith("1.0.")
"""`_Pool` restates a private method of httpcore 1.0's pool: another version keeps its own."""
_POOL_ATTRIBUTES = ("_connections", "_requests", "_max_connections", "_max_keepalive_connections")


class _Pool(httpcore.AsyncConnectionPool):
    """httpcore's pool, its bookkeeping linear in its connections (see the module's doc).

    A connection is asked whether its server closed it (a system call) when
    it is about to be reused, and the whole pool at most every `_SWEEP`
    seconds, not at every request's start and end: most of a run's
    connections sit idle between polls, and asking each of them twice a
    request was most of what the pool cost.
    """

    _next_sweep = 0.0

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        # httpcore's own steps, in its order, each a single walk. Called under the pool's lock, as before.
        closing: list[httpcore.AsyncConnectionInterface] = []
        kept: list[httpcore.AsyncConnectionInterface] = []
        idle = 0
        now = time.monotonic()
        sweep = now >= self._next_sweep
        if sweep:
            self._next_sweep = now + _SWEEP
        for connection in self._connections:
            if connection.is_closed():
                continue
            unused = connection.is_idle()
            if (sweep and connection.has_expired()) or (unused and idle >= self._max_keepalive_connections):
                closing.append(connection)
                continue
            idle += unused
            kept.append(connection)
        self._connections[:] = kept

        for pool_request in [request for request in self._requests if request.is_queued()]:
            origin = pool_request.request.url.origin
            reusable = self._reusable(origin, closing)
            if reusable is not None:
                pool_request.assign_to_connection(reusable)
                continue
            if len(self._connections) >= self._max_connections:
                surplus = next((c for c in self._connections if c.is_idle()), None)
                if surplus is None:
                    continue  # the request waits for a connection to come free
                self._connections.remove(surplus)
                closing.append(surplus)
            connection = self.create_connection(origin)
            self._connections.append(connection)
            pool_request.assign_to_connection(connection)
        return closing

    def _reusable(
        self, origin: httpcore.Origin, closing: list[httpcore.AsyncConnectionInterface]
    ) -> httpcore.AsyncConnectionInterface | None:
        """The first connection that can take a request to origin now; one its server closed (or whose
        keep-alive ran out) is moved to closing on the way, as httpcore's sweep would have."""
        while True:
            found = next((c for c in self._connections if c.can_handle_request(origin) and c.is_available()), None)
            if found is None or not (found.is_idle() and found.has_expired()):
                return found
            self._connections.remove(found)
            closing.append(found)


_SWEEP = 0.1
"""Seconds between walks that ask every connection whether it expired; one about to be reused is always asked."""


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
