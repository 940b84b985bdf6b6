"""Manifests at scale from the command line: shards, pre-flight URL checks, user schemas."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from batcher import SandboxThread
from batcher.cli.main import cli

from .conftest import REF, many_jobs_manifest, user_schema_folder, write_manifest

FAST = ["--sandbox", "--poll-interval", "0.05", "-q"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.slow
def test_shards_run_apart_and_status_sums_them(runner: CliRunner, tmp_path: Path) -> None:
    path = many_jobs_manifest(tmp_path / "m.yaml", 12)
    for part in (1, 2, 3):
        result = runner.invoke(cli, ["run", str(path), "--shard", f"{part}/3", *FAST], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    folders = sorted(p.name for p in (tmp_path / "output" / "sandbox" / "m").iterdir())
    assert folders == ["shard-1-of-3", "shard-2-of-3", "shard-3-of-3"]
    per_shard = [
        (tmp_path / "output" / "sandbox" / "m" / name / "state.jsonl").read_text().count('"downloaded"')
        for name in folders
    ]
    assert sum(per_shard) == 12 and all(per_shard)  # every job once, in exactly one shard

    result = runner.invoke(cli, ["status", str(path), "--sandbox", "--json"], catch_exceptions=False)
    report = json.loads(result.output)
    assert report["counts"]["done"] == 12 and report["total"] == 12
    assert len(report["journals"]) == 3  # the three shards' (the folder itself has none)

    one = runner.invoke(cli, ["plan", str(path), "--shard", "2/3", "--sandbox"], catch_exceptions=False)
    assert f"{per_shard[1]} jobs" in one.output and "sandbox: would cost about $0.00" in one.output


@pytest.mark.slow
def test_shard_layouts_that_would_pay_twice_are_refused(runner: CliRunner, tmp_path: Path) -> None:
    path = many_jobs_manifest(tmp_path / "m.yaml", 6)
    assert runner.invoke(cli, ["run", str(path), "--shard", "1/2", *FAST]).exit_code == 0
    for again in (["--shard", "1/3"], []):
        result = runner.invoke(cli, ["run", str(path), *again, *FAST], catch_exceptions=False)
        assert result.exit_code == 2, result.output
        assert "would pay twice" in result.output and "shard-1-of-2" in result.output
    # the same sharding resumes, and the other half is free to run
    assert runner.invoke(cli, ["run", str(path), "--shard", "1/2", *FAST]).exit_code == 0
    assert runner.invoke(cli, ["run", str(path), "--shard", "2/2", *FAST]).exit_code == 0


@pytest.mark.parametrize("spec", ["0/3", "4/3", "x", "1/0", "2"])
def test_bad_shard_spec(runner: CliRunner, tmp_path: Path, spec: str) -> None:
    path = many_jobs_manifest(tmp_path / "m.yaml", 2)
    result = runner.invoke(cli, ["run", str(path), "--shard", spec, "--sandbox"], catch_exceptions=False)
    assert result.exit_code == 2
    assert "K/N with 1 <= K <= N" in result.output


def test_check_urls_reports_each_bad_url_with_its_lines(
    runner: CliRunner, tmp_path: Path, start_sandbox: Callable[..., SandboxThread]
) -> None:
    base = start_sandbox().url
    good, nohead = f"{base}/inputs/ref.png", f"{base}/inputs/nohead-ref.png"
    huge, page, gone = f"{base}/inputs/huge-ref.png", f"{base}/inputs/login.html", f"{base}/inputs/gone.jpg"
    (tmp_path / "rows.csv").write_text(f"prompt,image_urls\nrow one,{good}\nrow two,{gone}\n", encoding="utf-8")
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: openai/gpt-image-1-5/image-to-image
        jobs:
          - prompt: "a"
            image_urls: ["{good}", "{nohead}"]
          - prompt: "b"
            image_urls: ["{huge}"]
          - prompt: "c"
            image_urls: ["{page}", "{good}"]
          - prompt: "d"
            image_urls: ["http://10.1.2.3/x.png"]
          - from: rows.csv
        """,
    )
    result = runner.invoke(cli, ["validate", str(path), "--check-urls"], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    out = result.output
    assert "checking 6 distinct input URL(s)" in out
    assert f"{huge}: is 62.9 MB; RunComfy takes at most 50 MB" in out
    assert f"{page}: serves text/html, not an image" in out
    assert f"{gone}: answers HTTP 404" in out
    assert f"used by 1 job(s) at {tmp_path / 'rows.csv'}:3" in out
    assert f"used by 1 job(s) at {path}:7" in out  # the huge one, on the manifest line of its job
    assert "plain http is allowed only for loopback" in out
    assert f"{good}:" not in out and f"{nohead}:" not in out  # fine, HEAD refused or not
    assert "4 of 6 input URL(s) cannot be used" in out


def test_check_urls_passes_a_good_manifest(
    runner: CliRunner, tmp_path: Path, start_sandbox: Callable[..., SandboxThread]
) -> None:
    base = start_sandbox().url
    path = many_jobs_manifest(tmp_path / "m.yaml", 30)
    path.write_text(path.read_text().replace(REF, f"{base}/inputs/ref.png"), encoding="utf-8")
    result = runner.invoke(cli, ["validate", str(path), "--check-urls"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "all 1 input URL(s) serve images" in result.output


def test_schemas_command_and_a_user_model_run(runner: CliRunner, tmp_path: Path) -> None:
    folder = user_schema_folder(tmp_path)
    listing = runner.invoke(cli, ["schemas", "--schemas", str(folder)], catch_exceptions=False)
    assert "acme/pixel-art/text-to-image" in listing.output and "openai/gpt-image-1-5/image-to-image" in listing.output
    shown = runner.invoke(cli, ["schemas", "openai/gpt-image-1-5/image-to-image"], catch_exceptions=False)
    assert "low | medium |" in shown.output and "image_urls" in shown.output
    unknown = runner.invoke(cli, ["schemas", "acme/nope"], catch_exceptions=False)
    assert unknown.exit_code == 2 and "known models" in unknown.output

    path = write_manifest(
        tmp_path / "pixels.yaml",
        """
        model: acme/pixel-art/text-to-image
        jobs:
          - prompt: "a knight"
            matrix:
              palette: [gameboy, nes]
        """,
    )
    result = runner.invoke(cli, ["run", str(path), "--schemas", str(folder), *FAST], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "output" / "sandbox" / "pixels").glob("*/*.png"))) == 2
    plan = runner.invoke(cli, ["plan", str(path), "--schemas", str(folder), "--sandbox"], catch_exceptions=False)
    assert "2 jobs have no price table" not in plan.output  # both done: nothing left to price
