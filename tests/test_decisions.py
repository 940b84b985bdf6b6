"""Review decisions: stored by the journal's crash rules, and rejected images replaced exactly once."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner

from batcher import JournalCorruptError, JournalError, load_manifest, run_manifest
from batcher.cli.main import cli
from batcher.journal.records import JobRecord
from batcher.reports.report import status_report
from batcher.review.decisions import DECISIONS_NAME, DecisionLog, fold_decisions, read_decisions
from batcher.review.replacements import REPLACEMENT_BASE, pending_replacements, with_replacements
from batcher.sandbox.server import SandboxConfig

from .conftest import fast_options
from .reviewkit import decide, finished_run, records_of

SHA = "a" * 64


def test_decisions_fold_the_latest_per_image_and_the_first_rejections_in_order(tmp_path: Path) -> None:
    with DecisionLog(tmp_path) as log:
        log.append("k1", 0, SHA, "rejected", "g")
        log.append("k2", 0, SHA, "accepted", "g")
        log.append("k1", 0, SHA, "accepted", "g")  # taken back
        log.append("k3", 1, SHA, "rejected", "h")
        log.append("k1", 0, SHA, "rejected", "g")  # again: keeps its first place
    found = read_decisions(tmp_path)
    assert found.of("k1", 0, SHA) == "rejected" and found.of("k2", 0, SHA) == "accepted"
    assert found.of("k3", 1, SHA) == "rejected" and found.of("k4", 0, SHA) == "undecided"
    assert list(found.first_rejections) == [("k1", 0), ("k3", 1)]
    assert found.of("k1", 0, "b" * 64) == "undecided", "a decision is about the bytes it was made on"
    assert (tmp_path / DECISIONS_NAME).stat().st_mode & 0o777 == 0o600


def test_a_torn_last_line_is_dropped_and_mended_before_the_next_append(tmp_path: Path) -> None:
    with DecisionLog(tmp_path) as log:
        log.append("k1", 0, SHA, "rejected", "g")
        log.append("k2", 0, SHA, "accepted", "g")
    path = tmp_path / DECISIONS_NAME
    whole = path.read_bytes()
    path.write_bytes(whole[:-25])  # a crash in the middle of the last write
    found = read_decisions(tmp_path)
    assert found.of("k1", 0, SHA) == "rejected" and found.of("k2", 0, SHA) == "undecided"
    assert found.warnings and "torn" in found.warnings[0]
    with DecisionLog(tmp_path) as log:
        log.append("k3", 0, SHA, "accepted", "g")
    found = read_decisions(tmp_path)
    assert found.warnings == [] and found.lines == 2
    assert found.of("k3", 0, SHA) == "accepted"
    # A sound last line that lost only its newline keeps its decision.
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    with DecisionLog(tmp_path) as log:
        log.append("k4", 0, SHA, "rejected", "g")
    assert read_decisions(tmp_path).lines == 3


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\0\0\n", b"\n\n"])
def test_a_damaged_last_line_ending_in_a_newline_is_cut_back_before_the_next_append(
    tmp_path: Path, ending: bytes
) -> None:
    """Found by the audit (issue 24, finding 7): a damaged last line that ends in a newline was "dropped", then
    the next decision went after it and the file became a JournalCorruptError that stopped `review` and
    `run --replace-rejected`. It is cut back to the last sound line, whatever the last byte, as the journal is."""
    path, out = finished_run(tmp_path, 3)
    manifest = load_manifest(path)
    decide(manifest, out, {"job-0000": "rejected", "job-0001": "accepted"})
    decisions = out / DECISIONS_NAME
    lines = decisions.read_bytes().split(b"\n")
    damaged = lines[1].replace(b"accepted", b"rejected")  # the CRC no longer matches
    decisions.write_bytes(lines[0] + b"\n" + damaged + ending)
    assert "torn" in read_decisions(out).warnings[0]
    decide(manifest, out, {"job-0002": "rejected"})  # the review page's next click
    found = read_decisions(out)
    assert found.warnings == [] and found.lines == 2
    assert [key for key, _ in found.first_rejections] == [r.key for r in _by_name(out, "job-0000", "job-0002")]
    replacing = CliRunner().invoke(cli, ["run", str(path), "-o", str(out), "--sandbox", "--replace-rejected", "-q"])
    assert replacing.exit_code == 0, replacing.output
    assert "is damaged" not in replacing.output and "5/5 done" in replacing.output, replacing.output


def _by_name(out: Path, *names: str) -> list[JobRecord]:
    records = {r.name: r for r in records_of(out).values()}
    return [records[name] for name in names]


def test_a_damaged_line_before_the_last_is_an_error_naming_it(tmp_path: Path) -> None:
    with DecisionLog(tmp_path) as log:
        for key in ("k1", "k2", "k3"):
            log.append(key, 0, SHA, "accepted", "g")
    path = tmp_path / DECISIONS_NAME
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"accepted", b"rejected")  # the CRC no longer matches
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(JournalCorruptError, match="line 2"):
        read_decisions(tmp_path)
    assert fold_decisions(b"").lines == 0


def test_a_planted_link_is_never_written_through(tmp_path: Path) -> None:
    target = tmp_path / "bashrc"
    target.write_text("keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / DECISIONS_NAME).symlink_to(target)
    with pytest.raises(JournalError, match="symbolic link"):
        DecisionLog(out)
    with pytest.raises(JournalError, match="symbolic link"):
        read_decisions(out)
    assert target.read_text() == "keep me\n"


def test_rejected_images_get_new_repeat_indices_that_never_change(tmp_path: Path) -> None:
    path, out = finished_run(tmp_path, 4)
    manifest = load_manifest(path)
    decide(manifest, out, {"job-0002": "rejected", "job-0000": "rejected", "job-0001": "accepted"})
    pending = pending_replacements(manifest, out)
    assert [job.name for job in pending] == ["job-0002-r1", "job-0000-r1"]
    # Each job of the many_jobs manifest has its own input: each replacement is its input's first.
    assert [job.repeat_index for job in pending] == [REPLACEMENT_BASE, REPLACEMENT_BASE]
    originals = {job.name: job for job in manifest.jobs}
    assert pending[0].input == originals["job-0002"].input and pending[0].model == originals["job-0002"].model
    # Taking a rejection back and making it again names the same replacement.
    decide(manifest, out, {"job-0002": "accepted"})
    assert [job.name for job in pending_replacements(manifest, out)] == ["job-0000-r1"]
    decide(manifest, out, {"job-0002": "rejected"})
    assert [job.key for job in pending_replacements(manifest, out)] == [job.key for job in pending]


def test_replace_rejected_submits_exactly_the_rejected_ones_once(tmp_path: Path, start_sandbox) -> None:
    sandbox = start_sandbox(queue_delay=0.01, run_delay=0.01)
    path, out = tmp_path / "m.yaml", tmp_path / "out"
    from .conftest import many_jobs_manifest

    many_jobs_manifest(path, 5)
    options = fast_options(output_dir=out, api_base=sandbox.url)
    manifest = load_manifest(path)
    assert anyio.run(run_manifest, manifest, options).done == 5
    decide(manifest, out, {"job-0001": "rejected", "job-0003": "rejected", "job-0004": "accepted"})

    # A plain run sends nothing new: replacements need the flag.
    assert anyio.run(run_manifest, load_manifest(path), options).total == 5
    assert len(sandbox.sandbox.submits) == 5

    replacing = fast_options(output_dir=out, api_base=sandbox.url, replace_rejected=True)
    summary = anyio.run(run_manifest, load_manifest(path), replacing)
    assert summary.done == summary.total == 7 and not summary.orphans
    prompts = Counter(s.body["prompt"] for s in sandbox.sandbox.submits)
    assert prompts == Counter({f"prompt number {i}": 2 if i in (1, 3) else 1 for i in range(5)})

    # Again, and a plain run after it: nothing is paid twice, the replacements stay the manifest's.
    for again in (replacing, options):
        summary = anyio.run(run_manifest, load_manifest(path), again)
        assert summary.done == summary.total == 7 and summary.exit_code == 0
    assert len(sandbox.sandbox.submits) == 7

    # A replacement rejected in its turn gets the next index of the same input.
    manifest = load_manifest(path)
    decide(manifest, out, {"job-0001-r1": "rejected"})
    (third,) = pending_replacements(manifest, out)
    assert third.name == "job-0001-r2" and third.repeat_index == REPLACEMENT_BASE + 1
    anyio.run(run_manifest, load_manifest(path), replacing)
    assert len(sandbox.sandbox.submits) == 8
    records = records_of(out)
    assert all(r.submits == 1 for r in records.values())


def test_status_counts_decisions_and_plan_costs_the_replacements(tmp_path: Path) -> None:
    path, out = finished_run(tmp_path, 4)
    manifest = load_manifest(path)
    decide(manifest, out, {"job-0000": "rejected", "job-0001": "accepted", "job-0002": "accepted"})
    report = status_report(manifest, out)
    assert (report.accepted, report.rejected, report.undecided) == (2, 1, 1)
    assert report.replacements_to_submit == 1 and report.replacements_cost == pytest.approx(0.009)
    result = CliRunner().invoke(cli, ["status", str(path), "-o", str(out)], catch_exceptions=False)
    assert "review: 2 accepted, 1 rejected, 1 undecided (of 4 images)" in result.output
    assert "1 rejected image(s) to replace" in result.output and "--replace-rejected" in result.output
    as_json = json.loads(CliRunner().invoke(cli, ["status", str(path), "-o", str(out), "--json"]).output)
    assert as_json["rejected"] == 1 and as_json["replacements_to_submit"] == 1

    plan = CliRunner().invoke(cli, ["plan", str(path), "-o", str(out)], catch_exceptions=False).output
    assert "1 rejected image(s) to replace" in plan and "$0.01" in plan
    plan = CliRunner().invoke(cli, ["plan", str(path), "-o", str(out), "--replace-rejected"]).output
    assert "job-0000-r1" in plan and "would cost about $0.01" in plan


def test_the_gallery_and_metadata_include_replacements(tmp_path: Path) -> None:
    path, out = finished_run(tmp_path, 2)
    manifest = load_manifest(path)
    decide(manifest, out, {"job-0000": "rejected"})
    options = fast_options(
        token=None,
        output_dir=out,
        sandbox=True,
        sandbox_config=SandboxConfig(queue_delay=0.01, run_delay=0.01),
        replace_rejected=True,
    )
    assert anyio.run(run_manifest, manifest, options).done == 3
    result = CliRunner().invoke(cli, ["report", str(path), "-o", str(out)], catch_exceptions=False)
    assert "(3 images)" in result.output
    assert (out / "index.html").read_text().count('<article class="card"') == 3
    assert with_replacements(load_manifest(path), out).count == 3


def test_decisions_file_is_kept_by_runs(tmp_path: Path) -> None:
    path, out = finished_run(tmp_path, 2)
    decide(load_manifest(path), out, {"job-0001": "accepted"})
    before = (out / DECISIONS_NAME).read_bytes()
    finished_run(tmp_path, 2)  # the same folder, run again
    assert (out / DECISIONS_NAME).read_bytes() == before
    assert os.path.getsize(out / DECISIONS_NAME) > 0


def test_a_damaged_decisions_file_stops_only_the_run_that_replaces(tmp_path: Path) -> None:
    path, out = finished_run(tmp_path, 3)
    decide(load_manifest(path), out, {"job-0000": "rejected", "job-0001": "accepted", "job-0002": "accepted"})
    lines = (out / DECISIONS_NAME).read_bytes().split(b"\n")
    lines[0] = lines[0].replace(b"rejected", b"accepted")
    (out / DECISIONS_NAME).write_bytes(b"\n".join(lines))
    plain = CliRunner().invoke(cli, ["run", str(path), "-o", str(out), "--sandbox"])
    assert plain.exit_code == 0 and "line 1 is damaged" in plain.output
    replacing = CliRunner().invoke(cli, ["run", str(path), "-o", str(out), "--sandbox", "--replace-rejected"])
    assert replacing.exit_code == 2 and "line 1 is damaged" in replacing.output


@pytest.mark.slow
def test_a_damaged_decisions_file_is_said_under_quiet_and_sent_replacements_stay_replacements(
    tmp_path: Path, start_sandbox
) -> None:
    """Found by review: the warning about a damaged decisions.jsonl was hidden by -q, and the replacements
    already sent were then called "no longer in the manifest" (and their cost counted as such)."""
    from .conftest import TOKEN, many_jobs_manifest

    sandbox = start_sandbox(queue_delay=1.0, run_delay=0.01)
    path, out = many_jobs_manifest(tmp_path / "m.yaml", 3), tmp_path / "out"
    options = fast_options(output_dir=out, api_base=sandbox.url)
    assert anyio.run(run_manifest, load_manifest(path), options).done == 3
    decide(load_manifest(path), out, {"job-0000": "rejected", "job-0001": "rejected", "job-0002": "accepted"})
    # The replacements are sent, and the run stops while they are queued: paid for, not finished.
    sending = fast_options(output_dir=out, api_base=sandbox.url, replace_rejected=True, timeout=0.4)
    assert anyio.run(run_manifest, load_manifest(path), sending).done == 3
    assert len(sandbox.sandbox.submits) == 5
    lines = (out / DECISIONS_NAME).read_bytes().split(b"\n")
    lines[0] = lines[0].replace(b"rejected", b"accepted")  # job-0000's rejection: its CRC no longer matches
    (out / DECISIONS_NAME).write_bytes(b"\n".join(lines))

    result = CliRunner().invoke(
        cli,
        ["run", str(path), "-o", str(out), "--api-base", sandbox.url, "-q", "--yes", "--poll-interval", "0.05"],
        env={"RUNCOMFY_API_TOKEN": TOKEN},
    )
    assert result.exit_code == 0, result.output
    assert "line 1 is damaged" in result.output  # said even under -q: it decides what a run may send
    assert "no longer in the manifest" not in result.output, result.output
    assert "2 already submitted to finish" in result.output, result.output
    assert "5/5 done" in result.output, result.output
    assert len(sandbox.sandbox.submits) == 5, "nothing sent again"
    status = status_report(load_manifest(path), out)
    assert status.total == 5 and status.done == 5 and not status.spent_superseded
    assert any("line 1 is damaged" in warning for warning in status.warnings)  # status says it, and works
