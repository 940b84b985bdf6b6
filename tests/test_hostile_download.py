"""Hostile answers: output URLs on local services, disguised addresses, odd types, trickles, odd numbers.

Each test drives the public interface (`run_manifest` with a scripted API, or
`Downloader.fetch`) and checks what reached the network, the disk and the journal.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import httpx2
import pytest

from batcher import DownloadError, load_manifest, read_journal, run_manifest
from batcher.journal.store import JOURNAL_NAME, encode_event, fold_bytes
from batcher.net.policy import address_refusal
from batcher.output.download import Downloader
from batcher.sandbox.png import make_png

from .conftest import fast_options, many_jobs_manifest

PNG = make_png("hostile")


@contextlib.contextmanager
def serving_png() -> Iterator[tuple[str, list[str]]]:
    """A plain HTTP server on a loopback port of its own: (its origin, the paths it was asked for)."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def scripted_api(output_url: str, extra: bytes = b"") -> httpx2.MockTransport:
    """An API that accepts every submit and answers each poll 'completed' with output_url (and extra
    raw JSON members)."""
    submitted: list[str] = []

    def api(request: httpx2.Request) -> httpx2.Response:
        if request.method == "POST":
            submitted.append(f"r-{len(submitted)}")
            return httpx2.Response(200, json={"request_id": submitted[-1]})
        request_id = request.url.path.split("/")[3]
        body = json.dumps({"request_id": request_id, "status": "completed", "output": {"image": output_url}})
        return httpx2.Response(200, content=body.encode()[:-1] + extra + b"}")

    return httpx2.MockTransport(api)


@pytest.mark.parametrize("api_base", [None, "http://127.0.0.1:1"], ids=["remote-api", "other-loopback-api"])
async def test_output_urls_on_other_loopback_ports_are_never_fetched(tmp_path: Path, api_base: str | None) -> None:
    manifest = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 1))
    with serving_png() as (local, hits):
        options = fast_options(output_dir=Path("out"), api_base=api_base, api_transport=scripted_api(f"{local}/x.png"))
        summary = await run_manifest(manifest, options)
        assert hits == [], "a local service was fetched on an API's say-so"
        assert summary.done == 0 and "loopback" in (summary.failed[0].error or "")
        assert list((tmp_path / "out").rglob("*.png")) == []

        # The one loopback origin allowed: the API base's own, when it is loopback (the sandbox's case),
        # localhost and 127.0.0.1 being one host.
        own = load_manifest(many_jobs_manifest(tmp_path / "own.yaml", 1))
        base = local.replace("127.0.0.1", "localhost")
        options = fast_options(
            output_dir=Path("own"), api_base=base, api_transport=scripted_api(f"{local}/x.png"), new_output=True
        )
        summary = await run_manifest(own, options)
        assert summary.done == 1 and hits == ["/x.png"]


@pytest.mark.parametrize(
    ("address", "inner"),
    [
        ("2002:a9fe:a9fe::", "169.254.169.254"),  # 6to4
        ("2001:0:4136:e378:8000:63bf:5601:5601", "169.254.169.254"),  # Teredo (client bits inverted)
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),  # NAT64
        ("::a9fe:a9fe", "169.254.169.254"),  # IPv4-compatible
        ("::ffff:a9fe:a9fe", "169.254.169.254"),  # IPv4-mapped
        ("2002:a00:1::", "10.0.0.1"),
        ("2002:7f00:1::", "127.0.0.1"),  # a wrapped loopback is never the sandbox
    ],
)
async def test_private_addresses_in_ipv6_disguise_are_refused_before_connecting(
    tmp_path: Path, address: str, inner: str
) -> None:
    seen: list[httpx2.Request] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200, content=PNG)

    async with Downloader(transport=httpx2.MockTransport(answer), attempts=1) as downloader:
        with pytest.raises(DownloadError, match=inner.replace(".", r"\.")) as caught:
            await downloader.fetch(f"https://[{address}]/latest/meta-data", tmp_path / "a.png")
    assert seen == [] and caught.value.permanent
    # A translation of a public address is that address: an IPv6-only network reaches IPv4 hosts so.
    assert address_refusal("64:ff9b::808:808") is None


