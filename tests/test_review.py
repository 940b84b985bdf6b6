"""The review server: what it serves, to whom, what it writes, and the input images it fetches once."""

from __future__ import annotations

import hashlib
import json
import threading
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2
import pytest

from batcher import UsageError, load_manifest
from batcher.review.decisions import DECISIONS_NAME, read_decisions
from batcher.review.server import ReviewServer
from batcher.review.thumbnails import INPUTS_DIR, InputImages, input_id
from batcher.sandbox.png import make_png

from .reviewkit import finished_run

PNG = make_png("an input", 32)


@pytest.fixture
def inputs_host() -> Iterator[tuple[str, dict[str, int]]]:
    """A loopback host serving /ref.png (an image), /page.png (a web page) and counting requests."""
    hits: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path == "/hop.png":  # to another port of this machine
                self.send_response(302)
                self.send_header("Location", "http://127.0.0.1:9/ref.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body, kind = (PNG, "image/png") if self.path == "/ref.png" else (b"<script>x</script>", "text/html")
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ReviewServer, httpx2.Client, Path]]:
    path, out = finished_run(tmp_path, 3)
    with (
        ReviewServer(load_manifest(path), out, prefetch=False) as server,
        httpx2.Client(base_url=server.origin) as client,
    ):
        yield server, client, out


def _items(server: ReviewServer, client: httpx2.Client) -> dict[str, Any]:
    answer = client.get("/api/items", params={"t": server.token})
    assert answer.status_code == 200
    return dict(answer.json())


def _post(server: ReviewServer, client: httpx2.Client, body: dict[str, Any], **headers: str) -> httpx2.Response:
    sent = {"Content-Type": "application/json", "X-Batcher-Token": server.token, "Origin": server.origin, **headers}
    return client.post("/api/decisions", content=json.dumps(body), headers=sent)


def test_the_page_and_its_data_need_the_sessions_token(served) -> None:
    server, client, _ = served
    assert server.url.startswith("http://127.0.0.1:") and f"?t={server.token}" in server.url
    for path in ("/", "/api/items", "/files/job-0000/x.png", "/inputs/abc"):
        assert client.get(path).status_code == 403, path
        assert client.get(path, params={"t": "wrong"}).status_code == 403, path
    page = client.get("/", params={"t": server.token})
    assert page.status_code == 200 and "<script nonce=" in page.text
    policy = page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in policy and "script-src 'nonce-" in policy and "unsafe-inline" not in policy
    assert page.headers["X-Frame-Options"] == "DENY" and page.headers["X-Content-Type-Options"] == "nosniff"
    # Its hint reaches this folder's journal: a rehearsal's command must never start a real run elsewhere.
    assert f"-o {server.output_dir} --sandbox --replace-rejected" in page.text
    data = _items(server, client)
    assert [job["name"] for job in data["jobs"]] == ["job-0000", "job-0001", "job-0002"]
    assert {item["d"] for item in data["items"]} == {"undecided"}


def test_another_host_name_is_refused(served) -> None:
    """DNS rebinding: a name the attacker points at 127.0.0.1 is not this server's address."""
    server, client, _ = served
    answer = client.get("/", params={"t": server.token}, headers={"Host": "evil.example:80"})
    assert answer.status_code == 421
    port = server.origin.rsplit(":", 1)[1]
    assert client.get("/", params={"t": server.token}, headers={"Host": f"localhost:{port}"}).status_code == 200


