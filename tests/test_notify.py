"""``run --notify``: one POST with the summary when a run ends, received by a server on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batcher.cli.main import cli

from .conftest import TOKEN, many_jobs_manifest


@dataclass
class Receiver:
    url: str
    posts: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    status: int = 200


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on loopback that records every POST (headers and JSON body)."""
    found = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            found.posts.append((dict(self.headers), json.loads(body)))
            self.send_response(found.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    found.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/secret-path-T0K3N"
    yield found
    server.shutdown()
    server.server_close()


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, ["run", *args, "--poll-interval", "0.05", "-q"], catch_exceptions=False)


def test_a_finished_run_posts_its_summary_once(tmp_path: Path, receiver: Receiver) -> None:
    manifest = many_jobs_manifest(tmp_path / "night.yaml", 3)
    result = _run(str(manifest), "--sandbox", "--notify", receiver.url)
    assert result.exit_code == 0, result.output
    assert len(receiver.posts) == 1
    headers, body = receiver.posts[0]
    assert body["outcome"] == "done" and body["exit_code"] == 0
    assert body["text"].startswith("batcher: night finished: 3/3 done") and "sandbox" in body["text"]
    assert body["title"] == "batcher: night done"
    assert body["summary"]["done"] == 3 and body["summary"]["counts"]["done"] == 3
    # ntfy renders title and message from the body; Slack reads `text`.
    assert headers["X-Template"] == "yes" and headers["X-Message"] == "{{.text}}" and headers["X-Title"] == "{{.title}}"
    assert headers["Content-Type"] == "application/json"
    assert "Authorization" not in headers


def test_failed_jobs_are_reported_as_failed(tmp_path: Path, receiver: Receiver, start_sandbox, monkeypatch) -> None:
    sandbox = start_sandbox(queue_delay=0.01, run_delay=0.01, fail_rate=1.0)
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    manifest = many_jobs_manifest(tmp_path / "night.yaml", 2)
    result = _run(str(manifest), "--api-base", sandbox.url, "-o", "out", "--notify", receiver.url)
    assert result.exit_code == 1
    (_, body), *_ = receiver.posts
    assert body["outcome"] == "failed" and body["exit_code"] == 1
    assert sorted(body["summary"]["failed"]) == ["job-0000", "job-0001"]
    assert "2 failed" in body["text"]
    assert TOKEN not in json.dumps(body)


def test_an_error_that_ends_the_run_is_reported_too(tmp_path: Path, receiver: Receiver, start_sandbox, monkeypatch):
    sandbox = start_sandbox(token="another-token")
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    manifest = many_jobs_manifest(tmp_path / "night.yaml", 2)
    result = CliRunner().invoke(
        cli, ["run", str(manifest), "--api-base", sandbox.url, "-o", "out", "--notify", receiver.url, "-q"]
    )
    assert result.exit_code == 2
    (_, body), *_ = receiver.posts
    assert body["outcome"] == "failed" and "token" in body["text"].lower()
    assert TOKEN not in json.dumps(body)


@pytest.mark.parametrize("status", [500, 404])
def test_a_failing_receiver_never_fails_the_run(tmp_path: Path, receiver: Receiver, status: int) -> None:
    receiver.status = status
    manifest = many_jobs_manifest(tmp_path / "night.yaml", 1)
    result = _run(str(manifest), "--sandbox", "--notify", receiver.url)
    assert result.exit_code == 0
    assert f"could not notify 127.0.0.1: the receiver answered HTTP {status}" in result.output
    assert "secret-path" not in result.output, "a webhook's path is its secret"


def test_no_receiver_at_all_never_fails_the_run(tmp_path: Path) -> None:
    manifest = many_jobs_manifest(tmp_path / "night.yaml", 1)
    result = _run(str(manifest), "--sandbox", "--notify", "http://127.0.0.1:9/hook")
    assert result.exit_code == 0
    assert "could not notify 127.0.0.1: ConnectError" in result.output


