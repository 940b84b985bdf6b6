"""Several accounts in one run: tokens, fingerprints, routing, and resuming with a token missing.

Against a sandbox with two accounts, each with its own token and cap, that answers 403001 when one
account asks about the other's request, as RunComfy does.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batcher import RunSummary, SandboxThread, UsageError, load_manifest, read_journal, run_manifest
from batcher.cli.main import cli
from batcher.engine.runner import RunPlan
from batcher.journal.store import JOURNAL_NAME
from batcher.net.retrying import RetryPolicy
from batcher.runcomfy.backpressure import AccountCap
from batcher.runcomfy.polling import DurationModel
from batcher.runcomfy.tokens import FINGERPRINT_KEY, fingerprint, read_token_file, tokens_from_env

from .conftest import fast_options, many_jobs_manifest

StartSandbox = Callable[..., SandboxThread]
ALICE = "sk-alice-SENTINEL-1111"
BOB = "sk-bob-SENTINEL-2222"


def _events(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / JOURNAL_NAME).read_text().splitlines()]


async def _run(manifest: Path, sandbox: SandboxThread, tokens: tuple[str, ...], **overrides: Any) -> RunSummary:
    options = fast_options(api_base=sandbox.url, output_dir=Path("out"), token=None, tokens=tokens, **overrides)
    return await run_manifest(load_manifest(manifest), options)


def _submits_per_prompt(sandbox: SandboxThread) -> Counter[str]:
    return Counter(record.body["prompt"] for record in sandbox.sandbox.submits)


# -- tokens and fingerprints -------------------------------------------------------------------


def test_a_fingerprint_is_the_documented_keyed_hash_and_never_the_token() -> None:
    expected = hmac.new(FINGERPRINT_KEY, ALICE.encode(), hashlib.sha256).hexdigest()[:12]
    assert fingerprint(ALICE) == expected
    assert len(expected) == 12 and ALICE not in expected and fingerprint(BOB) != expected
    # Not a plain hash: one who knows sha256 of a leaked token list cannot match fingerprints to it.
    assert expected != hashlib.sha256(ALICE.encode()).hexdigest()[:12]


def test_tokens_come_from_one_place(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RUNCOMFY_API_TOKENS", f" {ALICE} , {BOB} ")
    assert tokens_from_env() == (ALICE, BOB)
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", ALICE)
    with pytest.raises(UsageError, match="RUNCOMFY_API_TOKENS and RUNCOMFY_API_TOKEN are both set"):
        tokens_from_env()
    monkeypatch.delenv("RUNCOMFY_API_TOKEN")
    for bad, why in ((",", "empty token"), (f"{ALICE},,{BOB}", "empty token"), (f"{ALICE},{ALICE}", "same token")):
        monkeypatch.setenv("RUNCOMFY_API_TOKENS", bad)
        with pytest.raises(UsageError, match=why) as caught:
            tokens_from_env()
        assert ALICE not in str(caught.value)  # a message names the account, never the token


def test_a_token_file_must_be_its_owners_alone(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# night accounts\n{ALICE}\n\n{BOB}\n")
    path.chmod(0o644)
    with pytest.raises(UsageError, match=r"open to others \(mode 0644\).*chmod 600"):
        read_token_file(path)
    path.chmod(0o600)
    assert read_token_file(path) == (ALICE, BOB)
    path.write_text("# nothing but a comment\n")
    with pytest.raises(UsageError, match="empty token"):
        read_token_file(path)
    with pytest.raises(UsageError, match="cannot read the token file"):
        read_token_file(tmp_path / "missing")


def test_bad_token_input_exits_2_and_leaves_the_journal_alone(tmp_path: Path, start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(accounts=(ALICE, BOB))
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    runner = CliRunner()
    ok = runner.invoke(
        cli, ["run", str(manifest), "--api-base", sandbox.url, "-o", "out"], env={"RUNCOMFY_API_TOKENS": ALICE}
    )
    assert ok.exit_code == 0, ok.output
    before = (tmp_path / "out" / JOURNAL_NAME).read_bytes()
    loose = tmp_path / "tokens"
    loose.write_text(f"{ALICE}\n{BOB}\n")
    loose.chmod(0o640)
    for env in ({"RUNCOMFY_API_TOKEN_FILE": str(loose)}, {"RUNCOMFY_API_TOKENS": " , "}):
        result = runner.invoke(cli, ["run", str(manifest), "--api-base", sandbox.url, "-o", "out"], env=env)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and ALICE not in result.output
        assert "chmod 600" in result.output or "empty token" in result.output
    assert (tmp_path / "out" / JOURNAL_NAME).read_bytes() == before


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_a_token_file_another_user_owns_is_refused_with_exit_2(tmp_path: Path, start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(accounts=(ALICE, BOB))
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    theirs = tmp_path / "tokens"
    theirs.write_text(f"{ALICE}\n{BOB}\n")
    theirs.chmod(0o600)
    os.chown(theirs, 65534, 65534)  # nobody's: mode 600, and still not this user's file
    result = CliRunner().invoke(
        cli,
        ["run", str(manifest), "--api-base", sandbox.url, "-o", "out"],
        env={"RUNCOMFY_API_TOKEN_FILE": str(theirs)},
    )
    assert result.exit_code == 2, result.output
    assert "belongs to another user (uid 65534" in result.output
    assert ALICE not in result.output and not sandbox.sandbox.submits
    assert not (tmp_path / "out" / JOURNAL_NAME).exists()


# -- routing -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_run_over_two_accounts_uses_both_and_polls_each_job_with_its_own(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox(accounts=(ALICE, BOB), max_in_flight=2, queue_delay=0.1, run_delay=0.2)
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 12)
    plans: list[RunPlan] = []
    options = fast_options(api_base=sandbox.url, output_dir=Path("out"), token=None, tokens=(ALICE, BOB))
    options.concurrency = 6
    summary = await run_manifest(load_manifest(manifest), options, on_plan=plans.append)
    assert (summary.done, summary.exit_code) == (12, 0)
    stats = sandbox.sandbox.stats()
    assert stats["other_user_refusals"] == 0  # every poll, result and cancel went to the submitting account
    assert set(stats["submits_by_account"]) == {1, 2} and sum(stats["submits_by_account"].values()) == 12
    assert all(n == 1 for n in _submits_per_prompt(sandbox).values())
    journal_text = (tmp_path / "out" / JOURNAL_NAME).read_text()
    assert ALICE not in journal_text and BOB not in journal_text
    accounts = {e.get("account") for e in _events(tmp_path / "out") if e["e"] == "submitting"}
    assert accounts == {fingerprint(ALICE), fingerprint(BOB)}
    assert [name for name, _ in plans[0].accounts] == [fingerprint(ALICE), fingerprint(BOB)]
    assert set(summary.accounts) == {fingerprint(ALICE), fingerprint(BOB)}
    assert sum(f.jobs for f in summary.accounts.values()) == 12


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_submit_refused_by_an_account_full_of_other_jobs_goes_to_the_other_account(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """Found by review: Alice's account is full with jobs this run does not hold (another machine's). After her
    429, her learned cap is 1 of 1, as "roomy" as Bob's idle 8 of 8, and the first token won the tie: the job
    went back to her on every try (46 POSTs in 10 s) while Bob had room."""
    import httpx2

    sandbox = start_sandbox(accounts=(ALICE, BOB), max_in_flight=2, queue_delay=0.0, run_delay=2.0, retry_after=0.0)
    body = {"prompt": "another machine's", "image_urls": ["https://example.org/r.jpg"]}
    async with httpx2.AsyncClient(base_url=sandbox.url, headers={"Authorization": f"Bearer {ALICE}"}) as other:
        for _ in range(2):
            assert (await other.post("/v1/models/openai/gpt-image-1-5/image-to-image", json=body)).status_code == 200
    options = fast_options(api_base=sandbox.url, output_dir=Path("out"), token=None, tokens=(ALICE, BOB))
    options.concurrency = 1
    options.retry = RetryPolicy(attempts=6, base=0.05, cap=0.2, max_retry_after=1.0)
    summary = await run_manifest(load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 2)), options)
    assert (summary.done, summary.exit_code) == (2, 0)
    stats = sandbox.sandbox.stats()
    assert stats["submits_by_account"] == {1: 2, 2: 2}  # Alice: the other machine's two; Bob: this run's
    assert stats["account_refusals"] == 1, "Alice was asked once, then left alone while she was full"


def _in_flight_run(tmp_path: Path, sandbox: SandboxThread, jobs: int) -> subprocess.Popen[str]:
    env = {**os.environ, "RUNCOMFY_API_TOKENS": f"{ALICE},{BOB}", "PYTHONUNBUFFERED": "1"}
    env.pop("RUNCOMFY_API_TOKEN", None)
    command = [sys.executable, "-m", "batcher", "run", str(many_jobs_manifest(tmp_path / "m.yaml", jobs))]
    command += ["--api-base", sandbox.url, "-o", "out", "-c", "8", "--poll-interval", "0.05", "--poll-max", "0.2"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_once_both_accounts_have_jobs_in_flight(process: subprocess.Popen[str], out: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        journal = out / JOURNAL_NAME
        if journal.exists():
            events = [json.loads(line) for line in journal.read_text().splitlines() if line.endswith("}")]
            submitted = {e["job"] for e in events if e["e"] == "submitted"}
            by = {e.get("account") for e in events if e["e"] == "submitting" and e["job"] in submitted}
            if len(submitted) >= 6 and len(by) == 2:
                process.send_signal(signal.SIGKILL)
                process.communicate()
                return
        time.sleep(0.01)
    process.kill()
    raise AssertionError(process.communicate()[0])


def _wait_for_both_accounts_in_flight(process: subprocess.Popen[str], out: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        journal = out / JOURNAL_NAME
        if journal.exists():
            events = [json.loads(line) for line in journal.read_text().splitlines() if line.endswith("}")]
            submitted = {e["job"] for e in events if e["e"] == "submitted"}
            by = {e.get("account") for e in events if e["e"] == "submitting" and e["job"] in submitted}
            if len(submitted) >= 4 and len(by) == 2:
                return
        time.sleep(0.01)
    process.kill()
    raise AssertionError(process.communicate()[0])


@pytest.mark.slow
def test_one_account_refused_mid_run_stops_alone_and_the_others_finish(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """Issue 24.4: Bob's key revoked mid-run. Bob's lane stops alone, its jobs held and named with its
    fingerprint and the variable in use; Alice finishes hers and goes on submitting; exit 1."""
    sandbox = start_sandbox(accounts=(ALICE, BOB), max_in_flight=3, queue_delay=0.5, run_delay=1.0)
    process = _in_flight_run(tmp_path, sandbox, 16)
    _wait_for_both_accounts_in_flight(process, tmp_path / "out")
    sandbox.sandbox.revoke(BOB)
    try:
        output, _ = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(process.communicate()[0]) from None
    assert process.returncode == 1, output
    bob, alice = fingerprint(BOB), fingerprint(ALICE)
    assert f"account {bob}" in output and "RUNCOMFY_API_TOKENS" in output, output
    assert "Check RUNCOMFY_API_TOKEN:" not in output, "the variable named is the one in use"
    assert BOB not in output and ALICE not in output
    folded = read_journal(tmp_path / "out" / JOURNAL_NAME)
    held = {key for key, r in folded.records.items() if r.phase == "submitted"}
    assert held and all(folded.records[key].account == bob for key in held), "only Bob's jobs wait"
    done = {key for key, r in folded.records.items() if r.downloaded}
    assert len(done) + len(held) == 16, "Alice finished her jobs in flight and sent every other job"
    assert all(folded.records[key].account == alice for key in done - held)
    assert not any(r.phase in ("uncertain", "submitting") for r in folded.records.values())
    assert all(n == 1 for n in _submits_per_prompt(sandbox).values())
    assert sandbox.sandbox.stats()["other_user_refusals"] == 0

    # Bob's key works again: the same command polls his jobs through him; nothing is sent twice.
    sandbox.sandbox.revoked.clear()
    process = _in_flight_run(tmp_path, sandbox, 16)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert sum(_submits_per_prompt(sandbox).values()) == 16 and all(
        n == 1 for n in _submits_per_prompt(sandbox).values()
    )


@pytest.mark.slow
@pytest.mark.anyio
async def test_killed_over_two_accounts_and_resumed_nothing_is_paid_twice(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """SIGKILL a run over two tokens with jobs of both in flight; the resumed run polls each with its own."""
    sandbox = start_sandbox(accounts=(ALICE, BOB), max_in_flight=3, queue_delay=1.0, run_delay=1.0)
    _kill_once_both_accounts_have_jobs_in_flight(_in_flight_run(tmp_path, sandbox, 16), tmp_path / "out")
    sent_before = len(sandbox.sandbox.submits)
    summary = await _run(tmp_path / "m.yaml", sandbox, (ALICE, BOB), resubmit_uncertain=False)
    assert sandbox.sandbox.stats()["other_user_refusals"] == 0
    per_prompt = _submits_per_prompt(sandbox)
    assert all(n == 1 for n in per_prompt.values()), per_prompt  # nothing paid twice
    assert len(sandbox.sandbox.submits) >= sent_before
    held = len(summary.uncertain)  # a kill mid-POST leaves at most one per worker, held, never resent
    assert summary.done + held == 16 and held <= 8


@pytest.mark.slow
@pytest.mark.anyio
async def test_resumed_with_a_token_missing_holds_that_accounts_jobs(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox(accounts=(ALICE, BOB), max_in_flight=3, queue_delay=1.0, run_delay=1.0)
    _kill_once_both_accounts_have_jobs_in_flight(_in_flight_run(tmp_path, sandbox, 16), tmp_path / "out")
    folded = read_journal(tmp_path / "out" / JOURNAL_NAME)
    bobs = {r.name for r in folded.records.values() if r.phase == "submitted" and r.account == fingerprint(BOB)}
    assert bobs
    bob_submits = sandbox.sandbox.stats()["submits_by_account"].get(2, 0)
    plans: list[RunPlan] = []
    options = fast_options(api_base=sandbox.url, output_dir=Path("out"), token=None, tokens=(ALICE,))
    summary = await run_manifest(load_manifest(tmp_path / "m.yaml"), options, on_plan=plans.append)
    assert set(plans[0].without_token) == {fingerprint(BOB)}
    assert set(plans[0].without_token[fingerprint(BOB)]) == bobs
    stats = sandbox.sandbox.stats()
    assert stats["other_user_refusals"] == 0  # never asked about Bob's jobs with Alice's token
    assert stats["submits_by_account"].get(2, 0) == bob_submits  # and never sent them again
    assert all(n == 1 for n in _submits_per_prompt(sandbox).values())
    assert summary.exit_code == 1 and bobs <= {j.name for j in summary.unfinished}
    # With Bob's token back, they finish; still nothing paid twice.
    final = await _run(tmp_path / "m.yaml", sandbox, (ALICE, BOB))
    assert final.done + len(final.uncertain) == 16
    assert all(n == 1 for n in _submits_per_prompt(sandbox).values())


@pytest.mark.anyio
async def test_one_token_resumes_a_single_account_folder_as_before(tmp_path: Path, start_sandbox: StartSandbox) -> None:
    """A rotated key: a folder one account ran is resumed with one (new) token; no job is held for it."""
    sandbox = start_sandbox(queue_delay=0.5, run_delay=0.5)
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 3)
    first = await _run(manifest, sandbox, ("sk-old-key-000000",), timeout=0.2)
    assert first.unfinished
    plans: list[RunPlan] = []
    options = fast_options(api_base=sandbox.url, output_dir=Path("out"), token="sk-new-key-111111")
    summary = await run_manifest(load_manifest(manifest), options, on_plan=plans.append)
    assert plans[0].without_token == {} and summary.done == 3
    assert all(n == 1 for n in _submits_per_prompt(sandbox).values())


@pytest.mark.slow
def test_status_shows_jobs_spend_and_429s_per_account(tmp_path: Path, start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(accounts=(ALICE, BOB), max_in_flight=1)
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 6)
    runner = CliRunner()
    env = {"RUNCOMFY_API_TOKENS": f"{ALICE},{BOB}"}
    ran = runner.invoke(cli, ["run", str(manifest), "--api-base", sandbox.url, "-o", "out", "-c", "4"], env=env)
    assert ran.exit_code == 0, ran.output
    assert sandbox.sandbox.stats()["account_refusals"] > 0  # the caps were met: 429s to count
    status = runner.invoke(cli, ["status", str(manifest), "-o", "out", "--json"])
    figures = json.loads(status.output)["accounts"]
    assert set(figures) == {fingerprint(ALICE), fingerprint(BOB)}
    assert sum(f["jobs"] for f in figures.values()) == 6
    assert sum(f["throttled"] for f in figures.values()) == sandbox.sandbox.stats()["account_refusals"]
    assert all(f["spent"] > 0 for f in figures.values())
    shown = runner.invoke(cli, ["status", str(manifest), "-o", "out"]).output
    assert fingerprint(ALICE) in shown and fingerprint(BOB) in shown and "429s" in shown
    assert ALICE not in shown and BOB not in shown


# -- an account's cap on jobs in flight -----------------------------------------------------------


def _in_flight_when_sent(folder: Path) -> list[tuple[int, str]]:
    """For each submit in the journal, in order: how many jobs this run had in flight at RunComfy as it
    was sent (accepted and not yet seen to end, or sent and not yet answered), and its answer."""
    held, sending, sent = 0, set(), []
    fate: dict[str, list[str]] = {}
    for event in _events(folder):
        kind, key = event["e"], event.get("job")
        if kind == "submitting":
            sent.append((held + len(sending), key))
            sending.add(key)
        elif kind in ("submitted", "deferred"):
            sending.discard(key)
            held += kind == "submitted"
            fate.setdefault(key, []).append(kind)
        elif kind in ("completed", "failed", "cancelled"):
            held -= 1
    answers = {key: iter(fates) for key, fates in fate.items()}
    return [(count, next(answers[key])) for count, key in sent]


@pytest.mark.slow
async def test_an_account_at_its_cap_is_asked_past_it_by_the_first_burst_then_only_by_probes(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """The first burst meets the cap; from then on the run keeps what RunComfy holds, and a submit it
    may refuse goes only as the probe at the cap (the account full, one at a time): the old client
    retried each refused one and learned nothing meanwhile. (Before probes this asserted no 429 past the
    burst at all; a probe is refused for certain, so it costs a request, never money.)"""
    sandbox = start_sandbox(accounts=(ALICE,), max_in_flight=2, retry_after=0.01, run_delay=0.3)
    summary = await _run(many_jobs_manifest(tmp_path / "m.yaml", 10), sandbox, (ALICE,), concurrency=8)
    assert summary.done == 10
    assert sandbox.sandbox.account_refusals > 0
    after_burst = _in_flight_when_sent(Path("out"))[8:]
    refused = sum(fate == "deferred" for _, fate in after_burst)
    assert refused <= 10, after_burst  # fewer than one a job: polls here see jobs end soon, so probes grow rare
    assert len(sandbox.sandbox.submits) == 10  # and each job paid once


@pytest.mark.slow
async def test_at_the_cap_a_probe_fills_a_slot_before_a_poll_sees_the_job_end(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """Polls that notice a job's end late (here 0.6 s after jobs of 0.2 s) leave the account's slot idle
    until then, unless a probe takes it: some job is accepted while this run still counts the cap full."""
    sandbox = start_sandbox(accounts=(ALICE,), max_in_flight=2, retry_after=0.01, run_delay=0.2)
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 12)
    summary = await _run(manifest, sandbox, (ALICE,), concurrency=6, poll_interval=0.6, poll_max=0.6)
    assert summary.done == 12
    sent = _in_flight_when_sent(Path("out"))
    assert any(in_flight >= 2 and fate == "submitted" for in_flight, fate in sent), sent
    assert len(sandbox.sandbox.submits) == 12


def test_a_burst_that_meets_the_cap_learns_what_runcomfy_holds() -> None:
    cap = AccountCap(16)
    for _ in range(16):
        cap.take()
    cap.accepted()
    for _ in range(12):
        cap.refused()  # the submits still on their way are not held: the burst does not set the cap
    assert cap.limit == 1
    for _ in range(3):
        cap.accepted()  # answers that crossed the 429s: RunComfy holds four, so it allows four
    assert (cap.limit, cap.held, cap.sending, cap.room) == (4, 4, 0, 0)


def _wall_clock(monkeypatch: pytest.MonkeyPatch, start: float = 1000.0) -> list[float]:
    """The probe's clock (wall time), set by the test: clock[0] = t."""
    clock = [start]
    monkeypatch.setattr("batcher.runcomfy.probing.time.time", lambda: clock[0])
    return clock


