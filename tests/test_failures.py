"""Failures by reason: each failure's class from RunComfy's answer, and --retry-failed that pays only for retries
that can work."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner

from batcher import SandboxThread, UsageError, load_manifest, read_journal, run_manifest
from batcher.cli.main import cli
from batcher.engine.runner import RunPlan
from batcher.journal.failures import RETRYABLE, classify, failure_of, parse_retry_classes
from batcher.journal.records import JobRecord
from batcher.journal.store import JOURNAL_NAME
from batcher.lifecycle import FAILURE_CLASSES

from .conftest import REF, TOKEN, fast_options, write_manifest

StartSandbox = Callable[..., SandboxThread]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        # gpt-image's moderation, as OpenAI words it, and as the sandbox sends it (an object, as JSON).
        (
            '{"message": "Your request was rejected by the safety system.", "code": "moderation_blocked"}',
            "content_policy",
        ),
        ("content_policy_violation: the prompt was flagged", "content_policy"),
        ("NSFW content detected in the output", "content_policy"),
        ("Invalid image: could not decode the input", "invalid_input"),
        ("failed to download the input image (HTTP 404)", "invalid_input"),
        ("The job timed out after 600 seconds", "timeout"),
        ('{"message": "sandbox: the model failed on this input", "code": "generation_failed"}', "model_error"),
        ("CUDA out of memory", "model_error"),
        ("Internal server error", "model_error"),
        ("something odd happened", "unknown"),
        ("", "unknown"),
        (None, "unknown"),
    ],
)
def test_failures_are_classified_from_runcomfys_words(error: str | None, expected: str) -> None:
    assert classify(error) == expected


def test_the_retryable_classes_and_the_flags_values() -> None:
    assert {"model_error", "timeout", "cancelled", "unknown"} == RETRYABLE
    assert parse_retry_classes("retryable") == RETRYABLE
    assert parse_retry_classes("all") == set(FAILURE_CLASSES) - {"download"}  # a paid job: fetched again, not sent
    assert parse_retry_classes("content-policy, model_error") == {"content_policy", "model_error"}
    for bad in ("weather", "content_policy,weather", ",", ""):
        with pytest.raises(UsageError, match="not a failure class"):
            parse_retry_classes(bad)


def test_a_journal_from_before_classes_is_classified_from_its_words() -> None:
    old = JobRecord("k", phase="failed", error="Request blocked by content moderation")
    assert failure_of(old) == "content_policy"
    assert failure_of(JobRecord("k", phase="failed", error="x", failure="timeout")) == "timeout"
    assert failure_of(JobRecord("k", phase="cancelled")) == "cancelled"
    assert failure_of(JobRecord("k", phase="completed")) is None
    unfetched = JobRecord("k", phase="completed", outputs=["https://cdn.test/a.png"], error="HTTP 500")
    assert failure_of(unfetched) == "download"


def _manifest(tmp_path: Path) -> Path:
    return write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: openai/gpt-image-1-5/image-to-image
        defaults: {{quality: high}}
        jobs:
          - id: fine
            prompt: "a colossal man in a London street"
            image_urls: ["{REF}"]
          - id: blocked
            prompt: "a FORBIDDEN scene"
            image_urls: ["{REF}"]
        """,
    )


def _events(tmp_path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (tmp_path / "out" / JOURNAL_NAME).read_text().splitlines()]


