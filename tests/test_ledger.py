"""The per-user ledger of places runs went to, through the CLI against a sandbox on loopback (the in-process
``--sandbox`` is outside the ledger): a job another noted place submitted is never paid again, whichever
way the place moved, and a place that cannot be read refuses. (Bucket prefixes: tests/test_remote.py.)"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from batcher import SandboxThread
from batcher.cli.main import cli
from batcher.journal.store import CHECKPOINT_NAME, JOURNAL_NAME

from .conftest import TOKEN, many_jobs_manifest

StartSandbox = Callable[..., SandboxThread]
FAST = ["--poll-interval", "0.05", "--poll-max", "0.1", "--retries", "3", "-q", "--yes"]


@pytest.fixture
def sandbox(start_sandbox: StartSandbox) -> SandboxThread:
    return start_sandbox(queue_delay=0.01, run_delay=0.01)


def _run(sandbox: SandboxThread, manifest: Path, *args: str) -> Result:
    return CliRunner().invoke(
        cli,
        ["run", str(manifest), "--api-base", sandbox.url, *FAST, *args],
        env={"RUNCOMFY_API_TOKEN": TOKEN},
        catch_exceptions=False,
    )


def _ledger(*args: str) -> Result:
    return CliRunner().invoke(cli, ["ledger", *args], catch_exceptions=False)


def _posts(sandbox: SandboxThread) -> Counter[str]:
    return Counter(record.body["prompt"] for record in sandbox.sandbox.submits)


def _once(count: int) -> Counter[str]:
    return Counter({f"prompt number {i}": 1 for i in range(count)})


def _flip_line_2(folder: Path) -> None:
    journal = folder / JOURNAL_NAME
    lines = journal.read_bytes().split(b"\n")
    damaged = bytearray(lines[1])
    damaged[len(damaged) // 2] ^= 0x01
    lines[1] = bytes(damaged)
    journal.write_bytes(b"\n".join(lines))
    (folder / CHECKPOINT_NAME).unlink(missing_ok=True)


def test_a_parent_or_a_child_folder_does_not_pay_again(tmp_path: Path, sandbox: SandboxThread) -> None:
    """Found by the audit (issue 24, finding 1): after -o out/m, both -o out and -o out/m/v2 sent every job
    again (the ledger left a place above or below to `check_no_overlap`, which knows only shard folders)."""
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 3)
    assert _run(sandbox, manifest, "-o", "out/m").exit_code == 0
    for other in ("out", "out/m/v2", "out/m/shard-1-of-2/x"):
        result = _run(sandbox, manifest, "-o", other)
        assert result.exit_code == 2, result.output
        said = " ".join(result.output.split())
        assert f"3 of these jobs were already submitted from {tmp_path / 'out' / 'm'}" in said, said
        assert f"-o {tmp_path / 'out' / 'm'}" in said and "--new-output" in said and "Traceback" not in said
    assert _posts(sandbox) == _once(3), "one POST per job, at the server"
    # The real shard layout of one run is exempt (check_no_overlap reads every layout of it): two shards, then
    # each resumed, pay once each; and the parent's own resume goes on.
    sharded = many_jobs_manifest(tmp_path / "s.yaml", 4)
    sharded.write_text(sharded.read_text().replace("prompt number", "shard prompt"))
    for shard in ("1/2", "2/2", "1/2", "2/2"):
        assert _run(sandbox, sharded, "-o", "sh", "--shard", shard).exit_code == 0
    assert _run(sandbox, manifest, "-o", "out/m").exit_code == 0
    assert len(sandbox.sandbox.submits) == 3 + 4 and max(_posts(sandbox).values()) == 1


def test_a_noted_folder_whose_journal_is_damaged_refuses_with_what_to_do(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    """Found by the audit (issue 24, finding 2): with one byte of line 2 of A's journal flipped, a run into B
    paid for every job again (an unreadable folder was skipped with `continue`)."""
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 3)
    assert _run(sandbox, manifest, "-o", "A").exit_code == 0
    _flip_line_2(tmp_path / "A")
    other = many_jobs_manifest(tmp_path / "other.yaml", 2)  # even another manifest: A cannot be checked
    other.write_text(other.read_text().replace("prompt number", "other prompt"))
    for run in (manifest, other):
        result = _run(sandbox, run, "-o", "B")
        assert result.exit_code == 2, result.output
        said = " ".join(result.output.split())
        assert f"{tmp_path / 'A'} held a run against this API" in said and "cannot be read now" in said, said
        assert f"batcher ledger forget {tmp_path / 'A'}" in said and "--new-output" in said, said
    assert "when last read it had submitted 3 of these jobs" in " ".join(
        _run(sandbox, manifest, "-o", "B").output.split()
    )
    assert _posts(sandbox) == _once(3)
    # The person decides: forget A (its jobs may then be paid again, as said).
    forgot = _ledger("forget", str(tmp_path / "A"))
    assert forgot.exit_code == 0 and f"forgot {tmp_path / 'A'}" in forgot.output, forgot.output
    assert _run(sandbox, manifest, "-o", "B").exit_code == 0
    assert len(sandbox.sandbox.submits) == 6


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_a_noted_folder_that_cannot_be_read_for_permissions_refuses(tmp_path: Path, sandbox: SandboxThread) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    assert _run(sandbox, manifest, "-o", "locked/A").exit_code == 0
    (tmp_path / "locked").chmod(0)
    try:
        result = _run(sandbox, manifest, "-o", "B")
    finally:
        (tmp_path / "locked").chmod(0o700)
    assert result.exit_code == 2 and "cannot be read now" in result.output, result.output
    assert _posts(sandbox) == _once(2)


def test_a_gone_folder_refuses_only_the_jobs_it_paid_for(tmp_path: Path, sandbox: SandboxThread) -> None:
    """A noted folder that no longer exists: its summary in the ledger still says which jobs it submitted. A
    run of those jobs (here from a copy of the manifest, which the old rule let through) refuses with what to
    do; a run of other jobs goes on (a deleted folder does not refuse every run forever)."""
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 3)
    assert _run(sandbox, manifest, "-o", "A").exit_code == 0
    (tmp_path / "A").rename(tmp_path / "moved")
    (tmp_path / "copy").mkdir()
    copy = tmp_path / "copy" / "m.yaml"
    copy.write_bytes(manifest.read_bytes())
    result = _run(sandbox, copy, "-o", "B")
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert f"3 of these jobs were already submitted from {tmp_path / 'A'}" in said and "journal is gone" in said
    assert "-o <its new place>" in said and f"batcher ledger forget {tmp_path / 'A'}" in said, said
    assert _posts(sandbox) == _once(3)
    # Moved: it goes on there, paying nothing again.
    assert _run(sandbox, copy, "-o", "moved").exit_code == 0 and _posts(sandbox) == _once(3)
    other = many_jobs_manifest(tmp_path / "copy" / "other.yaml", 2)
    other.write_text(other.read_text().replace("prompt number", "other prompt"))
    assert _run(sandbox, other, "-o", "C").exit_code == 0, "not the gone folder's jobs: not refused"
    assert len(sandbox.sandbox.submits) == 5


def test_a_run_start_reads_the_summary_while_the_journal_stamp_holds(tmp_path: Path, sandbox: SandboxThread) -> None:
    """The check reads each noted place's small summary, not its journal, while the journal's size, mtime and
    inode are those the summary was made from; a changed journal is read again."""
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 3)
    assert _run(sandbox, manifest, "-o", "A").exit_code == 0
    journal = tmp_path / "A" / JOURNAL_NAME
    before = journal.stat()
    _flip_line_2(tmp_path / "A")  # the same size and inode; with its mtime put back, the same stamp
    os.utime(journal, ns=(before.st_atime_ns, before.st_mtime_ns))
    result = _run(sandbox, manifest, "-o", "B")
    assert result.exit_code == 2 and "3 of these jobs were already submitted from" in result.output, result.output
    os.utime(journal, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    result = _run(sandbox, manifest, "-o", "B")
    assert result.exit_code == 2 and "cannot be read now" in result.output, result.output
    assert _posts(sandbox) == _once(3)


def test_ledger_list_and_forget(tmp_path: Path, sandbox: SandboxThread) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 4)
    assert _run(sandbox, manifest, "-o", "A").exit_code == 0
    assert _run(sandbox, manifest, "--shard", "1/2", "--new-output").exit_code == 0  # output/m/shard-1-of-2
    shard = tmp_path / "output" / "m" / "shard-1-of-2"
    listed = _ledger("list")
    assert listed.exit_code == 0, listed.output
    assert f"{tmp_path / 'A'}\t4 job(s) submitted" in listed.output and "api loopback" in listed.output
    assert f"{shard}\t" in listed.output and str(manifest) in listed.output
    # Forgetting a run's folder forgets its shards' too: their jobs are no longer checked.
    forgot = _ledger("forget", str(tmp_path / "output" / "m"))
    assert forgot.exit_code == 0 and f"forgot {shard}" in forgot.output, forgot.output
    assert str(shard) not in _ledger("list").output
    missing = _ledger("forget", str(tmp_path / "nowhere"))
    assert missing.exit_code == 2 and "is not in the ledger" in missing.output


def test_a_ledger_past_its_size_cap_refuses_instead_of_being_read(tmp_path: Path, sandbox: SandboxThread) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    ledger = tmp_path / ".state" / "batcher" / "ledger.jsonl"
    ledger.parent.mkdir(parents=True)
    ledger.write_bytes(b"x" * (16 * 1024 * 1024 + 1))
    result = _run(sandbox, manifest, "-o", "A")
    assert result.exit_code == 2 and "is over 16 MiB" in result.output and "Move it aside" in result.output
    assert sandbox.sandbox.submits == []