def test_decisions_are_taken_from_the_page_only(served) -> None:
    server, client, out = served
    item = _items(server, client)["items"][1]
    body = {"key": item["k"], "index": item["i"], "sha256": item["sha"], "decision": "rejected"}
    assert _post(server, client, body, Origin="https://evil.example").status_code == 403
    assert _post(server, client, body, **{"X-Batcher-Token": "guess"}).status_code == 403
    assert _post(server, client, body, **{"Content-Type": "text/plain"}).status_code == 415
    assert client.options("/api/decisions").status_code == 405
    assert "Access-Control-Allow-Origin" not in client.options("/api/decisions").headers
    assert not (out / DECISIONS_NAME).read_bytes(), "nothing written by a refused request"
    assert _post(server, client, body).status_code == 200
    assert _items(server, client)["items"][1]["d"] == "rejected"
    assert read_decisions(out).of(item["k"], item["i"], item["sha"]) == "rejected"


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"decision": "maybe"}, 400),
        ({"key": "0" * 16}, 400),
        ({"index": 7}, 400),
        ({"sha256": "0" * 64}, 400),
        ({"index": True}, 400),
    ],
)
def test_a_decision_about_no_current_image_is_refused(served, change: dict[str, Any], status: int) -> None:
    server, client, out = served
    item = _items(server, client)["items"][0]
    body = {"key": item["k"], "index": item["i"], "sha256": item["sha"], "decision": "accepted", **change}
    assert _post(server, client, body).status_code == status
    assert read_decisions(out).lines == 0


def test_only_the_runs_images_are_served_from_the_folder(served) -> None:
    server, client, out = served
    item = _items(server, client)["items"][0]
    image = client.get(f"/files/{item['src']}", params={"t": server.token})
    assert image.status_code == 200 and image.headers["Content-Type"] == "image/png"
    assert hashlib.sha256(image.content).hexdigest() == item["sha"]
    (out / "secret.png").write_bytes(PNG)
    for path in ("state.jsonl", "decisions.jsonl", "secret.png", "../night.yaml", "%2e%2e/night.yaml", "/etc/passwd"):
        assert client.get(f"/files/{path}", params={"t": server.token}).status_code == 404, path


def test_the_server_listens_on_loopback_only(tmp_path: Path) -> None:
    path, out = finished_run(tmp_path, 1)
    with pytest.raises(UsageError, match="loopback only"):
        ReviewServer(load_manifest(path), out, host="0.0.0.0")


def test_input_images_are_fetched_once_and_kept_in_the_folder(tmp_path: Path, inputs_host) -> None:
    host, hits = inputs_host
    local = tmp_path / "local.png"
    local.write_bytes(make_png("a local input", 24))
    manifest_path = tmp_path / "m.yaml"
    manifest_path.write_text(
        "model: openai/gpt-image-1-5/image-to-image\n"
        "jobs:\n"
        "  - id: shot\n"
        "    prompt: a lighthouse\n"
        f"    image_urls: ['{host}/ref.png', '{host}/page.png', 'http://127.0.0.1:9/gone.png', local.png]\n"
        "    repeat: 3\n",
        encoding="utf-8",
    )
    manifest = load_manifest(manifest_path)
    out = tmp_path / "out"
    thumbs = InputImages(out, deadline=5.0, attempts=1)
    found = thumbs.add(manifest.jobs[0])
    for job in manifest.jobs[1:]:
        assert thumbs.add(job) == found
    assert [i.label for i in found] == [
        f"{host}/ref.png",
        f"{host}/page.png",
        "http://127.0.0.1:9/gone.png",
        "local.png",
    ]
    ref, page, gone, mine = (i.id for i in found)
    for _ in range(3):
        assert thumbs.get(ref) == (PNG, "image/png")
    assert hits["/ref.png"] == 1
    assert (out / INPUTS_DIR / input_id(f"{host}/ref.png")).read_bytes() == PNG
    assert thumbs.get(page) is None and "not an image" in (thumbs.failure(page) or "")
    assert thumbs.get(gone) is None and thumbs.get(gone) is None
    assert "ConnectError" in (thumbs.failure(gone) or "") or "failed" in (thumbs.failure(gone) or "")
    assert thumbs.get(mine) == (local.read_bytes(), "image/png")
    # A redirect to another port of this machine is refused: loopback only at the URL's own origin.
    (hop,) = thumbs.add(replace(manifest.jobs[0], input={"prompt": "x", "image_urls": [f"{host}/hop.png"]}))
    assert thumbs.get(hop.id) is None and "loopback" in (thumbs.failure(hop.id) or "")
    # Another review (a new server) finds them in the folder: no new fetch.
    again = InputImages(out)
    again.add(manifest.jobs[0])
    assert again.get(ref) == (PNG, "image/png") and hits["/ref.png"] == 1
    assert again.get("0" * 32) is None, "only ids of the jobs' inputs"