@pytest.mark.anyio
async def test_a_content_policy_failure_is_journalled_with_its_class_and_words(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox(blocked_words=("forbidden",))
    manifest = _manifest(tmp_path)
    summary = await run_manifest(load_manifest(manifest), fast_options(api_base=sandbox.url, output_dir=Path("out")))
    assert summary.done == 1 and [j.name for j in summary.failed] == ["blocked"]
    assert summary.failures == {"content_policy": 1} and summary.failures_cost == {"content_policy": 0.133}
    failed = [e for e in _events(tmp_path) if e["e"] == "failed"]
    assert failed[0]["failure"] == "content_policy" and "safety system" in str(failed[0]["reason"])


def test_a_plain_retry_failed_does_not_pay_again_for_a_content_policy_block(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox(blocked_words=("forbidden",), fail_rate=0.0)
    manifest = _manifest(tmp_path)
    runner = CliRunner()
    base = ["run", str(manifest), "--api-base", sandbox.url, "-o", "out", "--poll-interval", "0.05"]
    env = {"RUNCOMFY_API_TOKEN": TOKEN}
    first = runner.invoke(cli, base, env=env)
    assert first.exit_code == 1, first.output
    assert "by reason: 1 content policy (not retried" in first.output

    status = runner.invoke(cli, ["status", str(manifest), "-o", "out"])
    assert "1 content policy (not retried, about $0.13)" in status.output
    assert "blocked: [content_policy] " in status.output
    assert json.loads(runner.invoke(cli, ["status", str(manifest), "-o", "out", "--json"]).output)["failures"] == {
        "content_policy": 1
    }

    again = runner.invoke(cli, [*base, "--retry-failed"], env=env)
    assert again.exit_code == 1, again.output
    assert "--retry-failed skips 1 failed job another try would not fix (1 content policy): $0.13 not spent" in (
        again.output
    )
    assert Counter(r.body["prompt"] for r in sandbox.sandbox.submits)["a FORBIDDEN scene"] == 1

    chosen = runner.invoke(cli, [*base, "--retry-failed=content_policy"], env=env)
    assert chosen.exit_code == 1, chosen.output
    assert Counter(r.body["prompt"] for r in sandbox.sandbox.submits)["a FORBIDDEN scene"] == 2


@pytest.mark.anyio
async def test_retry_failed_sends_model_errors_again_and_says_what_it_skips(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox(blocked_words=("forbidden",), fail_rate=1.0)
    manifest = _manifest(tmp_path)
    first = await run_manifest(load_manifest(manifest), fast_options(api_base=sandbox.url, output_dir=Path("out")))
    assert first.failures == {"content_policy": 1, "model_error": 1}
    sandbox.sandbox.config.fail_rate = 0.0
    plans: list[RunPlan] = []
    options = fast_options(api_base=sandbox.url, output_dir=Path("out"), retry_failed=True)
    second = await run_manifest(load_manifest(manifest), options, on_plan=plans.append)
    assert plans[0].to_submit == 1 and plans[0].retry_skipped == {"content_policy": 1}
    assert plans[0].retry_skipped_cost == pytest.approx(0.133)
    assert second.done == 1 and [j.name for j in second.failed] == ["blocked"]
    records = read_journal(tmp_path / "out" / JOURNAL_NAME).records.values()
    assert sorted(r.submits for r in records) == [1, 2]


def test_a_bad_retry_failed_class_exits_2_with_the_classes(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    result = CliRunner().invoke(cli, ["run", str(manifest), "--sandbox", "--retry-failed=weather"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'weather' is not a failure class" in result.output and "content_policy" in result.output


def test_the_gallery_filters_failures_by_reason(tmp_path: Path, start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(blocked_words=("forbidden",))
    manifest = _manifest(tmp_path)
    runner = CliRunner()
    ran = runner.invoke(
        cli, ["run", str(manifest), "--api-base", sandbox.url, "-o", "out"], env={"RUNCOMFY_API_TOKEN": TOKEN}
    )
    assert ran.exit_code == 1, ran.output
    assert runner.invoke(cli, ["report", str(manifest), "-o", "out"]).exit_code == 0
    page = (tmp_path / "out" / "index.html").read_text()
    assert '<button data-state="failure-content_policy" aria-pressed="false">failed: content policy 1</button>' in page
    assert page.count('data-failure="content_policy"') == 1 and "[content policy] " in page


def test_a_download_failure_has_its_class_and_is_fetched_again_never_paid_again(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox(fault_rate=1.0, faults=("500",), fault_paths=("file",))  # no file can be fetched
    manifest = _manifest(tmp_path)
    first = anyio.run(run_manifest, load_manifest(manifest), fast_options(api_base=sandbox.url, output_dir=Path("out")))
    assert first.failures == {"download": 2} and sorted(j.name for j in first.failed) == ["blocked", "fine"]
    assert all(j.failure == "download" for j in first.failed)

    runner = CliRunner()
    status = json.loads(runner.invoke(cli, ["status", str(manifest), "-o", "out", "--json"]).output)
    assert status["failures"] == {"download": 2}
    shown = " ".join(runner.invoke(cli, ["status", str(manifest), "-o", "out"]).output.split())
    assert "2 failed (RunComfy finished them, but their files could not be fetched: the next run" in shown
    assert "by reason: 2 download (paid: fetched again by the next run, never submitted again)" in shown
    assert "fine: [download] " in shown
    assert runner.invoke(cli, ["report", str(manifest), "-o", "out"]).exit_code == 0
    page = (tmp_path / "out" / "index.html").read_text()
    assert '<button data-state="failure-download" aria-pressed="false">failed: download 2</button>' in page

    # Naming the class asks for what --retry-failed never does with a paid job: said, nothing sent.
    named = runner.invoke(cli, ["run", str(manifest), "--sandbox", "-o", "out", "--retry-failed=download"])
    assert named.exit_code == 2 and "Traceback" not in named.output
    assert "fetched again by every run" in named.output

    sandbox.sandbox.config.fault_rate = 0.0
    everything = parse_retry_classes("all")
    options = fast_options(api_base=sandbox.url, output_dir=Path("out"), retry_failed=True, retry_classes=everything)
    again = anyio.run(run_manifest, load_manifest(manifest), options)
    assert again.done == 2 and again.failures == {}
    assert len(sandbox.sandbox.submits) == 2, "a paid job is fetched again, never submitted again"
