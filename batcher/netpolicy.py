"""Which URLs batcher may talk to.

Plain ``http`` is for loopback only (the sandbox); everything else must be
``https``. Output files are fetched from hosts the API names, so those hosts
must also resolve to public addresses: an answer pointing us at
169.254.169.254 or a private range is refused before any connection is made.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import anyio

__all__ = ["address_refusal", "is_loopback_host", "resolve_refusal", "scheme_refusal"]


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
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return f"only https URLs are allowed, not {parts.scheme or 'a scheme-less'} URL {url!r}"
    if not parts.hostname:
        return f"{url!r} has no host"
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        return f"plain http is allowed only for loopback hosts; use https for {parts.hostname}"
    return None


def address_refusal(address: str) -> str | None:
    """Why a resolved address must not be contacted, or None when it may."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.is_loopback:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return address_refusal(str(ip.ipv4_mapped))
    if ip.is_link_local:
        return f"{ip} is a link-local address (cloud metadata lives there)"
    if ip.is_private or ip.is_reserved or ip.is_multicast or ip.is_unspecified or not ip.is_global:
        return f"{ip} is a private or reserved address"
    return None


async def resolve_refusal(url: str) -> str | None:
    """Check the URL's scheme, then every address its host resolves to."""
    reason = scheme_refusal(url)
    if reason:
        return reason
    host = urlsplit(url).hostname or ""
    if is_loopback_host(host):
        return None
    try:
        infos = await anyio.getaddrinfo(host, 443)
    except OSError as exc:
        return f"cannot resolve {host}: {exc}"
    for info in infos:
        refusal = address_refusal(str(info[4][0]))
        if refusal:
            return f"{host} resolves to {refusal}"
    return None
