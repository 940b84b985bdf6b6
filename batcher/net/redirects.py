"""Where does a URL someone else named lead? Redirects followed by hand, every hop checked, no credentials.

Downloads (URLs from an API answer) and the pre-flight check (URLs from a
manifest) both fetch URLs batcher did not choose. httpx2 would follow their
redirects on its own and check no hop, so neither lets it: `follow` walks
at most `MAX_REDIRECTS` redirects and checks every hop before connecting
(a usable URL, then `batcher.net.policy.resolve_refusal`: its scheme and every
address its host resolves to). Each hop goes out on a client made by
`anonymous_client`: no Authorization header, no cookie kept from one answer
for a later request, no redirect followed behind our back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from http.cookiejar import CookieJar, DefaultCookiePolicy
from urllib.parse import urljoin, urlsplit

import httpx2

from ..printable import printable
from .policy import resolve_refusal

__all__ = [
    "MAX_REDIRECTS",
    "HopOpener",
    "RefusedHopError",
    "TooManyRedirectsError",
    "anonymous_client",
    "display_url",
    "follow",
    "held_location",
    "hold_location",
]

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
"""Redirects followed from one URL; one more is an error."""

HopOpener = Callable[[httpx2.AsyncClient, str], AbstractAsyncContextManager[httpx2.Response]]
"""Sends one hop's request and holds its answer open while the caller reads it."""

_DEFAULT_LIMITS = httpx2.Limits(max_connections=100, max_keepalive_connections=20)  # httpx2's own default
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_HELD_LOCATION = "x-batcher-held-location"


class RefusedHopError(Exception):
    """A hop (the URL itself, or a redirect's target) may not be fetched: ``url`` is that hop's, ``reason`` why."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{display_url(url)}: {reason}")
        self.url = url
        self.reason = reason


class TooManyRedirectsError(Exception):
    """More than `MAX_REDIRECTS` redirects from one URL."""


def display_url(url: str) -> str:
    """A URL for messages and logs: without its query, which may hold a signature; control characters removed."""
    try:
        parts = urlsplit(url)
    except ValueError:  # a broken IPv6 literal
        return printable(url.partition("?")[0], 300)
    return printable(f"{parts.scheme}://{parts.netloc}{parts.path}", len(url) + 1)


async def hold_location(response: httpx2.Response) -> None:
    """A response hook: move a redirect's Location aside, where httpx2 does not read it (see `held_location`).

    httpx2 parses a Location even when it follows no redirect, and one it
    cannot parse became a protocol error: a transient fault, tried again and
    again (a poll went on all night). Set aside, it is ours to judge.
    """
    if 300 <= response.status_code < 400 and "location" in response.headers:
        response.headers[_HELD_LOCATION] = response.headers.pop("location")


def held_location(response: httpx2.Response) -> str | None:
    """The Location of a response seen by `hold_location`, or None."""
    location: str | None = response.headers.get(_HELD_LOCATION)
    return location


def anonymous_client(
    *,
    user_agent: str,
    timeout: httpx2.Timeout,
    transport: httpx2.AsyncBaseTransport | None = None,
    limits: httpx2.Limits = _DEFAULT_LIMITS,
) -> httpx2.AsyncClient:
    """An HTTP client for URLs others name: no credentials, no cookies kept, no redirect followed, identity encoding."""
    return httpx2.AsyncClient(
        transport=transport,
        timeout=timeout,
        limits=limits,
        follow_redirects=False,
        # A cookie one host sets would go back with every later request to it: files are fetched by URL alone.
        cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
        # identity: a compressed body could expand past any size cap (a "gzip bomb").
        headers={"User-Agent": user_agent, "Accept-Encoding": "identity"},
        event_hooks={"response": [hold_location]},
    )


def _get(client: httpx2.AsyncClient, url: str) -> AbstractAsyncContextManager[httpx2.Response]:
    return client.stream("GET", url)


@asynccontextmanager
async def follow(
    client: httpx2.AsyncClient,
    url: str,
    *,
    loopback: str | tuple[str, ...] | None,
    open_hop: HopOpener = _get,
    check: Callable[[str], str | None] | None = None,
) -> AsyncIterator[httpx2.Response]:
    """The answer url finally leads to, open, its body unread; every hop checked before it is sent.

    loopback is `resolve_refusal`'s: which loopback URLs a hop may use.
    open_hop sends one hop (default: a streamed GET). check, when given, is
    asked first of every hop: why it may not be fetched, or None. Raises RefusedHopError
    for a hop that may not be fetched, TooManyRedirectsError past
    `MAX_REDIRECTS`, and whatever httpx2 raises.
    """
    if (
        client.follow_redirects
        or "authorization" in client.headers
        or hold_location not in client.event_hooks["response"]
    ):
        msg = "follow() needs a client without credentials that follows no redirect: see anonymous_client()"
        raise ValueError(msg)
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        refusal = (
            _malformed(current)
            or (check(current) if check is not None else None)
            or await resolve_refusal(current, loopback=loopback)
        )
        if refusal:
            raise RefusedHopError(current, refusal)
        started = time.monotonic()
        async with open_hop(client, current) as response:
            took = time.monotonic() - started
            log.debug(
                "%s %s: HTTP %d in %.3f s", response.request.method, display_url(current), response.status_code, took
            )
            location = held_location(response) if response.status_code in _REDIRECT_STATUSES else None
            if location is None:  # a 304, or a 3xx naming nowhere, is an answer like any other
                yield response
                return
        try:
            current = urljoin(current, location)
        except ValueError as exc:  # a broken IPv6 literal
            raise RefusedHopError(location, f"not a usable URL ({exc})") from exc
    msg = f"more than {MAX_REDIRECTS} redirects from {display_url(url)}"
    raise TooManyRedirectsError(msg)


def _malformed(url: str) -> str | None:
    """Why url cannot even be sent (a control character, a broken host or port), or None."""
    try:
        httpx2.URL(url)
        urlsplit(url).port  # noqa: B018 - parsing it is the check: out of range raises
    except (httpx2.InvalidURL, ValueError) as exc:
        return f"not a usable URL ({printable(str(exc), 200)})"
    return None
