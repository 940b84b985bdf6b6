"""The HTTP transport of batcher's clients: httpx2's own, every connection kept alive.

httpx2 is httpx's maintained successor (same design and public API under a new
import name). Its connection pool assigns queued requests in one pass, where
httpcore 1.0's counted every connection again for each idle one; batcher keeps
many idle connections (a job between polls holds none busy), so that pool cost
most of its CPU and batcher once patched it through private attributes. The
patch is gone: this is httpx2's public constructor and nothing else.

Every transport shares one TLS context (per trust store named in the
environment): building one loads the whole CA bundle, some 100 ms of CPU here, and a
run opens three or four clients (the API, downloads, the balance, prices).
"""

from __future__ import annotations

import functools
import os
import ssl

import httpx2

__all__ = ["pooled_transport", "shared_ssl_context"]


def pooled_transport(max_connections: int) -> httpx2.AsyncHTTPTransport:
    """httpx2's transport with all of its max_connections kept alive between requests."""
    limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx2.AsyncHTTPTransport(limits=limits, verify=shared_ssl_context())


def shared_ssl_context() -> ssl.SSLContext:
    """httpx2's default TLS context (certificates verified; SSL_CERT_FILE or SSL_CERT_DIR honoured), made
    once for each trust store the environment names."""
    return _context_for(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.lru_cache(maxsize=4)
def _context_for(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    return httpx2.create_ssl_context()
