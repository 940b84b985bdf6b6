"""Real processes: SIGKILL at random moments, SIGINT and SIGTERM, resumed until done."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from batcher import SandboxThread, read_journal
from batcher.journal.store import JOURNAL_NAME

from .conftest import TOKEN, many_jobs_manifest

StartSandbox = Callable[..., SandboxThread]

# Real processes and real signals: seconds each. `pytest -m "not slow"` is the quick loop.
pytestmark = pytest.mark.slow


def _start(manifest: Path, sandbox: SandboxThread, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "RUNCOMFY_API_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "batcher", "run", str(manifest), "--api-base", sandbox.url]
    command += ["--output", "out", "--poll-interval", "0.05", "--poll-max", "0.2", *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_event(out: Path, kind: str, count: int = 1, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        journal = out / JOURNAL_NAME
        if journal.exists() and journal.read_text().count(f'"e":"{kind}"') >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {kind!r} event within {timeout}s")


def test_killed_at_random_moments_and_resumed(tmp_path: Path, start_sandbox: StartSandbox) -> None:
    """SIGKILL a run again and again; nothing journalled is ever sent twice, every byte arrives."""
    rng = random.Random(20261125)
    sandbox = start_sandbox(queue_delay=0.2, run_delay=0.3)
    server = sandbox.sandbox
    jobs = 30
    manifest = many_jobs_manifest(tmp_path / "m.yaml", jobs)
    out = tmp_path / "out"
    kills = 0
    uncertain_after_kill: list[int] = []
    for _ in range(8):
        process = _start(manifest, sandbox, "--concurrency", "6")
        time.sleep(rng.uniform(0.2, 1.2))
        if process.poll() is not None:
            process.communicate()
            break
        process.kill()
        process.communicate()
        kills += 1
        folded = read_journal(out / JOURNAL_NAME)
        # Journalled request ids were each sent once, and only once.
        per_prompt = Counter(s.body["prompt"] for s in server.submits)
        assert all(n == 1 for n in per_prompt.values()), per_prompt
        uncertain_after_kill.append(sum(1 for r in folded.records.values() if r.phase in ("submitting", "uncertain")))
    assert kills >= 3

    finish = _start(manifest, sandbox, "--resubmit-uncertain")
    output, _ = finish.communicate(timeout=120)
    assert finish.returncode == 0, output
    folded = read_journal(out / JOURNAL_NAME)
    assert folded.warnings == [] or all("torn" in w for w in folded.warnings)
    assert sum(1 for r in folded.records.values() if r.downloaded) == jobs
    # Duplicates only from the window between sending a submit and journalling it.
    per_prompt = Counter(s.body["prompt"] for s in server.submits)
    duplicates = sum(n - 1 for n in per_prompt.values())
    assert duplicates <= sum(uncertain_after_kill)
    for record in folded.records.values():
        for file in record.files.values():
            assert file.sha256 in server.served.values()
    assert list(out.rglob("*.part")) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_stops_submitting_and_finishes_paid_jobs(
    tmp_path: Path, start_sandbox: StartSandbox, signum: int
) -> None:
    sandbox = start_sandbox(queue_delay=0.5, run_delay=0.5)
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 20)
    process = _start(manifest, sandbox, "--concurrency", "4")
    _wait_for_event(tmp_path / "out", "submitted", 2)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 130, output
    assert "resume" in output
    folded = read_journal(tmp_path / "out" / JOURNAL_NAME)
    submitted = [r for r in folded.records.values() if r.request_ids]
    assert 0 < len(submitted) < 20
    if signum == signal.SIGINT:
        assert all(r.downloaded for r in submitted), "paid-for jobs are finished before exiting"
    # SIGTERM (a service manager's stop) ends the waits at once; no submit is left uncertain.
    assert not any(r.phase in ("uncertain", "submitting") for r in folded.records.values())
    assert len(sandbox.sandbox.submits) == len(submitted)

    # Resume does the rest, sending nothing twice.
    process = _start(manifest, sandbox)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert len(sandbox.sandbox.submits) == 20


def test_second_sigint_exits_at_once_with_the_journal_intact(tmp_path: Path, start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(queue_delay=5.0, run_delay=5.0)
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 10)
    process = _start(manifest, sandbox, "--concurrency", "4")
    _wait_for_event(tmp_path / "out", "submitted", 4)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert process.poll() is None, "the first Ctrl-C waits for paid-for jobs"
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=10)
    assert process.returncode == 130
    assert time.monotonic() - started < 3
    folded = read_journal(tmp_path / "out" / JOURNAL_NAME)
    assert sum(1 for r in folded.records.values() if r.request_id) == len(sandbox.sandbox.submits) == 4


def test_cancel_on_interrupt_cancels_queued_jobs(tmp_path: Path, start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(queue_delay=30.0, run_delay=1.0)
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 6)
    process = _start(manifest, sandbox, "--concurrency", "3", "--cancel-on-interrupt")
    _wait_for_event(tmp_path / "out", "submitted", 3)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 130, output
    folded = read_journal(tmp_path / "out" / JOURNAL_NAME)
    cancelled = [r for r in folded.records.values() if r.phase == "cancelled"]
    assert len(cancelled) == 3
    assert sandbox.sandbox.calls.get("cancel") == 3
    status = subprocess.run(
        [sys.executable, "-m", "batcher", "status", str(manifest), "--output", "out", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert json.loads(status.stdout)["counts"]["failed"] == 3


def test_a_run_checkpoints_as_it_goes_so_a_kill_leaves_a_short_tail(
    tmp_path: Path, start_sandbox: StartSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batcher.journal.store import CHECKPOINT_NAME, _load_checkpoint, fold_bytes

    monkeypatch.setenv("BATCHER_CHECKPOINT_EVERY_BYTES", "1")  # one at every fsync tick with news
    monkeypatch.setenv("BATCHER_CHECKPOINT_MIN_BYTES", "0")
    sandbox = start_sandbox(queue_delay=0.1, run_delay=0.2)
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 40)
    process = _start(manifest, sandbox, "--concurrency", "4")
    _wait_for_event(tmp_path / "out", "downloaded", 5)
    time.sleep(0.5)
    process.kill()  # no end-of-run checkpoint: whatever is there was written during the run
    process.communicate()
    data = (tmp_path / "out" / JOURNAL_NAME).read_bytes()
    assert (tmp_path / "out" / CHECKPOINT_NAME).is_file()
    found = _load_checkpoint(tmp_path / "out" / CHECKPOINT_NAME, data)
    assert found is not None, "the checkpoint matches the journal's first bytes"
    assert 0 < found[0].good_length <= len(data)
    resumed, full = read_journal(tmp_path / "out" / JOURNAL_NAME), fold_bytes(data)
    assert {k: (r.phase, r.request_ids, r.files) for k, r in resumed.records.items()} == {
        k: (r.phase, r.request_ids, r.files) for k, r in full.records.items()
    }


def test_a_kill_while_a_submit_waits_out_a_429_leaves_it_pending_not_uncertain(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """Every 429 is journalled as not accepted before the job waits, so a kill in that wait holds nothing."""
    # Every submit refused with 429 and a Retry-After long enough to kill the run inside it.
    sandbox = start_sandbox(fault_rate=1.0, faults=("429",), fault_paths=("submit",), retry_after=30.0)
    server = sandbox.sandbox
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    process = _start(manifest, sandbox, "--concurrency", "1")
    deadline = time.monotonic() + 20
    while server.calls.get("submit", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # the answer is in: the run now waits out the Retry-After
    process.kill()
    process.communicate()
    refused = server.calls["submit"]
    assert refused >= 1 and server.submits == []  # refused every time: nothing was accepted, nothing paid

    server.config.fault_rate = 0.0
    process = _start(manifest, sandbox)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    journal = (tmp_path / "out" / JOURNAL_NAME).read_text()
    assert '"e":"uncertain"' not in journal
    assert server.calls["submit"] == refused + 1  # sent once more, no flag needed
    assert len(server.submits) == 1
    (record,) = read_journal(tmp_path / "out" / JOURNAL_NAME).records.values()
    assert record.downloaded


def test_a_fifo_in_place_of_a_local_image_never_freezes_the_run_nor_leaves_it_uncertain(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    from batcher.sandbox.server import make_png

    from .conftest import MODEL, write_manifest

    (tmp_path / "refs").mkdir()
    png = make_png("a", 32)
    (tmp_path / "refs" / "a.png").write_bytes(png)
    manifest = write_manifest(
        tmp_path / "m.yaml",
        f"""
