"""Pre-flight checks of input URLs, on an in-process transport: redirects walked like downloads, HEAD or one byte."""

from __future__ import annotations

import httpx2
import pytest

from batcher.manifest.preflight import MAX_INPUT_BYTES, UrlCheck, check_urls
from batcher.net.redirects import MAX_REDIRECTS

PUBLIC = "https://93.184.216.34"  # a literal public address: resolves to itself, no DNS needed


async def _check(url: str, handler: httpx2.MockTransport) -> UrlCheck:
    check = UrlCheck(url)
    await check_urls([check], transport=handler)
    return check


@pytest.mark.parametrize("hops", [MAX_REDIRECTS, MAX_REDIRECTS + 1])
async def test_redirects_are_followed_as_downloads_follow_them(hops: int) -> None:
    seen: list[httpx2.Request] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        step = int(request.url.path.strip("/"))
        if step < hops:
            return httpx2.Response(301, headers={"location": f"/{step + 1}", "set-cookie": "id=1; Path=/"})
        return httpx2.Response(200, headers={"content-type": "image/png", "content-length": "10"})

    check = await _check(f"{PUBLIC}/0", httpx2.MockTransport(answer))
    if hops > MAX_REDIRECTS:
        assert check.problem == f"more than {MAX_REDIRECTS} redirects" and len(seen) == MAX_REDIRECTS + 1
    else:
        assert check.problem is None and check.content_type == "image/png" and check.size == 10
    assert all(request.method == "HEAD" and "cookie" not in request.headers for request in seen)


async def test_a_redirect_to_a_private_address_is_refused_before_connecting() -> None:
    seen: list[httpx2.Request] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(302, headers={"location": "https://169.254.169.254/latest/meta-data/"})

    check = await _check(f"{PUBLIC}/ref.png", httpx2.MockTransport(answer))
    assert check.problem is not None and "link-local" in check.problem
    assert len(seen) == 1


async def test_a_host_refusing_head_is_asked_for_one_byte() -> None:
    seen: list[httpx2.Request] = []
    total = MAX_INPUT_BYTES + 1

    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        if request.method == "HEAD":
            return httpx2.Response(405)
        assert request.headers["range"] == "bytes=0-0"
        return httpx2.Response(
            206, content=b"\x89", headers={"content-type": "image/png", "content-range": f"bytes 0-0/{total}"}
        )

    check = await _check(f"{PUBLIC}/big.png", httpx2.MockTransport(answer))
    assert [request.method for request in seen] == ["HEAD", "GET"]
    assert check.size == total and check.problem is not None and "RunComfy takes at most 50 MB" in check.problem