def _fill(cap: AccountCap, jobs: int) -> None:
    """jobs submits sent and taken."""
    for _ in range(jobs):
        cap.take()
        cap.accepted()


def _learned(*durations: float) -> DurationModel:
    model = DurationModel()
    for seconds in durations:
        model.add(seconds)
    return model


def test_a_probe_waits_until_the_held_jobs_have_likely_left_and_a_taken_one_does_not_raise_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _wall_clock(monkeypatch)
    durations = _learned(10, 10, 10, 10, 10, 10)  # every job takes 10 s
    cap = AccountCap(8)
    for _ in range(4):
        cap.take()
        cap.accepted()  # four jobs accepted at 1000
    assert cap.probe_at(durations) is None  # no cap met yet
    cap.take()
    cap.refused(retry_after=1.0)
    assert (cap.limit, cap.room) == (4, 0)
    assert cap.probe_at(None) is None  # nothing learned of how long jobs take
    assert cap.probe_at(_learned(10, 10)) is None  # too little learned
    # Jobs of 10 s accepted at 1000 cannot have left before 1010: the probe waits until then, not the
    # 429's Retry-After (1001): a run whose jobs all started together does not probe before they can end.
    assert cap.probe_at(durations) == pytest.approx(1010.0, abs=0.01)
    clock[0] = 1010.0
    cap.take(probe_for="p1")
    assert cap.probe_at(durations) is None  # one probe at a time
    cap.accepted("p1")  # taken: a held job left unseen; the cap is what it was
    assert (cap.limit, cap.held, cap.room) == (4, 5, -1)
    cap.release(1000.0)  # the poll sees that job end: no room, the probe already used its slot
    assert (cap.limit, cap.room) == (4, 0)
    # The three left from 1000 are past every duration learned: they count at the mean's rate, so the
    # next probe is due soon, never before a 429's Retry-After.
    due = cap.probe_at(durations)
    assert due is not None and 1010.0 < due <= 1015.0
    cap.take(probe_for="p2")
    assert cap.refused("p2", retry_after=30.0) is True  # refused: the job waits for room again, no backoff
    assert cap.probe_at(durations) == pytest.approx(1040.0)


