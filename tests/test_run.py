"""Whole runs against the sandbox over real loopback sockets."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx2
import pytest

from batcher import (
    BatcherError,
    JournalError,
    JournalLockedError,
    OutputFolderError,
    RunSummary,
    SandboxConfig,
    SandboxThread,
    UsageError,
    cancel_manifest,
    load_manifest,
    read_journal,
    run_manifest,
)
from batcher.journal.store import JOURNAL_NAME
from batcher.net.retrying import RetryPolicy

from .conftest import TOKEN, another_run_holding, fast_options, many_jobs_manifest

StartSandbox = Callable[..., SandboxThread]


async def _run(manifest_path: Path, sandbox: SandboxThread, **overrides: object) -> RunSummary:
    options = fast_options(api_base=sandbox.url, output_dir=Path("out"), **overrides)
    return await run_manifest(load_manifest(manifest_path), options)


def _submits_per_prompt(sandbox: SandboxThread) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in sandbox.sandbox.submits:
        counts[record.body["prompt"]] = counts.get(record.body["prompt"], 0) + 1
    return counts


def _check_files_against_server(out: Path, sandbox: SandboxThread) -> int:
    """Every journalled file is on disk with the bytes the server served; returns how many."""
    folded = read_journal(out / JOURNAL_NAME)
    checked = 0
    served = set(sandbox.sandbox.served.values())
    for record in folded.records.values():
        for file in record.files.values():
            data = (out / file.path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == file.sha256
            assert file.sha256 in served
            assert data.startswith(b"\x89PNG")
            checked += 1
    leftovers = [p for p in out.rglob("*.part")]
    assert leftovers == [], "no temporary file may be left behind"
    return checked


async def test_a_full_run_then_a_resume_that_sends_nothing(tmp_path: Path, start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 12)
    summary = await _run(manifest, sandbox, concurrency=4)
    assert (summary.done, summary.exit_code) == (12, 0)
    assert _check_files_against_server(tmp_path / "out", sandbox) == 12
    assert sandbox.sandbox.credentials_seen_by_file_host == 0, "the token must never reach download hosts"
    sidecar = json.loads(next((tmp_path / "out" / "job-0003").glob("*.json")).read_text())
    assert sidecar["input"]["prompt"] == "prompt number 3" and sidecar["request_id"]

    again = await _run(manifest, sandbox)
    assert (again.done, again.exit_code) == (12, 0)
    assert len(sandbox.sandbox.submits) == 12
    assert sandbox.sandbox.calls.get("result", 0) > 0
    journal = (tmp_path / "out" / JOURNAL_NAME).read_text()
    assert TOKEN not in journal


async def test_missing_or_damaged_files_are_fetched_again_without_resubmitting(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 3)
    await _run(manifest, sandbox)
    out = tmp_path / "out"
    first, second = sorted(out.glob("job-000[01]/*.png"))
    first.unlink()
    second.write_bytes(b"\x89PNG damaged")
    summary = await _run(manifest, sandbox)
    assert summary.done == 3
    assert len(sandbox.sandbox.submits) == 3
    assert _check_files_against_server(out, sandbox) == 3


async def test_expired_output_urls_are_refreshed_once(tmp_path: Path, start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(url_ttl=0.3)
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    await _run(manifest, sandbox)
    image = next((tmp_path / "out").glob("job-0000/*.png"))
    image.unlink()
    await anyio.sleep(0.4)  # the journalled URL has expired now
    summary = await _run(manifest, sandbox)
    assert summary.done == 1 and image.exists()
    events = [json.loads(line)["e"] for line in (tmp_path / "out" / JOURNAL_NAME).read_text().splitlines()]
    assert events.count("urls") == 1


@pytest.mark.slow
async def test_faults_at_a_real_rate_never_pay_twice(tmp_path: Path, start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(fault_rate=0.2, slow_seconds=0.6, retry_after=0.01, seed=7)
    server = sandbox.sandbox
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 40)
    timeouts = {"submit_timeout": httpx2.Timeout(0.3), "poll_timeout": httpx2.Timeout(0.3)}
    summary = await _run(manifest, sandbox, concurrency=8, **timeouts)
    assert sum(server.faults_injected.values()) >= 10, server.faults_injected
    assert summary.done + len(summary.uncertain) + len(summary.failed) == 40
    assert all(count == 1 for count in _submits_per_prompt(sandbox).values()), "nothing is paid twice"
    # A submit the server accepted but whose answer was lost is always held as uncertain.
    lost = {s.body["prompt"] for s in server.submits if not s.answered}
    held = {f"prompt number {int(o.name.split('-')[1])}" for o in summary.uncertain}
    assert lost and lost <= held

    # Plain reruns never resend uncertain jobs...
    for _ in range(2):
        rerun = await _run(manifest, sandbox, **timeouts)
        assert {o.key for o in rerun.uncertain} >= {o.key for o in summary.uncertain}
    assert all(count == 1 for count in _submits_per_prompt(sandbox).values())
    # ...until the user asks; then every job completes.
    server.config.fault_rate = 0.0
    final = await _run(manifest, sandbox, resubmit_uncertain=True, retry_failed=True)
    assert final.done == 40, (final.failed, final.uncertain, final.unfinished)
    assert _check_files_against_server(tmp_path / "out", sandbox) == 40


async def test_accept_then_reset_is_held_as_uncertain_and_never_resent(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox(fault_rate=1.0, faults=("drop_after_accept",), fault_paths=("submit",))
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1, quality="high")
    summary = await _run(manifest, sandbox)
    assert summary.exit_code == 1
    assert [o.name for o in summary.uncertain] == ["job-0000"]
    assert summary.possible_extra_cost == pytest.approx(0.133)
    assert len(sandbox.sandbox.submits) == 1 and not sandbox.sandbox.submits[0].answered

    sandbox.sandbox.config.fault_rate = 0.0
    for _ in range(2):
        again = await _run(manifest, sandbox)
        assert [o.name for o in again.uncertain] == ["job-0000"]
    assert len(sandbox.sandbox.submits) == 1, "0 automatic resubmissions"

    resubmitted = await _run(manifest, sandbox, resubmit_uncertain=True)
    assert resubmitted.done == 1 and resubmitted.exit_code == 0
    assert len(sandbox.sandbox.submits) == 2


async def test_failed_jobs_are_reported_and_retried_only_on_request(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox(fail_rate=1.0)
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    summary = await _run(manifest, sandbox)
    assert summary.exit_code == 1 and len(summary.failed) == 2
    assert "model failed" in (summary.failed[0].error or "")
    await _run(manifest, sandbox)
    assert len(sandbox.sandbox.submits) == 2
    sandbox.sandbox.config.fail_rate = 0.0
    retried = await _run(manifest, sandbox, retry_failed=True)
    assert retried.done == 2 and len(sandbox.sandbox.submits) == 4


async def test_jobs_dropped_from_the_manifest_are_reported_not_touched(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox()
    await _run(many_jobs_manifest(tmp_path / "m.yaml", 3), sandbox)
    summary = await _run(many_jobs_manifest(tmp_path / "m.yaml", 2), sandbox)
    assert summary.orphans == ["job-0002"]
    assert (tmp_path / "out" / "job-0002").is_dir()


@pytest.mark.parametrize("fault", ["503", "500"])
async def test_a_5xx_to_a_submit_is_uncertain_and_held_even_when_the_server_took_nothing(
    tmp_path: Path, start_sandbox: StartSandbox, fault: str
) -> None:
    """A bare 503 and a 500 with RunComfy's 500001 were sent again (issue 23): the client cannot tell these from
    the same answers after an accepted job (tests/test_money_paths.py), so each is held, journalled once."""
    sandbox = start_sandbox(fault_rate=0.4, faults=(fault,), fault_paths=("submit",), seed=7)
    jobs = 8
    summary = await _run(many_jobs_manifest(tmp_path / "m.yaml", jobs), sandbox)
    posts = sandbox.sandbox.calls["submit"]
    assert posts == jobs, "each job is sent once"
    held = sandbox.sandbox.faults_injected[fault]
    assert held > 0 and len(summary.uncertain) == held and summary.done == jobs - held
    events = [json.loads(line) for line in (tmp_path / "out" / JOURNAL_NAME).read_text().splitlines()]
    assert [e["e"] for e in events].count("uncertain") == held
    assert not [e for e in events if e["e"] == "deferred"]


@pytest.mark.parametrize("fault", ["429"])
async def test_every_retried_submit_has_its_own_intent_and_refusal_in_the_journal(
    tmp_path: Path, start_sandbox: StartSandbox, fault: str
) -> None:
    """A kill at any moment of a retried submit leaves nothing uncertain that was certainly refused:
    each POST has an intent of its own before it, and each refusal its line before the next one."""
    sandbox = start_sandbox(fault_rate=0.4, faults=(fault,), fault_paths=("submit",), seed=7)
    jobs = 8
    summary = await _run(many_jobs_manifest(tmp_path / "m.yaml", jobs), sandbox)
    assert summary.done == jobs
    posts = sandbox.sandbox.calls["submit"]
    assert posts > jobs, "the sandbox refused some submits"
    assert _submits_per_prompt(sandbox) == {f"prompt number {i}": 1 for i in range(jobs)}
    events = [json.loads(line) for line in (tmp_path / "out" / JOURNAL_NAME).read_text().splitlines()]
    kinds = [e["e"] for e in events if e["e"] in ("submitting", "deferred", "submitted")]
    assert kinds.count("submitting") == posts
    assert kinds.count("deferred") == posts - jobs
    for job in {e["job"] for e in events if e["e"] == "submitting"}:
        own = [e["e"] for e in events if e.get("job") == job and e["e"] in ("submitting", "deferred", "submitted")]
        refused = (len(own) - 2) // 2
        assert own == ["submitting", "deferred"] * refused + ["submitting", "submitted"], own
    # 429s count against the account (status's per-account figures).
    throttled = sum(
        sum((r.throttled or {}).values()) for r in read_journal(tmp_path / "out" / JOURNAL_NAME).records.values()
    )
    assert throttled == (posts - jobs if fault == "429" else 0)


async def test_a_submit_refused_with_retry_after_0_is_tried_again_with_a_growing_backoff(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """Found by review: a 429 saying "Retry-After: 0" had one job sent, and journalled twice, as fast as the
    server answered (69 POSTs in 3 s), for as long as the run lasted."""
    sandbox = start_sandbox(fault_rate=1.0, faults=("429",), fault_paths=("submit",), retry_after=0.0)
    options = fast_options(
        api_base=sandbox.url,
        output_dir=tmp_path / "out",
        retry=RetryPolicy(attempts=6, base=0.05, cap=0.4, max_retry_after=10.0),
        timeout=1.5,
    )
    with contextlib.suppress(BatcherError):
        await run_manifest(load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 1)), options)
    posts = sandbox.sandbox.calls["submit"]
    # Waits drawn up to 0.05, 0.1, 0.2, then 0.4 s: about ten tries in 1.5 s; a hot loop makes hundreds.
    assert 2 <= posts <= 30, posts


async def test_insufficient_balance_stops_submitting_and_resumes_later(tmp_path: Path) -> None:
    calls: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(request.url.path)
        return httpx2.Response(400, json={"error_code": 400002, "error_message": "Insufficient balance"})

    manifest = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 5))
    options = fast_options(output_dir=Path("out"), concurrency=1, api_transport=httpx2.MockTransport(handler))
    summary = await run_manifest(manifest, options)
    assert summary.exit_code == 1
    assert "balance" in (summary.stop_reason or "")
    assert len(calls) == 1, "no further submits once the balance is known to be gone"
    folded = read_journal(tmp_path / "out" / JOURNAL_NAME)
    assert all(r.phase == "pending" for r in folded.records.values())


async def test_no_token_is_a_usage_error_before_anything_is_written(tmp_path: Path) -> None:
    manifest = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 1))
    with pytest.raises(UsageError, match="RUNCOMFY_API_TOKEN"):
        await run_manifest(manifest, fast_options(token=None, output_dir=Path("out")))
    assert not (tmp_path / "out").exists()


async def test_a_second_runner_on_the_same_folder_fails_fast(tmp_path: Path, start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox()
    with another_run_holding(tmp_path / "out"), pytest.raises(JournalLockedError, match="another batcher run"):
        await _run(many_jobs_manifest(tmp_path / "m.yaml", 1), sandbox)
    assert sandbox.sandbox.submits == []


async def test_in_process_sandbox_needs_no_token(tmp_path: Path) -> None:
    manifest = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 2))
    options = fast_options(
        token=None, sandbox=True, sandbox_config=SandboxConfig(queue_delay=0.01, run_delay=0.01), output_dir=Path("o")
    )
    summary = await run_manifest(manifest, options)
    assert summary.done == 2


async def test_a_journal_that_cannot_record_a_request_id_stops_the_run_and_says_it(
    tmp_path: Path, start_sandbox: StartSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    import batcher.journal.store

    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        if b'"e":"submitted"' in data:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 3)
    monkeypatch.setattr(batcher.journal.store.os, "write", full_disk)
    with pytest.raises(JournalError, match=r"No space left on device.*WAS submitted as request sbx-") as caught:
        await _run(manifest, sandbox, concurrency=1)
    assert sandbox.sandbox.submits[0].request_id in str(caught.value)
    monkeypatch.setattr(batcher.journal.store.os, "write", real_write)

    # The journal still folds; the job whose answer was lost is uncertain, never resent.
    again = await _run(manifest, sandbox)
    assert len(again.uncertain) == 1 and again.done == 2
    assert len(sandbox.sandbox.submits) == 3


@pytest.mark.parametrize("code", ["ENOSPC", "EACCES"])
async def test_an_unwritable_output_folder_stops_the_run_cleanly(
    tmp_path: Path, start_sandbox: StartSandbox, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    import errno

    import batcher.output.download

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(getattr(errno, code), os_strerror(code))

    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 4)
    real_create = batcher.output.download._create
    monkeypatch.setattr(batcher.output.download, "_create", refuse)
    with pytest.raises(OutputFolderError, match="free space or fix permissions"):
        await _run(manifest, sandbox, concurrency=1)
    monkeypatch.setattr(batcher.output.download, "_create", real_create)
    folded = read_journal(tmp_path / "out" / JOURNAL_NAME)
    assert {r.request_id for r in folded.records.values() if r.request_id} == {
        s.request_id for s in sandbox.sandbox.submits
    }, "nothing submitted that the journal does not know of"
    summary = await _run(manifest, sandbox)
    assert summary.done == 4
    assert len(sandbox.sandbox.submits) == 4


def os_strerror(code: str) -> str:
    import errno
    import os

    return os.strerror(getattr(errno, code))


async def test_cancel_cancels_queued_jobs(tmp_path: Path, start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(queue_delay=30)
    manifest_path = many_jobs_manifest(tmp_path / "m.yaml", 3)
    summary = await _run(manifest_path, sandbox, job_timeout=None, timeout=1.0)
    assert len(summary.unfinished) == 3 and summary.exit_code == 1
    result = await cancel_manifest(
        load_manifest(manifest_path), fast_options(api_base=sandbox.url, output_dir=Path("out"))
    )
    assert sorted(result.cancelled) == ["job-0000", "job-0001", "job-0002"]
    again = await _run(manifest_path, sandbox)
    assert len(again.failed) == 3 and len(sandbox.sandbox.submits) == 3


async def test_unknown_states_empty_outputs_and_unsafe_urls_fail_one_job_each(tmp_path: Path) -> None:
    """A scripted API: each job meets a different oddity; the run goes on and reports each."""
    from batcher.sandbox.png import make_png

    png = make_png("ok")
    results: dict[str, list[dict[str, object]]] = {
        "r-0": [{"status": "warming_up"}, {"status": "succeeded", "output": {"image": "https://93.184.216.34/0.png"}}],
        "r-1": [{"status": "completed", "output": {}}],
        "r-2": [{"status": "completed", "output": {"images": ["file:///etc/passwd"]}}],
        "r-3": [{"status": "completed", "output": {"image": "https://169.254.169.254/latest/meta-data"}}],
    }
    submitted: list[str] = []

    def api(request: httpx2.Request) -> httpx2.Response:
        if request.method == "POST":
            request_id = f"r-{len(submitted)}"
            submitted.append(request_id)
            return httpx2.Response(200, json={"request_id": request_id})
        request_id = request.url.path.split("/")[3]
        script = results[request_id]
        body = script.pop(0) if len(script) > 1 else script[0]
        return httpx2.Response(200, json={"request_id": request_id, **body})

    def files(request: httpx2.Request) -> httpx2.Response:
        assert "authorization" not in request.headers
        return httpx2.Response(200, content=png, headers={"content-type": "image/png"})

    manifest = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 4))
    options = fast_options(
        output_dir=Path("out"),
        concurrency=1,
        api_transport=httpx2.MockTransport(api),
        download_transport=httpx2.MockTransport(files),
        # Not RunComfy's hosts: allowed, so the address rules are what is tested (an allowed host is still checked).
        allow_output_hosts=("93.184.216.34", "169.254.169.254"),
    )
    summary = await run_manifest(manifest, options)
    assert summary.done == 1
    reasons = {o.name: o.error or "" for o in summary.failed}
    assert "no output files" in reasons["job-0001"]
    assert "only https" in reasons["job-0002"]
    assert "link-local" in reasons["job-0003"]
    events = [json.loads(line) for line in (tmp_path / "out" / JOURNAL_NAME).read_text().splitlines()]
    assert {"e": "state", "state": "warming_up"}.items() <= next(
        e for e in events if e.get("state") == "warming_up"
    ).items()
    assert list((tmp_path / "out").rglob("*.png")) == [next((tmp_path / "out" / "job-0000").glob("*.png"))]


async def test_max_cost_stops_submitting_at_the_cap_across_runs(tmp_path: Path, start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 10)  # low quality: $0.009 each
    summary = await _run(manifest, sandbox, concurrency=2, max_cost=0.03)
    assert len(sandbox.sandbox.submits) == 3  # a 4th would make $0.036
    assert summary.done == 3 and len(summary.unfinished) == 7 and summary.exit_code == 1
    assert "--max-cost" in (summary.stop_reason or "")
    # The cap counts what earlier runs submitted too.
    again = await _run(manifest, sandbox, max_cost=0.06)
    assert len(sandbox.sandbox.submits) == 6 and again.done == 6


async def test_trial_runs_leave_the_journal_ready_for_the_full_run(tmp_path: Path, start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 8)
    trial = await _run(manifest, sandbox, limit=2)
    assert (trial.total, trial.done, trial.exit_code) == (2, 2, 0)
    picked = await _run(manifest, sandbox, only="job-000[2-4]")
    assert (picked.total, picked.done) == (3, 3)
    assert picked.orphans == [], "jobs outside the trial are not orphans"
    full = await _run(manifest, sandbox)
    assert full.done == 8
    assert len(sandbox.sandbox.submits) == 8, "nothing the trials did is paid again"
    with pytest.raises(UsageError, match="matches no job id"):
        await _run(manifest, sandbox, only="nope-*")


async def test_a_resume_sends_new_jobs_before_reading_back_the_files_of_done_ones(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    # A resume of 100,000 jobs half done read 50,000 images back (sha256 each) before its first new submit:
    # 50 s. The files are still read back, and a changed one fetched again, after the new submits.
    sandbox = start_sandbox(queue_delay=0.0, run_delay=0.0)
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 4)
    assert (await _run(manifest, sandbox, limit=2, concurrency=1)).done == 2
    journal = tmp_path / "out" / JOURNAL_NAME
    first = [json.loads(line) for line in journal.read_text().splitlines()]
    changed = next(e for e in first if e["e"] == "downloaded")
    (tmp_path / "out" / changed["path"]).write_bytes(b"not the image the journal hashed")
    summary = await _run(manifest, sandbox, concurrency=1)
    assert summary.done == 4
    resumed = [json.loads(line) for line in journal.read_text().splitlines()][len(first) :]
    order = [
        e["e"] for e in resumed if e["e"] == "submitting" or (e["e"] == "downloaded" and e["job"] == changed["job"])
    ]
    assert order == ["submitting", "submitting", "downloaded"], order
    assert _check_files_against_server(tmp_path / "out", sandbox) == 4
