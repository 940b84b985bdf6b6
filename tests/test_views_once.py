"""status and plan read the jobs the load expanded: a prompt file is not read again for them (issue 27.3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from batcher.manifest.loader import load_manifest
from batcher.reports.report import PLAN_ROWS_SHOWN, print_plan, status_report

from .conftest import REF, write_manifest

MODEL = "openai/gpt-image-1-5/image-to-image"
ROWS = PLAN_ROWS_SHOWN + 50


def _prompt_manifest(folder: Path) -> Path:
    rows = [f"row-{i:04d},prompt number {i},{('low', 'medium', 'high')[i % 3]}" for i in range(ROWS)]
    (folder / "prompts.csv").write_text("id,prompt,quality\n" + "\n".join(rows) + "\n")
    return write_manifest(
        folder / "m.yaml", f"model: {MODEL}\njobs:\n  - from: prompts.csv\n    image_urls: ['{REF}']\n"
    )


def _plan(manifest_path: Path, out: Path) -> str:
    manifest = load_manifest(manifest_path)
    console = Console(record=True, width=200)
    print_plan(console, manifest, out)
    return console.export_text()


def test_status_and_plan_do_not_expand_the_manifest_again(tmp_path: Path) -> None:
    path = _prompt_manifest(tmp_path)
    out = tmp_path / "out"
    manifest = load_manifest(path)
    whole = status_report(manifest, out)
    assert whole.total == ROWS and whole.counts["pending"] == ROWS
    expected = round(sum((0.009, 0.034, 0.133)[i % 3] for i in range(ROWS)), 6)
    assert whole.to_spend == pytest.approx(expected)
    assert status_report(load_manifest(path, views=False), out).to_json() == whole.to_json()  # no table: expanded
    plan = Console(record=True, width=200)
    print_plan(plan, manifest, out)
    planned = plan.export_text()
    assert f"${expected:,.2f}" in planned and "row-0000" in planned

    # The prompt file loses its rows after the load: the views count and price what was loaded (an
    # expansion again would see 3 jobs), and only the plan's shown rows are expanded again.
    lines = (tmp_path / "prompts.csv").read_text().splitlines()
    (tmp_path / "prompts.csv").write_text("\n".join(lines[:4]) + "\n")
    again = status_report(manifest, out)
    assert again.to_json() == whole.to_json()
    assert again.counts["pending"] == ROWS and len(again.unfinished) == ROWS
    assert [s.name for s in again.unfinished[:2]] == ["row-0000", "row-0001"]
    console = Console(record=True, width=200)
    print_plan(console, manifest, out)
    cut = console.export_text()
    assert f"${expected:,.2f}" in cut and f"{ROWS} jobs" in cut


def test_a_price_table_reading_another_field_prices_from_the_whole_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _prompt_manifest(tmp_path)
    manifest = load_manifest(path)  # its table keeps quality, the field the bundled prices read
    prices = tmp_path / "prices"
    table = prices / f"{MODEL}.pricing.json"
    table.parent.mkdir(parents=True)
    # A table (BATCHER_PRICES) that prices by the prompt too: the table the load kept does not cover it.
    by_prompt = {"prompt number 0": {"low": 5.0}, "prompt number 1": {"medium": 7.0}}
    table.write_text(json.dumps({"model": MODEL, "keys": ["prompt", "quality"], "prices": by_prompt}))
    monkeypatch.setenv("BATCHER_PRICES", str(prices))
    report = status_report(manifest, tmp_path / "out")
    assert report.to_spend == pytest.approx(12.0)
    assert report.unpriced == ROWS - 2


def test_the_dataset_views_expand_no_further_than_the_last_completed_job(tmp_path: Path) -> None:
    from batcher.output.dataset import dataset_rows, write_metadata

    path = _prompt_manifest(tmp_path)
    manifest = load_manifest(path)
    (tmp_path / "prompts.csv").unlink()  # no job is completed: the prompt file is not read again
    out = tmp_path / "out"
    out.mkdir()
    assert write_metadata(manifest, out, {}) == 0
    assert list(dataset_rows(manifest, {})) == []
    assert (out / "metadata.jsonl").read_bytes() == b""


async def test_a_run_plans_from_the_load_and_checks_the_jobs_it_sends(tmp_path: Path) -> None:
    # A run's plan read its jobs by expanding the manifest again (a resume of 100,000 jobs waited for it before
    # its first submit): it reads the load's table. The jobs sent are still read again and checked, so a
    # prompt file cut after the load sends the jobs it still holds as loaded and stops at the first it does not.
    from batcher import run_manifest
    from batcher.errors import ManifestChangedError
    from batcher.journal.store import JOURNAL_NAME

    from .conftest import fast_options

    path = _prompt_manifest(tmp_path)
    manifest = load_manifest(path)
    lines = (tmp_path / "prompts.csv").read_text().splitlines()
    (tmp_path / "prompts.csv").write_text("\n".join(lines[:11]) + "\n")  # the header and 10 rows
    options = fast_options(token=None, output_dir=tmp_path / "out", sandbox=True, concurrency=2)
    with pytest.raises(ManifestChangedError, match="changed while the run was reading them again"):
        await run_manifest(manifest, options)
    submitted = [
        json.loads(line) for line in (tmp_path / "out" / JOURNAL_NAME).read_text().splitlines() if '"submitted"' in line
    ]
    assert len(submitted) == 10
