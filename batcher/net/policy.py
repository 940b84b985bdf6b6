"""Which URLs batcher may talk to.

Plain ``http`` is for loopback only (the sandbox); everything else must be
``https``. Output files are fetched from hosts the API names, so those hosts
must also resolve to public addresses: an answer pointing us at
169.254.169.254 or a private range is refused before any connection is made,
in any of its IPv6 disguises (IPv4-mapped, IPv4-compatible, 6to4, Teredo,
NAT64). Downloads reach loopback only at the API base's own origin, and only
when that base is itself loopback (the sandbox): an answer naming another
local port must not turn batcher into a client of whatever listens there.

Output files come only from RunComfy's hosts (`OutputHosts`): RunComfy's CLI
downloads only from ``*.runcomfy.net`` and ``*.runcomfy.com``
(``TRUSTED_DOWNLOAD_HOST_SUFFIXES`` in runcomfy-com/runcomfy-cli
``src/download.rs``, "so a compromised / adversarial upstream model can't
trick the CLI into pulling arbitrary internet content"), its ComfyUI nodes
only from https ``*.runcomfy.net``. batcher takes those, the API base's own
origin (a proxy's, the sandbox's), and the hosts the user allows
(``--allow-output-host``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import anyio

__all__ = [
    "ANY_LOOPBACK",
    "RUNCOMFY_OUTPUT_HOSTS",
    "OutputHosts",
    "address_refusal",
    "is_loopback_host",
    "loopback_origin",
    "origin",
    "resolve_refusal",
    "scheme_refusal",
]

ANY_LOOPBACK: Final = "any"
"""For `resolve_refusal`: every loopback URL may be used (the user's own input URLs, in pre-flight)."""

RUNCOMFY_OUTPUT_HOSTS: Final = ("runcomfy.net", "runcomfy.com")
"""The domains RunComfy's CLI downloads outputs from (``src/download.rs``), and any host below them."""

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


def _loopback_refusal(url: str, allowed: str | tuple[str, ...] | None) -> str | None:
    """Why a URL on a loopback host may not be used under allowed (see `resolve_refusal`), or None."""
    if allowed == ANY_LOOPBACK:
        return None
    found = origin(url) or url
    if isinstance(allowed, tuple):
        if any(_same_origin(found, one) for one in allowed):
            return None
        allowed = allowed[0] if allowed else None
    if allowed is None:
        return f"{found} is a loopback address, and downloads reach loopback only when the API base is loopback"
    if not _same_origin(found, allowed):
        return f"{found} is on loopback but is not the API base {allowed}, the only loopback origin downloads may reach"
    return None


async def resolve_refusal(url: str, *, loopback: str | tuple[str, ...] | None = ANY_LOOPBACK) -> str | None:
    """Check the URL's scheme, then every address its host resolves to.

    loopback says which loopback URLs may be used: `ANY_LOOPBACK` (the
    default: the user's own URLs), None (none: downloads from a remote API),
    or one origin as `loopback_origin` gives it (downloads from a sandbox:
    its own origin only), or several (those `OutputHosts.loopback_origins` gives). A name that resolves to loopback counts as
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


def _allowed_entry(entry: str) -> tuple[str, int | None]:
    """(host, port or None) of an --allow-output-host value: ``host``, ``*.domain``, ``host:port`` or ``[::1]:port``."""
    text = entry.strip().lower().rstrip(".")
    if not text or "/" in text or "@" in text or "?" in text or "#" in text:
        msg = (
            f"--allow-output-host {entry!r}: give a host name (cdn.example.com, *.example.com or host:port), not a URL"
        )
        raise ValueError(msg)
    parts = urlsplit(f"//{text}")
    try:
        port = parts.port
    except ValueError as exc:
        msg = f"--allow-output-host {entry!r}: {exc}"
        raise ValueError(msg) from exc
    host = parts.hostname or ""
    if text.startswith("*."):
        host = "*." + host.removeprefix("*.")
    if not host or host == "*.":
        msg = f"--allow-output-host {entry!r}: no host"
        raise ValueError(msg)
    if port is None and is_loopback_host(host):
        msg = f"--allow-output-host {entry!r}: a loopback host is allowed only with its port (127.0.0.1:9000)"
        raise ValueError(msg)
    return host, port


@dataclass(frozen=True, slots=True)
class OutputHosts:
    """Where output files may be downloaded from: RunComfy's hosts, the API base's origin, the hosts allowed."""

    api_base: str
    allowed: tuple[tuple[str, int | None], ...] = ()

    @classmethod
    def of(cls, api_base: str, allowed: Sequence[str] = ()) -> OutputHosts:
        """Raises ValueError for an allowed host that is not one (a URL, a loopback host without its port)."""
        return cls(api_base, tuple(_allowed_entry(entry) for entry in allowed))

    def loopback_origins(self) -> tuple[str, ...]:
        """The loopback origins downloads may reach: the API base's when it is loopback, and those allowed."""
        found = [loopback_origin(self.api_base)]
        for host, port in self.allowed:
            if port is not None and is_loopback_host(host):
                found.append(origin(f"http://{f'[{host}]' if ':' in host else host}:{port}"))
        return tuple(dict.fromkeys(o for o in found if o))

    def refusal(self, url: str) -> str | None:
        """Why url's host may not serve output files, or None when it may."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return None  # not a usable URL: said by the checks that follow
        host = (parts.hostname or "").lower().rstrip(".")
        if not host:
            return None
        if any(host == domain or host.endswith("." + domain) for domain in RUNCOMFY_OUTPUT_HOSTS):
            return None
        own = origin(self.api_base)
        found = origin(url)
        if own and found and _same_origin(found, own):
            return None
        for allowed, allowed_port in self.allowed:
            matches = host.endswith(allowed[1:]) if allowed.startswith("*.") else host == allowed
            if matches and (
                allowed_port is None or allowed_port == (port or {"http": 80, "https": 443}.get(parts.scheme))
            ):
                return None
        shown = f"{host}:{port}" if port else host
        where = " (a loopback address)" if is_loopback_host(host) else ""
        return (
            f"{shown}{where} is not a RunComfy output host (*.runcomfy.net, *.runcomfy.com) or the API base: "
            f"pass --allow-output-host {shown} to allow it"
        )
