"""The sandbox on the wire: HTTP/1.1 over h11 and anyio, with the faults that live below HTTP.

Not an ASGI app, because the faults worth rehearsing are a reset with no answer
(RST), an answer slower than a client's read timeout, and a body cut short of its
Content-Length. `serve` hands each request to a handler and sends its `Response`.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import anyio
import anyio.abc
import h11

__all__ = ["Handler", "Response", "json_response", "reason", "serve"]


@dataclass(slots=True)
class Response:
    """One answer: its status, body and headers, and a wire fault to apply while sending it (drop, slow,
    truncate)."""

    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    fault: str | None = None


def json_response(status: int, payload: dict[str, Any], headers: list[tuple[str, str]] | None = None) -> Response:
    """A JSON answer."""
    return Response(status, json.dumps(payload).encode(), [("content-type", "application/json"), *(headers or [])])


def reason(status: int) -> bytes:
    """The reason phrase of a status line (``402 Payment Required``), as RunComfy's servers send it: its MCP
    client words a bodiless error from it (runcomfy-mcp runcomfy_client.py, ``_request``: ``response.reason_phrase``),
    its CLI from the status's canonical reason (src/api.rs ``api_error``). h11 sends none unless given one."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


Handler = Callable[[str, str, dict[str, str], bytes], Response]
"""method, target, lower-cased headers, body -> the answer."""


@asynccontextmanager
async def serve(handle: Handler, slow_seconds: float, host: str, port: int) -> AsyncIterator[tuple[str, int]]:
    """Serve on host:port (0 picks a free port) inside the current event loop; yields (base URL, port)."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=False)
    bound = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def connection(stream: anyio.abc.SocketStream) -> None:
        await _serve_connection(handle, slow_seconds, stream)

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(listener.serve, connection)
            try:
                yield f"http://{host}:{bound}", bound
            finally:
                group.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The caller's own error, raised while we served: give it back as it was raised.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise
    finally:
        await listener.aclose()


async def _next_event(connection: h11.Connection, stream: anyio.abc.SocketStream) -> Any:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                data = b""
            connection.receive_data(data)
            continue
        return event


async def _serve_connection(handle: Handler, slow_seconds: float, stream: anyio.abc.SocketStream) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    try:
        while True:
            request = await _next_event(connection, stream)
            if not isinstance(request, h11.Request):
                return
            body = bytearray()  # appended in place: a 60 MB submit of inline images arrives in 64 KiB pieces
            while True:
                event = await _next_event(connection, stream)
                if isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            headers = {k.decode().lower(): v.decode() for k, v in request.headers}
            response = handle(request.method.decode(), request.target.decode(), headers, bytes(body))
            if not await _send(connection, stream, response, slow_seconds):
                return
            if connection.our_state is h11.MUST_CLOSE or connection.their_state is h11.MUST_CLOSE:
                return
            connection.start_next_cycle()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, h11.ProtocolError, OSError):
        return
    finally:
        with suppress(Exception):
            await stream.aclose()


async def _send(
    connection: h11.Connection, stream: anyio.abc.SocketStream, response: Response, slow_seconds: float
) -> bool:
    """Send response, its wire fault applied; False when the connection is done with (dropped or cut short)."""
    if response.fault == "drop":
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        # SO_LINGER 0: close with RST, the way a crashed proxy would.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False
    if response.fault == "slow":
        await anyio.sleep(slow_seconds)
    headers = list(response.headers)
    if not any(name == "content-length" for name, _ in headers):  # a HEAD answer gives its own
        headers.append(("content-length", str(len(response.body))))
    await stream.send(
        connection.send(h11.Response(status_code=response.status, headers=headers, reason=reason(response.status)))
    )
    if response.fault == "truncate":
        await stream.send(connection.send(h11.Data(data=response.body[: len(response.body) // 2])))
        return False
    await stream.send(connection.send(h11.Data(data=response.body)) + connection.send(h11.EndOfMessage()))
    return True
