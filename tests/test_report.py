"""The gallery and the dataset: what a person browses and what a script loads."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from batcher import load_manifest, run_manifest
from batcher.cli.main import cli
from batcher.output.dataset import METADATA_NAME
from batcher.sandbox.server import SandboxConfig

from .conftest import fast_options, many_jobs_manifest

JOBS = 6


@pytest.fixture
async def finished_run(tmp_path: Path) -> Path:
    """A sandbox run of six jobs where some fail; returns the manifest's path."""
    path = many_jobs_manifest(tmp_path / "night.yaml", JOBS)
    options = fast_options(
        token=None,
        output_dir=Path("output/night"),
        sandbox=True,
        sandbox_config=SandboxConfig(queue_delay=0.01, run_delay=0.01, fail_rate=0.4, seed=5),
    )
    summary = await run_manifest(load_manifest(path), options)
    assert 0 < summary.done < JOBS, "the fixture wants both done and failed jobs"
    return path


def _report(manifest: Path) -> str:
    result = CliRunner().invoke(cli, ["report", str(manifest)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


async def test_metadata_is_written_at_the_end_of_each_run(finished_run: Path, tmp_path: Path) -> None:
    import json

    rows = [json.loads(line) for line in (tmp_path / "output/night" / METADATA_NAME).read_text().splitlines()]
    assert rows and all((tmp_path / "output/night" / row["file_name"]).is_file() for row in rows)
    assert {"prompt", "image_urls", "parameters", "job_id", "job_key", "request_id"} <= set(rows[0])


async def test_the_gallery_is_self_contained_with_a_card_per_job(finished_run: Path, tmp_path: Path) -> None:
    output = _report(finished_run)
    assert "gallery:" in output and "load_dataset" in output
    page = (tmp_path / "output/night/index.html").read_text()
    assert page.count('<article class="card"') == JOBS
    assert not re.search(r'<(link|script)[^>]+(href|src)="https?:', page), "no CDN: styles and script are inline"
    done = page.count('<article class="card" data-state="done"')
    images = re.findall(r'<img loading="lazy" src="(job-[^"]+)"', page)
    assert len(images) == done > 0
    assert all((tmp_path / "output/night" / src).is_file() for src in images)
    assert "model failed" in page  # the failed jobs' reasons


async def test_the_dataset_loads_with_hugging_face_datasets(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = pytest.importorskip("datasets", reason="installed with the test extras")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    folder = tmp_path / "output/night"
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(tmp_path / "hf"))
    train = loaded["train"]
    images = len(list(folder.glob("job-*/*.png")))
    assert train.num_rows == images > 0
    assert {"image", "prompt", "image_urls", "parameters", "job_id", "request_id"} <= set(train.column_names)
    row = train[0]
    assert row["image"].size == (64, 64)
    assert row["prompt"].startswith("prompt number") and row["parameters"]["quality"] == "low"


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(".ci/run installs Debian's chromium; it is missing")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    return found


def _headless(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.slow
async def test_the_gallery_renders_in_a_real_browser(finished_run: Path, tmp_path: Path) -> None:
    _report(finished_run)
    page = (tmp_path / "output/night/index.html").as_uri()
    dom = _headless(tmp_path, "--dump-dom", page).stdout
    assert dom.count('class="card"') == JOBS
    # The filter, run by the page's own script: #failed hides every card but the failed ones.
    filtered = _headless(tmp_path, "--dump-dom", page + "#failed").stdout
    failed = dom.count('class="card" data-state="failed"')
    assert failed > 0
    assert filtered.count('class="card hidden"') == JOBS - failed
    shot = tmp_path / "gallery.png"
    _headless(tmp_path, f"--screenshot={shot}", "--window-size=390,844", page)  # a phone's viewport
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000


async def test_the_gallery_keeps_no_list_of_the_jobs(finished_run: Path, tmp_path: Path) -> None:
    # 100,000 jobs held as one list (manifest.jobs), each job's files checked three times and the page built
    # as one string and then its bytes: 261 MB and 7 s. The page is the same; no list of jobs is kept.
    from batcher import read_journal
    from batcher.journal.store import JOURNAL_NAME
    from batcher.reports.gallery import write_gallery

    folder = tmp_path / "output/night"
    _report(finished_run)
    before = (folder / "index.html").read_bytes()
    manifest = load_manifest(finished_run)
    path = write_gallery(manifest, folder, read_journal(folder / JOURNAL_NAME))
    assert "jobs" not in manifest.__dict__, "the gallery built the list of every job"
    assert path.read_bytes() == before


async def test_a_trial_of_one_job_shows_it_and_the_first_pending_jobs_only(tmp_path: Path) -> None:
    # A `run --limit 1` of 100,000 jobs wrote a card for each (a 70 MB page, half the run's time and memory):
    # the page shows every job a run touched and the first PENDING_SHOWN it has not, and counts them all.
    from batcher.reports.gallery import PENDING_SHOWN

    jobs = PENDING_SHOWN + 250
    rows = "".join(f"row-{i},prompt number {i}\n" for i in range(jobs))
    (tmp_path / "prompts.csv").write_text("id,prompt\n" + rows)
    path = tmp_path / "trial.yaml"
    path.write_text(
        "model: openai/gpt-image-1-5/image-to-image\ndefaults:\n  quality: low\n"
        "jobs:\n  - from: prompts.csv\n    image_urls: ['https://example.org/ref.jpg']\n"
    )
    options = fast_options(
        token=None,
        output_dir=tmp_path / "out",
        sandbox=True,
        sandbox_config=SandboxConfig(queue_delay=0.01, run_delay=0.01),
        limit=1,
    )
    summary = await run_manifest(load_manifest(path), options)
    assert summary.done == 1
    page = (tmp_path / "out/index.html").read_text()
    assert page.count('<article class="card" data-state="done"') == 1
    assert page.count('<article class="card" data-state="pending"') == PENDING_SHOWN
    assert f"all {jobs}</button>" in page and f"pending {jobs - 1}</button>" in page
    assert "and 249 more jobs not started yet" in page
    assert 'id="' in page and "row-0<" in page and f"row-{PENDING_SHOWN}<" in page
    assert f"row-{PENDING_SHOWN + 1}<" not in page
