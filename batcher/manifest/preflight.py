"""Pre-flight: can RunComfy fetch the manifest's input images?

A job whose reference image is gone, private, an HTML error page or over
the service's 50 MB limit still costs a submit, then fails. This checks
every distinct input URL once, concurrently and without credentials (HEAD,
or a one-byte ranged GET where HEAD is refused), before any money is spent;
redirects are followed as downloads follow them (`batcher.net.redirects`).
Local images (and data URIs) are not URLs to fetch: loading the manifest
already checked each file (`batcher.manifest.localimages`), so they are skipped here.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2

from .._version import __version__
from ..net.policy import ANY_LOOPBACK
from ..net.redirects import MAX_REDIRECTS, RefusedHopError, TooManyRedirectsError, anonymous_client, follow
from .loader import Job
from .schema import ModelSchema

__all__ = ["MAX_INPUT_BYTES", "UrlCheck", "check_urls", "input_urls"]

MAX_INPUT_BYTES = 50 * 1024 * 1024
"""The largest image URL input: RunComfy's playground page says images of at most 50 MB (URLs RunComfy
fetches itself; a local image sent inline has the nodes' smaller limit, `imagefit.MAX_IMAGE_BYTES`)."""
_ORIGINS_KEPT = 5
_RANGE_TOTAL = re.compile(r"/(\d+)\s*$")


@dataclass(slots=True)
class UrlCheck:
    """One distinct input URL: where the manifest uses it, and what is wrong with it (None when fine)."""

    url: str
    origins: list[str] = field(default_factory=list)
    uses: int = 0
    problem: str | None = None
    content_type: str = ""
    size: int | None = None


def _url_fields(schema: ModelSchema) -> dict[str, bool]:
    """Input fields holding fetchable URLs: name → whether the field is a list of them."""
    found: dict[str, bool] = {}
    for name, spec in schema.properties.items():
        if spec.get("format") in ("image_uri", "uri"):
            found[name] = False
        elif isinstance(spec.get("items"), dict) and spec["items"].get("format") in ("image_uri", "uri"):
            found[name] = True
    return found


def input_urls(jobs: Iterable[Job], schemas: dict[str, ModelSchema]) -> dict[str, UrlCheck]:
    """Every distinct input URL of jobs, with the first few places that use it."""
    checks: dict[str, UrlCheck] = {}
    fields = {model: _url_fields(schema) for model, schema in schemas.items()}
    for job in jobs:
        for name, is_list in fields.get(job.model, {}).items():
            value: Any = job.input.get(name)
            for url in value if is_list and isinstance(value, list) else [value]:
                if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                    continue  # a local image's reference (checked when loading), a data: URI: nothing to fetch
                check = checks.setdefault(url, UrlCheck(url))
                check.uses += 1
                if len(check.origins) < _ORIGINS_KEPT and job.origin not in check.origins:
                    check.origins.append(job.origin)
    return checks


async def check_urls(
    checks: Iterable[UrlCheck],
    *,
    concurrency: int = 8,
    request_timeout: float = 15.0,
    transport: httpx2.AsyncBaseTransport | None = None,
) -> None:
    """Fill in each check's problem (None when the URL serves an image within the limit)."""
    limiter = anyio.CapacityLimiter(concurrency)
    async with (
        anonymous_client(
            user_agent=f"batcher/{__version__} (pre-flight)",
            timeout=httpx2.Timeout(request_timeout),
            transport=transport,
        ) as client,
        anyio.create_task_group() as group,
    ):
        for check in checks:

            async def one(check: UrlCheck = check) -> None:
                async with limiter:
                    try:
                        await _check(client, check)
                    except httpx2.HTTPError as exc:
                        check.problem = f"cannot fetch it: {type(exc).__name__} {exc}".rstrip()

            group.start_soon(one)


async def _check(client: httpx2.AsyncClient, check: UrlCheck) -> None:
    try:
        # The user's own URLs: any loopback one may be checked (a local server of theirs).
        async with follow(client, check.url, loopback=ANY_LOOPBACK, open_hop=_probe) as response:
            _judge(check, response)
    except RefusedHopError as exc:
        check.problem = exc.reason
    except TooManyRedirectsError:
        check.problem = f"more than {MAX_REDIRECTS} redirects"


@asynccontextmanager
async def _probe(client: httpx2.AsyncClient, url: str) -> AsyncIterator[httpx2.Response]:
    """One hop: HEAD, or a one-byte ranged GET where HEAD is refused or names no type."""
    response = await client.head(url)
    if response.status_code in (403, 405, 501) or (response.is_success and "content-type" not in response.headers):
        # Some hosts refuse HEAD (signed URLs are often signed for GET only): ask for one byte instead.
        async with client.stream("GET", url, headers={"Range": "bytes=0-0"}) as ranged:
            yield ranged
        return
    yield response


def _judge(check: UrlCheck, response: httpx2.Response) -> None:
    """Fill in check from the answer its URL finally led to."""
    if not response.is_success:
        check.problem = f"answers HTTP {response.status_code}"
        return
    check.content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    check.size = _size(response)
    if not check.content_type.startswith("image/"):
        check.problem = f"serves {check.content_type or 'no content type'}, not an image"
    elif check.size is not None and check.size > MAX_INPUT_BYTES:
        check.problem = f"is {check.size / 1e6:.1f} MB; RunComfy takes at most {MAX_INPUT_BYTES // (1024 * 1024)} MB"


def _size(response: httpx2.Response) -> int | None:
    if response.status_code == 206:
        total = _RANGE_TOTAL.search(response.headers.get("content-range", ""))
        return int(total[1]) if total else None
    length = response.headers.get("content-length", "")
    return int(length) if length.isdigit() else None
