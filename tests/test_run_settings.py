"""A manifest's run: block: settings kept in git, validated like the rest, shown by plan, under every flag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from batcher.cli.main import cli
from batcher.journal.store import JOURNAL_NAME

from .conftest import REF, write_manifest

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--poll-interval", "0.05", "--poll-max", "0.1", "-q"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _manifest(path: Path, run_block: str, jobs: int = 4) -> Path:
    lines = ["model: openai/gpt-image-1-5/image-to-image", "defaults:", "  quality: low", run_block, "jobs:"]
    for i in range(jobs):
        lines += [f"  - id: job-{i}", f'    prompt: "prompt {i}"', f"    image_urls: ['{REF}']"]
    return write_manifest(path, "\n".join(lines) + "\n")


def _header(folder: Path) -> dict[str, Any]:
    events = [json.loads(line) for line in (folder / JOURNAL_NAME).read_text().splitlines() if line.strip()]
    return [e for e in events if e.get("e") == "run"][-1]


def _flat(result: Result) -> str:
    return " ".join(result.output.split())


def test_the_run_block_sets_the_run_and_the_journal_records_it(runner: CliRunner, tmp_path: Path) -> None:
    block = "run:\n  concurrency: 3\n  max_cost: 0.02\n  retries: 2"
    manifest = _manifest(tmp_path / "m.yaml", block)
    plan = _flat(runner.invoke(cli, ["plan", str(manifest)], catch_exceptions=False))
    assert f"run setting concurrency: 3 (from {manifest}:5;" in plan, plan
    assert f"run setting max_cost: 0.02 (from {manifest}:6;" in plan

    result = runner.invoke(cli, ["run", *FAST, str(manifest), "--sandbox"], catch_exceptions=False)
    said = _flat(result)
    assert "settings from the manifest's run: block: concurrency 3, max_cost 0.02, retries 2" in said, said
    assert "stopped submitting" in said and "--max-cost $0.02 reached" in said  # 2 of 4 low jobs at $0.009
    header = _header(tmp_path / "output" / "sandbox" / "m")
    assert header["settings"]["concurrency"] == 3 and header["settings"]["max_cost"] == 0.02
    assert header["settings"]["retries"] == 2
    assert sorted(header["settings"]["from_manifest"]) == ["concurrency", "max_cost", "retries"]
    assert " -c 3" not in said  # the resume command leaves the manifest's settings to the manifest


def test_flags_win_and_a_manifest_cannot_raise_max_cost_over_the_flag(runner: CliRunner, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "m.yaml", "run:\n  max_cost: 100\n  concurrency: 2")
    result = runner.invoke(
        cli, ["run", *FAST, str(manifest), "--sandbox", "--max-cost", "0.01"], catch_exceptions=False
    )
    said = _flat(result)
    assert "flags win over max_cost" in said, said
    assert "--max-cost $0.01 reached" in said
    header = _header(tmp_path / "output" / "sandbox" / "m")
    assert header["settings"]["max_cost"] == 0.01 and header["settings"]["from_manifest"] == ["concurrency"]


def test_a_manifest_raising_the_question_s_threshold_says_so(runner: CliRunner, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "m.yaml", "run:\n  confirm_above: 500", jobs=1)
    result = runner.invoke(cli, ["run", *FAST, str(manifest), "--sandbox"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"note: the manifest ({manifest}:5) raises confirm_above to $500.00" in _flat(result)


def test_the_run_block_is_validated_like_the_rest(runner: CliRunner, tmp_path: Path) -> None:
    block = "run:\n  concurency: 4\n  resubmit_uncertain: true\n  max_cost: -1\n  rate: fast\n  new_output: true"
    manifest = _manifest(tmp_path / "m.yaml", block)
    for command in (["validate"], ["plan"], ["run", "--sandbox"]):
        result = runner.invoke(cli, [*command, str(manifest)], catch_exceptions=False)
        said = _flat(result)
        assert result.exit_code == 2, said
        assert "5 problems in the manifest" in said, said
        assert f"{manifest}:5: run.concurency: unknown run setting (did you mean 'concurrency'?)" in said
        assert f"{manifest}:6: run.resubmit_uncertain: --resubmit-uncertain is a command-line flag only" in said
        assert f"{manifest}:7: run.max_cost: expected at least 0, got -1" in said
        assert f"{manifest}:8: run.rate: expected a number, got 'fast'" in said
        assert f"{manifest}:9: run.new_output: --new-output is a command-line flag only" in said
        assert not (tmp_path / "output").exists()
    bad = write_manifest(tmp_path / "b.yaml", f"run: [4]\njobs:\n  - prompt: a\n    image_urls: ['{REF}']\n")
    result = runner.invoke(cli, ["validate", str(bad)], catch_exceptions=False)
    assert result.exit_code == 2 and f"{bad}:1: run: expected a mapping of run settings" in _flat(result)


def _run_block_schema() -> dict[str, Any]:
    """The editor schema of a run: block as the flags it stands for declare it."""
    from batcher.engine.options import FLAGS_ONLY, RUN_SETTINGS

    properties: dict[str, Any] = {}
    for name, (flag, default) in RUN_SETTINGS.items():
        kind = flag.kind or type(default)
        json_type = {bool: "boolean", int: "integer", float: "number", str: "string"}[kind]
        entry: dict[str, Any] = {"type": [json_type, "null"] if default is None else json_type}
        if flag.minimum is not None:
            entry["minimum"] = flag.minimum
        if flag.maximum is not None:
            entry["maximum"] = flag.maximum
        if default is not None:
            entry["default"] = default
        entry["description"] = f"{flag.names[-1]}: {flag.help} A flag given to batcher run wins."
        properties[name] = entry
    return {
        "type": "object",
        "description": "Settings of batcher run, each named as its flag (max_cost for --max-cost); a flag given on "
        "the command line wins. "
        + ", ".join("--" + k.replace("_", "-") for k in FLAGS_ONLY)
        + " stay command-line flags only.",
        "additionalProperties": False,
        "properties": properties,
    }


def test_the_editor_schema_covers_the_run_block_as_the_flags_declare_it() -> None:
    import jsonschema

    schema = json.loads((ROOT / "schemas" / "manifest.schema.json").read_text())
    assert schema["properties"]["run"] == _run_block_schema()  # regenerate the schema's "run" from this on a change
    good = {"jobs": [{"prompt": "x", "image_urls": [REF]}], "run": {"concurrency": 4, "max_cost": 20, "rate": None}}
    jsonschema.validate(good, schema)
    for bad in ({"concurency": 4}, {"resubmit_uncertain": True}, {"max_cost": -1}, {"concurrency": "4"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**good, "run": bad}, schema)