def test_a_failed_input_is_a_placeholder_on_the_page(tmp_path: Path) -> None:
    path, out = finished_run(tmp_path, 1)  # its input is https://example.org/ref.jpg: not reachable here
    with (
        ReviewServer(load_manifest(path), out, prefetch=False) as server,
        httpx2.Client(base_url=server.origin) as client,
    ):
        ident = _items(server, client)["jobs"][0]["inputs"][0]["id"]
        answer = client.get(f"/inputs/{ident}", params={"t": server.token}, timeout=60)
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "image/svg+xml"
    assert b"<script" not in answer.content and answer.headers["X-Batcher-Reason"]
    assert not list((out / ".review").rglob("*.part")), "no partial file left behind"


def test_the_server_writes_only_decisions_and_inputs(served, tmp_path: Path) -> None:
    server, client, out = served
    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(out / ".review")}
    item = _items(server, client)["items"][0]
    body = {"key": item["k"], "index": item["i"], "sha256": item["sha"], "decision": "accepted"}
    assert _post(server, client, body).status_code == 200
    after = {p for p in tmp_path.rglob("*") if not p.is_relative_to(out / ".review")}
    assert after - before == set(), "decisions.jsonl exists from the start"
    assert (out / DECISIONS_NAME).stat().st_size > 0


def test_nothing_to_review_says_so(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from batcher.cli.main import cli

    from .conftest import many_jobs_manifest

    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    result = CliRunner().invoke(cli, ["review", str(manifest)])
    assert result.exit_code == 2 and "nothing to review" in result.output


@pytest.mark.slow
def test_the_command_prints_the_address_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    path, out = finished_run(tmp_path, 2)
    command = [sys.executable, "-m", "batcher", "review", str(path), "-o", str(out), "--port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert line.startswith("review: http://127.0.0.1:"), line
        url = line.split()[1]
        assert httpx2.get(url).status_code == 200
        assert httpx2.get(url.split("?")[0]).status_code == 403
    finally:
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=20)
    assert process.returncode == 0 and "stopped" in rest


def test_an_output_is_served_in_ranges_and_chunks_not_read_whole(served) -> None:
    server, client, out = served
    item = _items(server, client)["items"][0]
    whole = (out / item["src"]).read_bytes()
    size = len(whole)
    url, token = f"/files/{item['src']}", {"t": server.token}
    full = client.get(url, params=token)
    assert full.status_code == 200 and full.headers["Accept-Ranges"] == "bytes" and full.content == whole
    for asked, (start, end) in {
        "bytes=10-19": (10, 19),
        "bytes=-16": (size - 16, size - 1),
        "bytes=5-": (5, size - 1),
    }.items():
        part = client.get(url, params=token, headers={"Range": asked})
        assert part.status_code == 206, asked
        assert part.headers["Content-Range"] == f"bytes {start}-{end}/{size}"
        assert part.content == whole[start : end + 1]
        assert part.headers["Content-Type"] == "image/png"
    past = client.get(url, params=token, headers={"Range": f"bytes={size}-"})
    assert past.status_code == 416 and past.headers["Content-Range"] == f"bytes */{size}"
    assert client.get(url, params=token, headers={"Range": "bytes=0-1,5-6"}).content == whole  # several: all of it
    # A large output (a video) goes out a chunk at a time: the server never holds it whole.
    big = 48 * 1024 * 1024
    (out / item["src"]).write_bytes(whole + bytes(big))
    tracemalloc.start()
    try:
        received = 0
        with client.stream("GET", url, params=token) as answer:
            assert answer.status_code == 200
            for chunk in answer.iter_bytes():
                received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == size + big
    assert peak < 8 * 1024 * 1024, peak
