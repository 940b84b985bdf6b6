"""Output hosts (issue 23, point 6): output files come from RunComfy's hosts (``*.runcomfy.net``,
``*.runcomfy.com``, as RunComfy's CLI allows in ``src/download.rs``) and the API base's origin; another host
only with ``--allow-output-host``. A refused host is a per-job ``download_failed`` naming the host and the flag."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest
from click.testing import CliRunner

from batcher import DownloadError, SandboxThread, read_journal
from batcher.cli.main import cli
from batcher.journal.standing import category
from batcher.journal.store import JOURNAL_NAME
from batcher.net.policy import OutputHosts
from batcher.output.download import Downloader

from .conftest import TOKEN, many_jobs_manifest
from .test_hostile_download import serving_png

StartSandbox = Callable[..., SandboxThread]
FAST = ["--poll-interval", "0.05", "--poll-max", "0.1", "--retries", "3", "-q", "--yes"]


def test_runcomfys_hosts_and_the_api_base_pass_and_lookalikes_do_not() -> None:
    hosts = OutputHosts.of("https://model-api.runcomfy.net", ["cdn.example.com", "*.example.org"])
    for url in (
        "https://playgrounds-storage-public.runcomfy.net/a.png",
        "https://serverless-api-storage.runcomfy.net/x/y.png",
        "https://files.runcomfy.com/a.png",
        "https://runcomfy.net/a.png",
        "https://cdn.example.com/a.png",
        "https://a.b.example.org/a.png",
    ):
        assert hosts.refusal(url) is None, url
    for url in (
        "https://runcomfy.net.evil.com/a.png",
        "https://evilruncomfy.net/a.png",
        "https://evil.example.com/runcomfy.net/a.png",
        "https://cdn.runcomfy.net@evil.example.com/a.png",
        "https://example.org.evil.com/a.png",
        "https://storage.googleapis.com/bucket/a.png",
    ):
        refusal = hosts.refusal(url)
        assert refusal is not None and "--allow-output-host" in refusal, url
    proxy = OutputHosts.of("https://proxy.corp.example:8443/runcomfy")
    assert proxy.refusal("https://proxy.corp.example:8443/files/a.png") is None, "the API base's own origin"
    assert proxy.refusal("https://proxy.corp.example/files/a.png") is not None, "another port is another origin"


@pytest.mark.parametrize("value", ["https://cdn.example.com/x", "127.0.0.1", "user@host", ""])
def test_an_allowed_host_must_be_a_host(value: str) -> None:
    with pytest.raises(ValueError, match="--allow-output-host"):
        OutputHosts.of("https://model-api.runcomfy.net", [value])


def test_outputs_on_another_host_are_refused_per_job_until_allowed(
    tmp_path: Path, start_sandbox: StartSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    runner = CliRunner()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 3)
    with serving_png() as (elsewhere, hits):
        sandbox = start_sandbox(files_origin=elsewhere)  # its answers name files on another loopback port
        run = ["run", *FAST, str(manifest), "--api-base", sandbox.url, "-o", str(tmp_path / "out")]
        result = runner.invoke(cli, run, catch_exceptions=False)
        assert result.exit_code == 1, result.output
        assert hits == [], "nothing fetched from a host that is not allowed"
        host = elsewhere.removeprefix("http://")
        events = [
            line for line in (tmp_path / "out" / JOURNAL_NAME).read_text().splitlines() if '"download_failed"' in line
        ]
        assert len(events) == 3, events
        for line in events:
            assert f"{host} (a loopback address) is not a RunComfy output host" in line
            assert f"--allow-output-host {host}" in line
        assert f"--allow-output-host {host}" in result.output

        result = runner.invoke(cli, [*run, "--allow-output-host", host], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert len(hits) == 3
    posts = Counter(record.body["prompt"] for record in sandbox.sandbox.submits)
    assert sorted(posts.values()) == [1, 1, 1], "each paid job sent once: the second run only downloads"
    records = read_journal(tmp_path / "out" / JOURNAL_NAME).records.values()
    assert [category(record) for record in records] == ["done"] * 3
    assert all(record.submits == 1 for record in records)


async def test_a_public_host_that_is_not_runcomfys_is_refused_before_any_lookup_or_request(tmp_path: Path) -> None:
    sent: list[str] = []

    def record(request: httpx2.Request) -> httpx2.Response:
        sent.append(str(request.url))
        return httpx2.Response(200, content=b"\x89PNG\r\n\x1a\n", headers={"content-type": "image/png"})

    async with Downloader(
        transport=httpx2.MockTransport(record),
        folder=tmp_path,
        output_hosts=OutputHosts.of("https://model-api.runcomfy.net"),
    ) as downloader:
        with pytest.raises(DownloadError, match=r"storage\.example\.com is not a RunComfy output host"):
            await downloader.fetch("https://storage.example.com/out.png", tmp_path / "out.png")
    assert sent == []