@pytest.mark.parametrize("url", ["http://hooks.example.com/x", "ftp://127.0.0.1/x", "hooks.slack.com/services/x"])
def test_a_url_batcher_would_not_send_to_is_refused_before_the_run(tmp_path: Path, url: str) -> None:
    manifest = many_jobs_manifest(tmp_path / "night.yaml", 1)
    result = CliRunner().invoke(cli, ["run", str(manifest), "--sandbox", "--notify", url])
    assert result.exit_code == 2 and "--notify" in result.output
    assert not (tmp_path / "output").exists(), "nothing ran"


@pytest.mark.slow
def test_an_interrupted_run_says_so(tmp_path: Path, receiver: Receiver) -> None:
    manifest = many_jobs_manifest(tmp_path / "night.yaml", 40)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "batcher", "run", str(manifest), "--sandbox", "-c", "2", "--notify", receiver.url]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    journal = tmp_path / "output" / "sandbox" / "night" / "state.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (journal.exists() and b'"submitted"' in journal.read_bytes()):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    (_, body), *_ = receiver.posts
    assert body["outcome"] == "interrupted" and body["exit_code"] == 130
    assert "was interrupted" in body["text"] and body["summary"]["interrupted"] is True


def test_a_receiver_that_drips_its_answer_cannot_hold_the_run_s_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: the per-read timeout alone let a byte a second hold `run` for ever."""
    import socket
    import threading
    import time

    from batcher.reports import notify

    monkeypatch.setattr(notify, "TIMEOUT", 0.5)
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drip() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.is_set():
                conn.sendall(b"X-Drip: y\r\n")
                time.sleep(0.2)

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    started = time.monotonic()
    failure = notify.send(f"http://127.0.0.1:{server.getsockname()[1]}/hook", {"outcome": "done", "text": "t"})
    stop.set()
    server.close()
    assert failure is not None and "no answer within" in failure
    assert time.monotonic() - started < 5


@pytest.mark.slow
def test_the_url_also_comes_from_a_variable_or_a_file_out_of_sight(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = many_jobs_manifest(tmp_path / "night.yaml", 1)
    monkeypatch.setenv("BATCHER_NOTIFY_URL", receiver.url)
    result = _run(str(manifest), "--sandbox", "-o", "by-variable")
    assert result.exit_code == 0, result.output
    assert len(receiver.posts) == 1 and receiver.posts[0][1]["outcome"] == "done"
    monkeypatch.delenv("BATCHER_NOTIFY_URL")
    kept = tmp_path / "hook.url"
    kept.write_text(f"# the team's ntfy topic\n{receiver.url}\n")
    result = _run(str(manifest), "--sandbox", "-o", "by-file", "--notify-file", str(kept))
    assert result.exit_code == 0, result.output
    assert len(receiver.posts) == 2
    assert "secret-path" not in result.output
    # Refused before the run, and the path of a URL kept out of sight is not printed either.
    for args, env, said in (
        (["--notify", receiver.url, "--notify-file", str(kept)], {}, "give one of them"),
        ([], {"BATCHER_NOTIFY_URL": "http://hooks.example/secret-path-T0K3N"}, "the URL in BATCHER_NOTIFY_URL"),
        (["--notify-file", str(tmp_path / "missing")], {}, "cannot read --notify-file"),
    ):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        refused = CliRunner().invoke(cli, ["run", str(manifest), "--sandbox", "-o", "refused", *args])
        for name in env:
            monkeypatch.delenv(name)
        assert refused.exit_code == 2, refused.output
        assert said in refused.output
        assert "secret-path" not in refused.output.replace(receiver.url, "")
    assert not (tmp_path / "refused").exists() and len(receiver.posts) == 2
    fifo = tmp_path / "hook.fifo"
    os.mkfifo(fifo)  # opened without blocking and refused unread
    refused = CliRunner().invoke(cli, ["run", str(manifest), "--sandbox", "--notify-file", str(fifo)])
    assert refused.exit_code == 2 and "not a regular file" in refused.output