model: {MODEL}
defaults: {{quality: low}}
jobs:
  - id: first
    prompt: "first"
    image_urls: ["https://example.org/ref.jpg"]
  - id: second
    prompt: "second"
    image_urls: ["refs/a.png"]
""",
    )
    sandbox = start_sandbox(queue_delay=0.3, run_delay=0.3)
    # One worker: the second job's images are read once the first is done, after the swap.
    process = _start(manifest, sandbox, "--concurrency", "1")
    _wait_for_event(tmp_path / "out", "submitted", 1)
    (tmp_path / "refs" / "a.png").unlink()
    os.mkfifo(tmp_path / "refs" / "a.png")  # opened for reading, it blocks until a writer comes: none will
    _wait_for_event(tmp_path / "out", "downloaded", 1)
    # The second job's images are read off the loop with O_NONBLOCK and fstat (confined.open_regular): a FIFO is
    # refused at once, before the job's intent is journalled, so the run ends by itself (it once blocked in
    # open() for good, deaf to SIGINT and SIGTERM).
    started = time.monotonic()
    try:
        output, _ = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"the run froze on a FIFO: {output}") from None
    assert time.monotonic() - started < 10, output
    assert process.returncode == 1, output
    assert "a.png" in output, output
    prompts = Counter(record.body["prompt"] for record in sandbox.sandbox.submits)
    assert prompts == {"first": 1}, "no POST left for the job whose image could not be read"
    folded = read_journal(tmp_path / "out" / JOURNAL_NAME)
    assert not any(r.phase in ("uncertain", "submitting") for r in folded.records.values())

    # Resumed with the image back: the job is pending, not uncertain, and is sent once.
    (tmp_path / "refs" / "a.png").unlink()
    (tmp_path / "refs" / "a.png").write_bytes(png)
    process = _start(manifest, sandbox)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "uncertain" not in (tmp_path / "out" / JOURNAL_NAME).read_text()
    assert Counter(record.body["prompt"] for record in sandbox.sandbox.submits) == {"first": 1, "second": 1}
