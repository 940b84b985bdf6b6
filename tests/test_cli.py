"""The command line: exit codes, messages, and the README's first command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from batcher.cli.main import cli

from .conftest import REF, another_run_holding, many_jobs_manifest, write_manifest


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_help_for_every_command(runner: CliRunner) -> None:
    for command in (
        [],
        ["run"],
        ["validate"],
        ["plan"],
        ["status"],
        ["cancel"],
        ["report"],
        ["init"],
        ["sandbox"],
        ["schemas"],
    ):
        result = runner.invoke(cli, [*command, "-h"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "Usage: " in result.output


def test_validate_lists_every_problem_and_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path / "bad.yaml",
        f"""
        model: openai/gpt-image-1-5/image-to-image
        jobs:
          - prompt: "a"
            image_urls: ["{REF}"]
            quality: ultra
          - prompt: "b"
            image_urls: "not a list"
        """,
    )
    result = runner.invoke(cli, ["validate", str(path)], catch_exceptions=False)
    assert result.exit_code == 2
    assert "2 problems in the manifest" in result.output
    assert f"{path}:5: jobs[0].quality:" in result.output
    assert f"{path}:7: jobs[1].image_urls:" in result.output
    assert "Traceback" not in result.output


def test_validate_and_plan_need_no_token_or_network(runner: CliRunner, tmp_path: Path) -> None:
    path = many_jobs_manifest(tmp_path / "m.yaml", 3, quality="medium")
    result = runner.invoke(cli, ["validate", str(path)], catch_exceptions=False)
    assert result.exit_code == 0 and "3 jobs" in result.output
    result = runner.invoke(cli, ["plan", str(path)], catch_exceptions=False)
    assert result.exit_code == 0
    assert "job-0002" in result.output and "$0.10" in result.output  # 3 x $0.034: medium, any size


def test_run_without_token_exits_2_before_sending(runner: CliRunner, tmp_path: Path) -> None:
    path = many_jobs_manifest(tmp_path / "m.yaml", 1)
    result = runner.invoke(cli, ["run", str(path)], catch_exceptions=False)
    assert result.exit_code == 2
    assert "RUNCOMFY_API_TOKEN" in result.output and "--sandbox" in result.output
    assert not (tmp_path / "output").exists()


def test_bad_flags_and_unsafe_api_base_exit_2(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = many_jobs_manifest(tmp_path / "m.yaml", 1)
    assert runner.invoke(cli, ["run", str(path), "--concurrency", "0"]).exit_code == 2
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "t")
    result = runner.invoke(cli, ["run", str(path), "--api-base", "http://api.example.com"], catch_exceptions=False)
    assert result.exit_code == 2 and "only for loopback" in result.output


def test_sandbox_run_then_status(runner: CliRunner, tmp_path: Path) -> None:
    path = many_jobs_manifest(tmp_path / "demo.yaml", 3)
    result = runner.invoke(cli, ["run", str(path), "--sandbox", "--poll-interval", "0.05"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "3/3 done" in result.output
    # A rehearsal has a folder of its own, so the real run that follows starts clean.
    assert len(list((tmp_path / "output" / "sandbox" / "demo").glob("job-*/*.png"))) == 3

    result = runner.invoke(cli, ["status", str(path), "--sandbox", "--json"], catch_exceptions=False)
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["counts"]["done"] == 3 and report["failed"] == [] and report["spent"] > 0 and report["sandbox"]

    result = runner.invoke(cli, ["status", str(path), "--sandbox"], catch_exceptions=False)
    assert "done" in result.output and "sandbox: would have cost" in result.output


def test_a_locked_output_folder_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    path = many_jobs_manifest(tmp_path / "m.yaml", 1)
    with another_run_holding(tmp_path / "output" / "sandbox" / "m"):
        result = runner.invoke(cli, ["run", str(path), "--sandbox"], catch_exceptions=False)
    assert result.exit_code == 2
    assert "another batcher run" in result.output


def test_a_damaged_journal_is_named(runner: CliRunner, tmp_path: Path) -> None:
    path = many_jobs_manifest(tmp_path / "m.yaml", 2)
    assert runner.invoke(cli, ["run", str(path), "--sandbox", "--poll-interval", "0.05"]).exit_code == 0
    journal = tmp_path / "output" / "sandbox" / "m" / "state.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1][:10] + b"X" + lines[1][11:]
    journal.write_bytes(b"".join(lines))
    result = runner.invoke(cli, ["status", str(path), "--sandbox"], catch_exceptions=False)
    assert result.exit_code == 2
    assert "line 2 is damaged" in result.output


def test_prices_can_be_overridden(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = many_jobs_manifest(tmp_path / "m.yaml", 2, quality="high")
    table = tmp_path / "prices" / "openai" / "gpt-image-1-5" / "image-to-image.pricing.json"
    table.parent.mkdir(parents=True)
    table.write_text(
        json.dumps(
            {
                "model": "openai/gpt-image-1-5/image-to-image",
                "keys": ["quality"],
                "prices": {"high": 1.5},
                "source": "our contract",
                "as_of": "2026-12-01",
            }
        )
    )
    monkeypatch.setenv("BATCHER_PRICES", str(tmp_path / "prices"))
    result = runner.invoke(cli, ["plan", str(path)], catch_exceptions=False)
    assert "$3.00" in result.output and "our contract" in result.output


def test_status_works_while_a_run_holds_the_folder(runner: CliRunner, tmp_path: Path) -> None:
    path = many_jobs_manifest(tmp_path / "m.yaml", 2)
    assert runner.invoke(cli, ["run", str(path), "--sandbox", "--poll-interval", "0.05"]).exit_code == 0
    with another_run_holding(tmp_path / "output" / "sandbox" / "m"):
        result = runner.invoke(cli, ["status", str(path), "--sandbox", "--json"], catch_exceptions=False)
    assert result.exit_code == 0 and json.loads(result.output)["counts"]["done"] == 2


def test_init_writes_a_valid_starter_and_never_overwrites(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["init", "starter.yaml"], catch_exceptions=False)
    assert result.exit_code == 0
    result = runner.invoke(cli, ["validate", "starter.yaml"], catch_exceptions=False)
    assert result.exit_code == 0 and "3 jobs" in result.output
    assert runner.invoke(cli, ["init", "starter.yaml"]).exit_code == 2


def test_init_creates_the_folders_it_needs(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["init", "sub/dir/m.yaml"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert runner.invoke(cli, ["validate", "sub/dir/m.yaml"]).exit_code == 0


async def test_the_library_takes_one_type_per_option(tmp_path: Path) -> None:
    from batcher import RunOptions, UsageError, load_manifest, run_manifest

    manifest = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 1))
    summary = await run_manifest(manifest, RunOptions(sandbox=True, poll_interval=0.02, poll_max=0.05))
    assert summary.done == 1 and summary.sandbox
    with pytest.raises(UsageError, match="sandbox_config"):
        RunOptions(sandbox={"seed": 1})  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["review", "export"])
def test_after_a_rehearsal_a_plain_command_gives_the_whole_command_with_sandbox(tmp_path: Path, command: str) -> None:
    """Rehearsals are never noted in the ledger: the hint looks at the rehearsal's folder itself, and what it
    prints is the command as typed with --sandbox added (it used to say only "run the manifest first"). Run as
    a person runs it, in a process of its own, and the printed command followed."""
    import shlex
    import subprocess
    import sys

    path = many_jobs_manifest(tmp_path / "m.yaml", 2)
    batcher = [sys.executable, "-m", "batcher"]
    done = subprocess.run([*batcher, "run", str(path), "--sandbox", "-y", "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    extra = [str(tmp_path / "dataset")] if command == "export" else []
    plain = subprocess.run([*batcher, command, str(path), *extra], capture_output=True, text=True)
    assert plain.returncode == 2
    hint = next(line for line in plain.stderr.splitlines() if "the sandbox rehearsal's is in" in line)
    printed = shlex.split(hint.rsplit(": ", 1)[1])
    assert printed[-1] == "--sandbox" and f"{command} {path}" in " ".join(printed)
    if command == "export":  # following it does what it says (review would serve until stopped)
        followed = subprocess.run(printed, capture_output=True, text=True)
        assert followed.returncode == 0, followed.stderr
        assert (tmp_path / "dataset").is_dir()