def test_a_probe_taken_into_a_slot_seen_free_meanwhile_leaves_none_out(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _wall_clock(monkeypatch)
    durations = _learned(10, 10, 10, 10, 10)
    cap = AccountCap(8)
    for _ in range(2):
        cap.take()
        cap.accepted()
    cap.take()
    cap.refused()
    clock[0] = 1011.0
    cap.take(probe_for="p")
    cap.release(1000.0)  # a poll sees a job end while the probe is on its way
    cap.accepted("p")  # the probe, into that slot
    assert (cap.held, cap.limit, cap.probe.out) == (2, 2, False)
    assert cap.probe_at(durations) is not None  # the next probe can go when due


def test_an_uncertain_probe_makes_the_next_wait_as_a_refused_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A service answering 502s must not be probed at line rate, each probe held uncertain."""
    clock = _wall_clock(monkeypatch)
    durations = _learned(10, 10, 10, 10, 10, 10)
    cap = AccountCap(8)
    _fill(cap, 4)
    cap.take()
    cap.refused(retry_after=5.0)
    clock[0] = 1011.0
    due = cap.probe_at(durations)
    assert due is not None and due <= clock[0]
    cap.take(probe_for="p")
    clock[0] += 0.05
    cap.unsent("p")  # answered 502: held uncertain, never polled
    due = cap.probe_at(durations)
    assert due is not None and due > clock[0]


def test_an_account_refilled_long_after_its_last_429_does_not_probe_jobs_just_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _wall_clock(monkeypatch)
    durations = _learned(10, 10, 10, 10, 10, 10)
    cap = AccountCap(8)
    _fill(cap, 4)
    cap.take()
    cap.refused(retry_after=30.0)
    clock[0] = 1300.0
    for _ in range(4):
        cap.release(1000.0)
    for _ in range(4):
        cap.take()
        cap.accepted()  # refilled at 1300 by plain submits, no 429 since
    due = cap.probe_at(durations)
    assert due is not None and due >= 1310.0


def test_a_plain_submits_429_is_not_taken_for_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _wall_clock(monkeypatch)
    cap = AccountCap(8)
    for _ in range(2):
        cap.take()
        cap.accepted()
    cap.take()
    cap.refused()
    clock[0] = 1100.0
    cap.release(1000.0)
    cap.take()  # a plain submit R
    cap.take(probe_for="p")  # the probe P, R not answered yet
    assert cap.refused("r") is False  # R's 429: R backs off as any, the probe is still out
    assert cap.probe.out_for == "p"
    assert cap.refused("p") is True


def test_probes_refused_in_a_row_grow_rare(monkeypatch: pytest.MonkeyPatch) -> None:
    """An account full of jobs this run cannot see refuses every probe: past four in a row each next
    one waits 1.5x longer (at most most_quiet more); a taken one sets the pace back."""
    clock = _wall_clock(monkeypatch)
    durations = _learned(*range(1, 21))  # 1..20 s
    cap = AccountCap(8, most_quiet=60.0)
    for _ in range(3):
        cap.take()
        cap.accepted()
    clock[0] += 30.0  # every held job is older than any learned: each counts at the mean's rate
    cap.take()
    cap.refused()
    waits = []
    for _ in range(16):
        due = cap.probe_at(durations)
        assert due is not None
        waits.append(round(due - clock[0], 3))
        clock[0] = due
        cap.take(probe_for="p")
        assert cap.refused("p") is True
    first = waits[0]
    assert first == pytest.approx(0.25 * 10.5 / 3, rel=0.01)  # three jobs at 1/10.5 s each: a quarter slot
    assert waits[1:5] == pytest.approx([first] * 4, rel=0.01)
    assert waits[5:8] == pytest.approx([first * 1.5, first * 2.25, first * 3.375], rel=0.01)
    assert max(waits) <= first + 60.0 and waits[-1] == pytest.approx(first + 60.0)
    assert cap.probe.sent == cap.probe.refused == 16
    cap.take(probe_for="p")
    cap.accepted("p")
    assert cap.probe_at(durations) == pytest.approx(clock[0] + first, rel=0.01)


def test_a_cap_that_stays_is_asked_past_less_and_less_often(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("batcher.runcomfy.backpressure.time.monotonic", lambda: clock[0])
    cap = AccountCap(8, recover_after=5.0, most_quiet=20.0)

    def fill() -> None:
        while cap.room > 0 and cap.held < 4:
            cap.take()
            cap.accepted()

    for _ in range(5):
        cap.take()
    for _ in range(4):
        cap.accepted()
    cap.refused()
    assert (cap.limit, cap.quiet) == (4, 5.0)
    for quiet in (10.0, 20.0, 20.0):
        clock[0] += cap.quiet - 0.1
        cap.release()
        fill()
        assert cap.limit == 4, "no step up before the quiet spell is over"
        clock[0] += 0.1
        cap.release()
        assert cap.limit == 5
        cap.take()
        cap.accepted()  # held 4 again
        cap.release()  # a second job leaves before the step is tried: one step at a time
        assert cap.limit == 5
        cap.take()
        cap.accepted()
        cap.take()
        cap.refused()  # RunComfy still allows four
        assert (cap.limit, cap.quiet) == (4, quiet)

    # The cap is lifted: each step RunComfy takes lets the next one go at the next job's end.
    clock[0] += cap.quiet
    for limit in (5, 6, 7, 8, 8):
        cap.release()
        assert cap.limit == limit
        while cap.room > 0:
            cap.take()
            cap.accepted()
    assert cap.quiet == 5.0


# -- balances ---------------------------------------------------------------------------------------


class _BalanceServer(ThreadingHTTPServer):
    """A loopback API whose balance endpoint holds each request for a held token until all of those are in
    at once (or a second passed): it counts how many it held together. Model look-ups get 404 (no live price)."""

    def __init__(self, balances: dict[str, float], held: set[str]) -> None:
        self.balances = balances
        self.held = held
        self.barrier = threading.Barrier(len(held))
        self.in_flight = 0
        self.most = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _BalanceHandler)


class _BalanceHandler(BaseHTTPRequestHandler):
    server: _BalanceServer

    def do_GET(self) -> None:
        server = self.server
        if self.path != "/prod/v2/balance":
            self._answer(404, {"error_code": 404001, "error_message": "not here"})
            return
        token = self.headers["Authorization"].removeprefix("Bearer ")
        if token not in server.held:
            self._answer(200, {"balance_usd": server.balances[token]})
            return
        with server.lock:
            server.in_flight += 1
            server.most = max(server.most, server.in_flight)
        with contextlib.suppress(threading.BrokenBarrierError):
            server.barrier.wait(timeout=1.0)
        with server.lock:
            server.in_flight -= 1
        self._answer(200, {"balance_usd": server.balances[token]})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_plan_reads_the_accounts_balances_at_once_and_shows_them_in_token_order(tmp_path: Path) -> None:
    tokens = [f"sk-account-{n}-SENTINEL-{n}{n}{n}{n}" for n in range(5)]
    balances = {token: 10.0 + n for n, token in enumerate(tokens)}
    server = _BalanceServer(balances, held=set(tokens[1:]))  # the first token's is read with the prices
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = CliRunner().invoke(
            cli, ["plan", str(manifest), "--api-base", url, "-o", "out"], env={"RUNCOMFY_API_TOKENS": ",".join(tokens)}
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 0, result.output
    shown = [line for line in result.output.splitlines() if line.startswith("account ")]
    assert shown == [f"account {fingerprint(token)} balance: ${balances[token]:,.2f}" for token in tokens]
    assert server.most == len(tokens) - 1, "the other accounts' balances are read together, not one by one"
    assert not any(token in result.output for token in tokens)
