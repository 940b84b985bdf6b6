"""The HTTP transport of batcher's clients: httpx2's own, every connection kept alive.

httpx2 is httpx's maintained successor (same design and public API under a new
import name). Its connection pool assigns queued requests in one pass, where
httpcore 1.0's counted every connection again for each idle one; batcher keeps
many idle connections (a job between polls holds none busy), so that pool cost
most of its CPU and batcher once patched it through private attributes. The
patch is gone: this is httpx2's public constructor and nothing else.
"""

from __future__ import annotations

import httpx2

__all__ = ["pooled_transport"]


def pooled_transport(max_connections: int) -> httpx2.AsyncHTTPTransport:
    """httpx2's transport with all of its max_connections kept alive between requests."""
    limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx2.AsyncHTTPTransport(limits=limits)
