"""`batcher sandbox` as RunComfy serves it (issue 23, point 7): status lines with their reason phrase, the balance on a
host of its own, `--token` that must match, RunComfy's 404 for what it does not serve; and batcher's runs, from the
command line and embedded, reading the balance where it is."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import pytest
from click.testing import CliRunner

from batcher import BalanceError, RunOptions, SandboxConfig, load_manifest, run_manifest
from batcher.cli.main import cli

from .conftest import many_jobs_manifest

MODEL = "openai/gpt-image-1-5/image-to-image"
FAST = ["--poll-interval", "0.05", "--poll-max", "0.1", "--retries", "2", "-q"]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str, list[str]]]:
    """`batcher sandbox --token T --balance 0.03` in a process of its own: (API URL, balance base, its lines)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "batcher", "sandbox", "--port", "0", "--token", "the-t0ken", "--balance", "0.03"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        lines = [process.stderr.readline() for _ in range(3)]
        api = re.search(r"API at (http://127\.0\.0\.1:\d+)", lines[0])
        balance = re.search(r"own host at (http://127\.0\.0\.1:\d+/prod/v2)", lines[1])
        assert api and balance, lines
        yield api.group(1), balance.group(1), lines
    finally:
        process.terminate()
        process.communicate(timeout=10)


def _status_line(base: str, request: bytes) -> bytes:
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(request)
        return sock.recv(65536).split(b"\r\n", 1)[0]


def test_every_status_line_carries_its_reason_phrase(served: tuple[str, str, list[str]]) -> None:
    api, balance, _ = served
    submit = f"POST /v1/models/{MODEL} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    assert _status_line(api, submit) == b"HTTP/1.1 401 Unauthorized"  # before: b"HTTP/1.1 401 "
    authed = submit.replace(b"Host: x", b"Host: x\r\nAuthorization: Bearer the-t0ken")
    assert _status_line(api, authed) == b"HTTP/1.1 422 Unprocessable Entity"
    assert _status_line(api, b"GET /nowhere HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer the-t0ken\r\n\r\n") == (
        b"HTTP/1.1 404 Not Found"
    )
    get_balance = b"GET /prod/v2/balance HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer the-t0ken\r\n\r\n"
    assert _status_line(balance.removesuffix("/prod/v2"), get_balance) == b"HTTP/1.1 200 OK"


def test_the_balance_has_a_host_of_its_own_and_the_token_must_match_on_both(
    served: tuple[str, str, list[str]],
) -> None:
    api, balance, lines = served
    assert urlsplit(api).port != urlsplit(balance).port
    assert f"RUNCOMFY_BALANCE_BASE={balance}" in lines[2] and "the-t0ken" not in "".join(lines)
    right, wrong = {"Authorization": "Bearer the-t0ken"}, {"Authorization": "Bearer any"}
    assert httpx2.get(balance + "/balance", headers=right).json() == {"balance_usd": 0.03, "currency": "USD"}
    refused = httpx2.get(balance + "/balance", headers=wrong)
    assert refused.status_code == 401 and refused.json()["error_code"] == 401001
    # The Model API's host has no balance: RunComfy's 404 (before: it answered the balance there).
    not_here = httpx2.get(api + "/prod/v2/balance", headers=right)
    assert not_here.status_code == 404 and not_here.json()["error_code"] == 404001
    answer = httpx2.get(f"{api}/v1/requests/sbx-1-000000000000/status", headers=wrong)
    assert answer.status_code == 401 and answer.json()["error_code"] == 401001


def test_a_run_against_batcher_sandbox_reads_the_balance_on_its_host(
    served: tuple[str, str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api, balance, _ = served
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 6)  # 6 x $0.009 = $0.054, over the $0.03
    runner = CliRunner()
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "not-the-token")
    refused = runner.invoke(cli, ["run", *FAST, str(manifest), "--api-base", api, "-o", "out"])
    assert refused.exit_code == 2 and "401001" in refused.output, refused.output

    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "the-t0ken")
    monkeypatch.setenv("RUNCOMFY_BALANCE_BASE", balance)
    over = runner.invoke(cli, ["run", *FAST, str(manifest), "--api-base", api, "-o", "out"])
    assert over.exit_code != 0 and "over the account's balance of $0.03" in over.output, over.output
    stats = httpx2.get(api + "/_sandbox").json()
    assert stats["submits"] == 0 and stats["calls"].get("balance") == 1

    fits = runner.invoke(cli, ["run", *FAST, str(manifest), "--api-base", api, "-o", "out", "--limit", "3"])
    assert fits.exit_code == 0, fits.output
    assert httpx2.get(api + "/_sandbox").json()["submits"] == 3


async def test_the_embedded_rehearsal_reads_its_balance_on_its_own_host_with_no_token(tmp_path: Path) -> None:
    """`run --sandbox` sends no user token, and its engine is given the sandbox's balance host."""
    config = SandboxConfig(queue_delay=0.0, run_delay=0.05, balance_usd=0.03)
    manifest = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 6))
    options = RunOptions(sandbox=True, sandbox_config=config, output_dir=tmp_path / "out", poll_interval=0.02)
    with pytest.raises(BalanceError, match=r"over the account's balance of \$0\.03"):
        await run_manifest(manifest, options)
    assert config.balance_base is None  # only while served
    config.balance_usd = None
    summary = await run_manifest(manifest, options)
    assert (summary.done, summary.exit_code) == (6, 0)


def test_run_sandbox_needs_no_token(tmp_path: Path) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    result = CliRunner().invoke(cli, ["run", *FAST, str(manifest), "--sandbox", "-o", "out"])
    assert result.exit_code == 0, result.output