@pytest.mark.parametrize(
    "headers",
    [{}, {"content-type": ""}, {"content-type": "application/octet-stream"}, {"content-type": "image/"}],
    ids=["absent", "empty", "octet-stream", "no-subtype"],
)
async def test_a_download_that_is_not_an_image_or_video_is_refused(tmp_path: Path, headers: dict[str, str]) -> None:
    def answer(request: httpx2.Request) -> httpx2.Response:
        kind = "video/mp4" if request.url.path.endswith(".mp4") else None
        return httpx2.Response(200, content=PNG, headers={"content-type": kind} if kind else headers)

    async with Downloader(transport=httpx2.MockTransport(answer), attempts=1) as downloader:
        with pytest.raises(DownloadError, match="not an image or video") as caught:
            await downloader.fetch("https://93.184.216.34/a.png", tmp_path / "a.png")
        assert caught.value.permanent
        assert list(tmp_path.iterdir()) == []
        got = await downloader.fetch("https://93.184.216.34/a.mp4", tmp_path / "a.mp4")
    assert got.bytes == len(PNG)


@contextlib.contextmanager
def trickling(every: float) -> Iterator[str]:
    """A server that announces 10 kB of PNG and then sends one byte each `every` seconds, for ever."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 10000\r\n\r\n")
            with contextlib.suppress(OSError):
                while not stop.wait(every):
                    conn.sendall(b"\0")

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()


async def test_a_trickling_download_gives_up_at_its_deadline(tmp_path: Path) -> None:
    with trickling(every=0.2) as url:
        started = time.monotonic()
        async with Downloader(loopback_origin=url, deadline=1.0, attempts=3, backoff=0.01) as downloader:
            with anyio.fail_after(20), pytest.raises(DownloadError, match="deadline") as caught:
                await downloader.fetch(f"{url}/slow.png", tmp_path / "job" / "slow.png")
        elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 8.0, elapsed  # the deadline, not the three tries' trickle (generous for a loaded machine)
    assert not caught.value.permanent, "a fresh URL may be faster: the runner may ask for one"
    assert list(tmp_path.rglob("*")) in ([], [tmp_path / "job"])


def test_the_journal_writer_never_writes_what_its_reader_refuses() -> None:
    odd: dict[str, object] = {
        "nan": float("nan"),
        "inf": float("inf"),
        "big": 10**30,
        "lone": "a\ud800b",
        "keys": {1: "one"},
        "deep": [[[[["fine"]]]]],
    }
    data = encode_event({"t": 1.0, "e": "completed", "job": "j", "outputs": ["https://x/0.png"], "result": odd})
    assert b"NaN" not in data and b"Infinity" not in data
    folded = fold_bytes(data + encode_event({"t": 2.0, "e": "state", "job": "j", "state": "x"}))
    assert folded.records["j"].phase == "completed" and not folded.warnings


async def test_a_nan_cost_or_odd_text_from_the_server_leaves_a_readable_journal(tmp_path: Path) -> None:
    manifest = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 1))

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=PNG, headers={"content-type": "image/png"})

    # Python's json reads NaN, Infinity, huge numbers and lone surrogates; orjson, the journal's reader, does not.
    odd = b', "cost": NaN, "usage": {"ratio": Infinity, "big": 1' + b"0" * 400 + b', "note": "\\ud800"}'
    api = scripted_api("https://93.184.216.34/0.png", odd)
    options = fast_options(
        output_dir=Path("out"),
        api_transport=api,
        download_transport=httpx2.MockTransport(answer),
        allow_output_hosts=("93.184.216.34",),  # not RunComfy's host: allowed, as a user would
    )
    summary = await run_manifest(manifest, options)
    assert summary.done == 1
    folded = read_journal(tmp_path / "out" / JOURNAL_NAME)  # raised JournalCorruptError before
    assert next(iter(folded.records.values())).files
    again = await run_manifest(manifest, options)
    assert again.done == 1
