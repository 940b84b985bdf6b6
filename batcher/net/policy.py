"""Which URLs batcher may talk to.

Plain ``http`` is for loopback only (the sandbox); everything else must be
``https``. Output files are fetched from hosts the API names, so those hosts
must also resolve to public addresses: an answer pointing us at
169.254.169.254 or a private range is refused before any connection is made,
in any of its IPv6 disguises (IPv4-mapped, IPv4-compatible, 6to4, Teredo,
NAT64). Downloads reach loopback only at the API base's own origin, and only
when that base is itself loopback (the sandbox): an answer naming another
local port must not turn batcher into a client of whatever listens there.
"""

from __future__ import annotations

import ipaddress
from typing import Final
from urllib.parse import urlsplit

import anyio

__all__ = [
    "ANY_LOOPBACK",
    "address_refusal",
    "is_loopback_host",
    "loopback_origin",
    "origin",
    "resolve_refusal",
    "scheme_refusal",
]

ANY_LOOPBACK: Final = "any"
"""For `resolve_refusal`: every loopback URL may be used (the user's own input URLs, in pre-flight)."""

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback literals (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def scheme_refusal(url: str) -> str | None:
    """Why url may not be used (its scheme or host), or None when it may."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # a broken IPv6 literal: a URL from an answer must not crash its caller
        return f"{url[:200]!r} is not a URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return f"only https URLs are allowed, not {parts.scheme or 'a scheme-less'} URL {url!r}"
    if not parts.hostname:
        return f"{url!r} has no host"
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        return f"plain http is allowed only for loopback hosts; use https for {parts.hostname}"
    return None


def origin(url: str) -> str | None:
    """``scheme://host:port`` of url, lower-cased, the scheme's default port filled in; None if it has none."""
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:  # a port out of range
        return None
    host = parts.hostname
    if not host or port is None:
        return None
    return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def loopback_origin(base_url: str) -> str | None:
    """The one origin downloads may reach on loopback: the API base's, when it is loopback (a sandbox); else None."""
    host = urlsplit(base_url).hostname
    return origin(base_url) if host and is_loopback_host(host) else None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 one carries, with the name of the form, or None."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    if ip.teredo is not None:
        return "Teredo", ip.teredo[1]  # the client's address, which traffic reaches
    if ip in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # not :: or ::1
        return "IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_refusal(address: str) -> str | None:
    """Why a resolved address must not be contacted, or None when it may.

    Loopback (127.0.0.0/8, ::1) passes here: whether it may be used is the
    caller's rule (see `resolve_refusal`). An IPv6 address that wraps an
    IPv4 one is judged by the IPv4 address too, so that 2002:a9fe:a9fe::
    (169.254.169.254 in 6to4 form) is refused like the address itself, and a
    wrapped loopback is refused: it is never the sandbox.
    """
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.is_loopback:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        wrapped = _embedded_ipv4(ip)
        if wrapped is not None:
            form, inner = wrapped
            if inner.is_loopback:
                return f"{ip} is the {form} form of the loopback address {inner}"
            inner_refusal = address_refusal(str(inner))
            if inner_refusal:
                return f"{ip} is the {form} form of {inner}: {inner_refusal}"
            if form in ("IPv4-mapped", "NAT64"):
                return None  # a translation: the public IPv4 address is what is reached
    if ip.is_link_local:
        return f"{ip} is a link-local address (cloud metadata lives there)"
    if ip.is_private or ip.is_reserved or ip.is_multicast or ip.is_unspecified or not ip.is_global:
        return f"{ip} is a private or reserved address"
    return None


_LOCALHOST = ("localhost", "127.0.0.1", "[::1]")


def _same_origin(found: str, allowed: str) -> bool:
    """Equal origins, ``localhost``, ``127.0.0.1`` and ``[::1]`` being one host (``--api-base
    http://localhost:8765`` for a sandbox that names its files ``http://127.0.0.1:8765/...``)."""
    if found == allowed:
        return True
    for spelling in _LOCALHOST[1:]:
        found = found.replace(f"://{spelling}:", "://localhost:", 1)
        allowed = allowed.replace(f"://{spelling}:", "://localhost:", 1)
    return found == allowed


def _loopback_refusal(url: str, allowed: str | None) -> str | None:
    """Why a URL on a loopback host may not be used under allowed (see `resolve_refusal`), or None."""
    if allowed == ANY_LOOPBACK:
        return None
    found = origin(url) or url
    if allowed is None:
        return f"{found} is a loopback address, and downloads reach loopback only when the API base is loopback"
    if not _same_origin(found, allowed):
        return f"{found} is on loopback but is not the API base {allowed}, the only loopback origin downloads may reach"
    return None


async def resolve_refusal(url: str, *, loopback: str | None = ANY_LOOPBACK) -> str | None:
    """Check the URL's scheme, then every address its host resolves to.

    loopback says which loopback URLs may be used: `ANY_LOOPBACK` (the
    default: the user's own URLs), None (none: downloads from a remote API),
    or one origin as `loopback_origin` gives it (downloads from a sandbox:
    its own origin only). A name that resolves to loopback counts as
    loopback but matches no origin, which are spelled as literals.
    """
    reason = scheme_refusal(url)
    if reason:
        return reason
    host = urlsplit(url).hostname or ""
    if is_loopback_host(host):
        return _loopback_refusal(url, loopback)
    try:
        infos = await anyio.getaddrinfo(host, 443)
    except OSError as exc:
        return f"cannot resolve {host}: {exc}"
    for info in infos:
        address = str(info[4][0])
        refusal = address_refusal(address)
        if refusal is None and loopback != ANY_LOOPBACK and ipaddress.ip_address(address.split("%")[0]).is_loopback:
            refusal = f"the loopback address {address}, and downloads reach loopback only at the API base's own origin"
        if refusal:
            return f"{host} resolves to {refusal}"
    return None
