"""Downloads: every hostile or broken answer gives a clear error and no file under a final name."""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest

from batcher import DownloadError, SandboxThread
from batcher.net.policy import address_refusal, scheme_refusal
from batcher.net.retrying import set_testing
from batcher.output.download import DEFAULT_MAX_BYTES, Downloader, safe_child
from batcher.sandbox.png import make_png

PNG = make_png("x")
PUBLIC = "https://93.184.216.34"  # a literal public address: resolves to itself, no DNS needed


@pytest.fixture(autouse=True)
def no_waiting() -> Iterator[None]:
    """Retries take no time here: what is retried, and how often, is the subject."""
    set_testing(True)
    yield
    set_testing(False)


def _downloader(
    handler: Callable[[httpx2.Request], httpx2.Response],
    seen: list[httpx2.Request],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Downloader:
    def record(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return handler(request)

    return Downloader(transport=httpx2.MockTransport(record), backoff=0.001, attempts=2, max_bytes=max_bytes)


def _png(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, content=PNG, headers={"content-type": "image/png"})


async def test_a_good_download_is_hashed_and_in_place_without_credentials(tmp_path: Path) -> None:
    seen: list[httpx2.Request] = []
    async with _downloader(_png, seen) as downloader:
        got = await downloader.fetch(f"{PUBLIC}/out/0.png?sig=secret", tmp_path / "job" / "0.png")
    assert got.path.read_bytes() == PNG and got.bytes == len(PNG)
    assert "authorization" not in seen[0].headers
    assert seen[0].headers["accept-encoding"] == "identity"
    assert list(tmp_path.rglob(".*.part")) == []


async def test_a_file_larger_than_one_batch_streams_to_disk(tmp_path: Path) -> None:
    import hashlib

    from batcher.output.download import _WRITE_BATCH

    body = bytes(range(256)) * ((_WRITE_BATCH * 2 + 12_345) // 256)  # three batches, the last one partial
    seen: list[httpx2.Request] = []

    def big(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=body, headers={"content-type": "image/png"})

    async with _downloader(big, seen, max_bytes=_WRITE_BATCH * 3) as downloader:
        got = await downloader.fetch(f"{PUBLIC}/out/big.png", tmp_path / "job" / "big.png")
    assert got.path.read_bytes() == body and got.sha256 == hashlib.sha256(body).hexdigest()
    assert list(tmp_path.rglob(".*.part")) == []

    async with _downloader(big, seen, max_bytes=_WRITE_BATCH + 1) as downloader:
        with pytest.raises(DownloadError, match="over the"):
            await downloader.fetch(f"{PUBLIC}/out/big.png", tmp_path / "job" / "capped.png")
    assert not (tmp_path / "job" / "capped.png").exists() and list(tmp_path.rglob(".*.part")) == []


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("file:///etc/passwd", "only https"),
        ("ftp://example.org/a.png", "only https"),
        ("http://93.184.216.34/a.png", "only for loopback"),
        ("https://169.254.169.254/latest/meta-data", "link-local"),
        ("https://10.1.2.3/a.png", "private"),
        ("https://[::ffff:192.168.0.1]/a.png", "private"),
        ("https://0.0.0.0/a.png", "private"),
    ],
)
async def test_unsafe_urls_are_refused_before_connecting(tmp_path: Path, url: str, words: str) -> None:
    seen: list[httpx2.Request] = []
    async with _downloader(_png, seen) as downloader:
        with pytest.raises(DownloadError, match=words) as caught:
            await downloader.fetch(url, tmp_path / "a.png")
    assert seen == []
    assert caught.value.permanent
    assert not (tmp_path / "a.png").exists()


async def test_redirects_are_checked_at_every_hop(tmp_path: Path) -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(302, headers={"location": "https://169.254.169.254/latest/meta-data/"})

    async with _downloader(handler, seen) as downloader:
        with pytest.raises(DownloadError, match="link-local"):
            await downloader.fetch(f"{PUBLIC}/a.png", tmp_path / "a.png")
    assert len(seen) == 1


@pytest.mark.parametrize(("hops", "fetched"), [(5, True), (6, False)])
async def test_downloads_follow_at_most_five_redirects(tmp_path: Path, hops: int, fetched: bool) -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        step = int(request.url.path.strip("/") or 0)
        if step < hops:
            # relative Locations, and a cookie that must not ride along to the next hop
            return httpx2.Response(302, headers={"location": f"/{step + 1}", "set-cookie": "session=s3cret; Path=/"})
        return _png(request)

    async with _downloader(handler, seen) as downloader:
        if fetched:
            assert (await downloader.fetch(f"{PUBLIC}/0", tmp_path / "a.png")).bytes == len(PNG)
        else:
            with pytest.raises(DownloadError, match="too many redirects") as caught:
                await downloader.fetch(f"{PUBLIC}/0", tmp_path / "a.png")
            assert caught.value.permanent
    assert len(seen) == min(hops, 5) + 1
    assert all("cookie" not in request.headers and "authorization" not in request.headers for request in seen)


@pytest.mark.parametrize(
    "location", ["https://exa\x9bmple.org/a.png", "https://[::1/a.png"], ids=["control-character", "broken-ipv6"]
)
async def test_a_redirect_to_something_unusable_is_a_permanent_error(tmp_path: Path, location: str) -> None:
    seen: list[httpx2.Request] = []
    header = [(b"location", location.encode("latin-1"))]  # as a server sends it: bytes
    async with _downloader(lambda request: httpx2.Response(302, headers=header), seen) as downloader:
        with pytest.raises(DownloadError, match="not a usable URL") as caught:
            await downloader.fetch(f"{PUBLIC}/a.png", tmp_path / "a.png")
        assert caught.value.permanent and len(seen) == 1
        with pytest.raises(DownloadError, match="not a usable URL"):
            await downloader.fetch(location, tmp_path / "a.png")  # the same, named by the API itself
    assert len(seen) == 1


async def test_transient_faults_are_retried_and_an_expired_url_is_not(tmp_path: Path) -> None:
    seen: list[httpx2.Request] = []
    answers = iter([httpx2.Response(503), httpx2.Response(429)])

    def flaky(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return next(answers, None) or _png(request)

    async with Downloader(transport=httpx2.MockTransport(flaky), attempts=3) as downloader:
        assert (await downloader.fetch(f"{PUBLIC}/a.png", tmp_path / "a.png")).bytes == len(PNG)
    assert len(seen) == 3

    seen.clear()
    async with _downloader(_answer(403, b"expired"), seen) as downloader:
        with pytest.raises(DownloadError, match="expired"):
            await downloader.fetch(f"{PUBLIC}/b.png", tmp_path / "b.png")
    assert len(seen) == 1, "an expired URL needs a fresh one, not another try"


def _answer(status: int, body: bytes, **headers: str) -> Callable[[httpx2.Request], httpx2.Response]:
    return lambda request: httpx2.Response(status, content=body, headers=headers)


@pytest.mark.parametrize(
    ("handler", "words"),
    [
        (_answer(200, b"<html>login</html>", **{"content-type": "text/html"}), "not an image"),
        (_answer(200, PNG * 10, **{"content-type": "image/png"}), "over the"),
        (_answer(200, PNG, **{"content-type": "image/png", "content-length": str(10**9)}), "over the"),
        (_answer(200, PNG[:50], **{"content-type": "image/png", "content-length": str(len(PNG))}), "sent 50 bytes"),
        (_answer(200, b"", **{"content-type": "image/png"}), "empty"),
        (
            _answer(
                200, gzip.compress(b"\0" * 10_000_000), **{"content-type": "image/png", "content-encoding": "gzip"}
            ),
            "gzip-encoded",
        ),
        (_answer(404, b"gone"), "expired"),
        (_answer(500, b"oops"), "HTTP 500"),
    ],
    ids=["html", "over-cap", "declared-over-cap", "short-body", "empty", "gzip-bomb", "expired", "server-error"],
)
async def test_broken_answers_leave_no_file(
    tmp_path: Path, handler: Callable[[httpx2.Request], httpx2.Response], words: str
) -> None:
    seen: list[httpx2.Request] = []
    async with _downloader(handler, seen, max_bytes=len(PNG) * 2) as downloader:
        with pytest.raises(DownloadError, match=words):
            await downloader.fetch(f"{PUBLIC}/a.png", tmp_path / "a.png")
    assert list(tmp_path.iterdir()) == []


async def test_a_body_truncated_on_the_wire_is_retried_then_refused(
    tmp_path: Path, start_sandbox: Callable[..., SandboxThread]
) -> None:
    sandbox = start_sandbox(fault_rate=1.0, faults=("truncate",), fault_paths=("file",))
    url = f"{sandbox.url}/files/sbx-1-000000000000/0.png"
    async with Downloader(backoff=0.001, attempts=3, loopback_origin=sandbox.url) as downloader:
        with pytest.raises(DownloadError, match=r"RemoteProtocolError|sent"):
            await downloader.fetch(url, tmp_path / "a.png")
    assert sandbox.sandbox.calls["file"] == 3
    assert list(tmp_path.iterdir()) == []


def test_job_paths_cannot_escape_the_output_folder(tmp_path: Path) -> None:
    assert safe_child(tmp_path, "job", "0.png") == (tmp_path / "job" / "0.png").resolve()
    for parts in (("..", "x.png"), ("/etc", "passwd"), ("a", "..", "..", "b")):
        with pytest.raises(DownloadError, match="outside the output folder"):
            safe_child(tmp_path, *parts)


def test_policy_helpers() -> None:
    assert scheme_refusal("http://localhost:8765/x") is None
    assert scheme_refusal("http://127.0.0.2/x") is None
    assert scheme_refusal("https://example.org/x") is None
    assert address_refusal("127.0.0.1") is None
    assert address_refusal("8.8.8.8") is None
    assert address_refusal("fe80::1") is not None
