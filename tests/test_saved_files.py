"""Where a run's downloads land: the output folder it opened, made once, and a killed run's leftovers removed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from batcher.net.retrying import set_testing
from batcher.output.download import Downloader
from batcher.sandbox.png import make_png

PNG = make_png("saved files")
PUBLIC = "https://93.184.216.34"  # a literal public address: resolves to itself, no DNS needed


@pytest.fixture(autouse=True)
def no_waiting() -> Iterator[None]:
    set_testing(True)
    yield
    set_testing(False)


def _png(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, content=PNG, headers={"content-type": "image/png"})


def _downloader(folder: Path) -> Downloader:
    return Downloader(transport=httpx2.MockTransport(_png), backoff=0.001, attempts=2, folder=folder)


async def test_files_land_in_the_output_folder_the_run_opened_even_once_it_is_renamed(tmp_path: Path) -> None:
    """The journal is written through the descriptor the run opened; its files go through the folder's
    too: renamed mid-run, the folder keeps receiving them, and its old name is not made again (where a
    resume would find images without their journal)."""
    out, moved = tmp_path / "out", tmp_path / "moved"
    async with _downloader(out) as downloader:
        await downloader.fetch(f"{PUBLIC}/0.png", out / "job-1" / "a-0.png")
        out.rename(moved)
        got = await downloader.fetch(f"{PUBLIC}/1.png", out / "job-2" / "b-0.png")
    assert got.bytes == len(PNG)
    assert (moved / "job-1" / "a-0.png").read_bytes() == PNG
    assert (moved / "job-2" / "b-0.png").read_bytes() == PNG
    assert not out.exists()


async def test_a_killed_runs_part_files_are_removed_from_a_job_folder_that_exists(tmp_path: Path) -> None:
    """A folder made by this download holds no leftovers, so only an existing one is looked through."""
    out = tmp_path / "out"
    (out / "job-1").mkdir(parents=True)
    leftover = out / "job-1" / ".a-0.png.dead1234.part"
    leftover.write_bytes(b"half a file")
    async with _downloader(out) as downloader:
        await downloader.fetch(f"{PUBLIC}/0.png", out / "job-1" / "a-0.png")
        await downloader.fetch(f"{PUBLIC}/1.png", out / "job-2" / "b-0.png")
    assert not leftover.exists()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "job-1",
        "job-1/a-0.png",
        "job-2",
        "job-2/b-0.png",
    ]


def test_every_transport_shares_one_tls_context_per_trust_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a TLS context loads the whole CA bundle (~100 ms of CPU); a run's three or four clients share one,
    and a trust store named in the environment (SSL_CERT_FILE) gets its own."""
    import certifi

    from batcher.net.transport import pooled_transport, shared_ssl_context

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    first = shared_ssl_context()
    pooled_transport(4)
    assert shared_ssl_context() is first
    monkeypatch.setenv("SSL_CERT_FILE", certifi.where())
    assert shared_ssl_context() is not first
