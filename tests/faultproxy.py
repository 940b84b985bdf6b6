"""A reverse proxy on loopback in front of a storage server (or the sandbox's API), failing the requests it is
told to: a 5xx, a refusal, a 408, a connection reset after the request was read, one reset after the server did
what it asked, or the server's answer edited on its way back. Real sockets both ways, so the SDKs under test
see exactly what a flaky network or a refusing service would show them."""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlsplit

__all__ = ["Fault", "FaultProxy", "fault_proxy"]

_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"})


@dataclass
class Fault:
    """Fail the next ``times`` requests that ``matches`` (method, path with query, body) with ``kind``."""

    matches: Callable[[str, str, bytes], bool]
    times: int
    kind: Literal["503", "403", "408", "reset", "lost", "edit", "slow"]
    """lost: the request reaches the server, its answer never comes back (the connection is reset).
    edit: the request reaches the server, and its answer's body comes back through ``edit``.
    slow: the request is held `seconds` before it goes on to the server (a store far away)."""
    edit: Callable[[bytes], bytes] | None = None
    seconds: float = 0.0


@dataclass
class FaultProxy:
    url: str
    faults: list[Fault] = field(default_factory=list)
    seen: list[tuple[str, str, str]] = field(default_factory=list)
    """Every request: method, path, and what it got (the upstream's status, or the fault)."""


def _named(path: str, body: bytes) -> str:
    """The path, and for a GCS multipart upload the object's name (it is in the body's metadata part)."""
    if "uploadType=multipart" in path:
        match = re.search(rb'"name": ?"([^"]+)"', body[:4096])
        if match:
            return f"{path}#{match[1].decode()}"
    return path


@contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    """Start the proxy in front of upstream (``http://127.0.0.1:port``) on a free loopback port."""
    target = urlsplit(upstream)
    lock = threading.Lock()
    proxy = FaultProxy(url="")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunk = self.rfile.read(size + 2)[:size]
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(chunk)
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _handle(self) -> None:
            body = self._body()
            with lock:
                fault = next(
                    (f for f in proxy.faults if f.times > 0 and f.matches(self.command, self.path, body)), None
                )
                if fault is not None:
                    fault.times -= 1
            held = fault is not None and fault.kind == "slow"
            if fault is not None and fault.kind == "slow":
                time.sleep(fault.seconds)
                fault = None
            if fault is not None and fault.kind == "lost":
                upstream_connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    upstream_connection.request(self.command, self.path, body=body, headers=headers)
                    upstream_connection.getresponse().read()
                finally:
                    upstream_connection.close()
            if fault is not None and fault.kind != "edit":
                proxy.seen.append((self.command, _named(self.path, body), fault.kind))
                if fault.kind in ("reset", "lost"):
                    # SO_LINGER 0: close sends RST, as a dropped connection does.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                status = int(fault.kind)
                text = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                if status == 403:
                    text = b"<Error><Code>AccessDenied</Code><Message>injected refusal</Message></Error>"
                    if "/storage/v1/" in self.path:
                        text = b'{"error": {"code": 403, "message": "injected refusal"}}'
                elif "/storage/v1/" in self.path:
                    text = b'{"error": {"code": 503, "message": "injected"}}'
                self.send_response(status)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)
                return
            upstream_connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                upstream_connection.request(self.command, self.path, body=body, headers=headers)
                answer = upstream_connection.getresponse()
                data = answer.read()
            finally:
                upstream_connection.close()
            if fault is not None and fault.edit is not None:
                data = fault.edit(data)
            proxy.seen.append((self.command, _named(self.path, body), "slow" if held else str(answer.status)))
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in _HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
