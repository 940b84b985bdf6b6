"""The money promise on the paths a person takes: each drives the real CLI against the sandbox
and judges what the sandbox saw (submits per job) and what the output folder holds."""

from __future__ import annotations

import json
import shlex
import socket
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest
from click.testing import CliRunner, Result

from batcher import SandboxThread, load_manifest, read_journal, run_manifest
from batcher.cli.main import cli
from batcher.errors import ManifestChangedError
from batcher.journal.standing import category
from batcher.journal.store import JOURNAL_NAME

from .conftest import TOKEN, fast_options, many_jobs_manifest
from .faultproxy import Fault, FaultProxy, fault_proxy

StartSandbox = Callable[..., SandboxThread]
FAST = ["--poll-interval", "0.05", "--poll-max", "0.1", "--retries", "3", "-q"]


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    return CliRunner()


def _run(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(cli, ["run", *FAST, *args], catch_exceptions=False)


def _submits_per_job(sandbox: SandboxThread) -> Counter[str]:
    return Counter(record.body["prompt"] for record in sandbox.sandbox.submits)


def _categories(folder: Path) -> Counter[str]:
    return Counter(category(r) for r in read_journal(folder / JOURNAL_NAME).records.values())


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- 1. a sandbox rehearsal, then the real run ---------------------------------------------------


def test_a_rehearsal_then_the_real_run_pays_for_every_job(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 4)
    rehearsal = _run(runner, str(manifest), "--sandbox")
    assert rehearsal.exit_code == 0, rehearsal.output
    assert "sandbox: would have cost" in rehearsal.output and "nothing was charged" in rehearsal.output
    assert (tmp_path / "output" / "sandbox" / "m" / JOURNAL_NAME).is_file()

    real = start_sandbox()  # stands in for RunComfy: "drop --sandbox"
    result = _run(runner, str(manifest), "--api-base", real.url)
    assert result.exit_code == 0, result.output
    assert _submits_per_job(real) == {f"prompt number {i}": 1 for i in range(4)}
    assert _categories(tmp_path / "output" / "m") == {"done": 4}


@pytest.mark.slow
def test_a_rehearsal_in_a_second_checkout_is_not_refused_for_the_first(runner: CliRunner, tmp_path: Path) -> None:
    """Found by a newcomer: the README's first command, in a second clone of the repository, was exit 2 ("would
    pay for them again") because the first clone's rehearsal was in the ledger. A rehearsal charges nothing."""
    for checkout in ("first", "second"):
        (tmp_path / checkout).mkdir()
        manifest = many_jobs_manifest(tmp_path / checkout / "london.yaml", 3)
        result = _run(runner, str(manifest), "--sandbox")
        assert result.exit_code == 0, result.output
        assert (tmp_path / checkout / "output" / "sandbox" / "london" / JOURNAL_NAME).is_file()


def test_a_resume_that_forgot_its_api_base_is_told_to_add_it(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """Found by a newcomer: a resume without --api-base was told to give itself another folder."""
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    server = start_sandbox()
    assert _run(runner, str(manifest), "--api-base", server.url, "-o", "out").exit_code == 0
    result = _run(runner, str(manifest), "--sandbox", "-o", "out")
    assert result.exit_code == 2, result.output
    assert f"add --api-base {server.url}" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_a_folder_belongs_to_one_api(runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    assert _run(runner, str(manifest), "--sandbox", "-o", "out").exit_code == 0
    before = (tmp_path / "out" / JOURNAL_NAME).read_bytes()
    other = start_sandbox()
    result = _run(runner, str(manifest), "--api-base", other.url, "-o", "out")
    assert result.exit_code == 2, result.output
    assert "belongs to runs against the in-process sandbox" in result.output and "-o" in result.output
    assert "add --sandbox" in result.output  # the likeliest slip: a resume without the flag the run had
    assert "Traceback" not in result.output
    assert other.sandbox.submits == [] and (tmp_path / "out" / JOURNAL_NAME).read_bytes() == before
    for command in (["status", str(manifest), "-o", "out"], ["cancel", str(manifest), "-o", "out"]):
        extra = ["--api-base", other.url] if command[0] == "cancel" else []
        checked = runner.invoke(cli, [*command, *extra], catch_exceptions=False)
        assert checked.exit_code == (2 if command[0] == "cancel" else 0), checked.output


# -- 2. another working folder ------------------------------------------------------------------------


def test_the_default_folder_follows_the_manifest_not_the_current_folder(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "manifests").mkdir()
    manifest = many_jobs_manifest(project / "manifests" / "london.yaml", 3)
    sandbox = start_sandbox()
    monkeypatch.chdir(project)
    assert _run(runner, "manifests/london.yaml", "--api-base", sandbox.url).exit_code == 0
    assert (project / "output" / "london" / JOURNAL_NAME).is_file()

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(home)  # a cron job started from $HOME
    plan = runner.invoke(cli, ["plan", str(manifest)], catch_exceptions=False)
    assert plan.output.count(" done ") == 3 and " pending " not in plan.output, plan.output
    again = _run(runner, str(manifest), "--api-base", sandbox.url)
    assert again.exit_code == 0, again.output
    assert len(sandbox.sandbox.submits) == 3
    assert not (home / "output").exists()


def test_another_output_folder_never_pays_again_without_asking(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 3)
    sandbox = start_sandbox()
    assert _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "first").exit_code == 0
    result = _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "second")
    assert result.exit_code == 2, result.output
    assert str(tmp_path / "first") in result.output and "--new-output" in result.output
    assert len(sandbox.sandbox.submits) == 3
    paid_again = _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "second", "--new-output")
    assert paid_again.exit_code == 0, paid_again.output
    assert len(sandbox.sandbox.submits) == 6


# -- 3. the resume hint -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_resume_hint_is_a_command_that_works(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 4)
    sandbox = start_sandbox(queue_delay=0.0, run_delay=3.0)
    stopped = _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out/x", "-c", "2", "--timeout", "1")
    assert stopped.exit_code == 1, stopped.output
    hint = stopped.output.split("To resume, run: ")[1].splitlines()[0]
    words = shlex.split(hint)
    start = words.index("run")  # after how batcher was started: `batcher`, a venv's path, or python -m batcher
    assert "-o" in words and "--api-base" in words and "-c" in words
    resumed = runner.invoke(cli, [*words[start:], *FAST], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert _submits_per_job(sandbox) == {f"prompt number {i}": 1 for i in range(4)}
    assert _categories(tmp_path / "out" / "x") == {"done": 4}


# -- 4. a wrong token ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_token_stops_at_once_and_leaves_nothing_uncertain(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 6)
    sandbox = start_sandbox(token="right-token-123", auth_status=status)
    result = _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out", "-c", "4")
    assert result.exit_code == 2, result.output
    assert result.output.count("refused the API token") == 1 and "Traceback" not in result.output
    assert "uncertain" not in _categories(tmp_path / "out")
    assert sandbox.sandbox.calls.get("submit", 0) <= 4  # the ones in flight, then nothing more

    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "right-token-123")
    fixed = _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out")
    assert fixed.exit_code == 0, fixed.output
    assert _submits_per_job(sandbox) == {f"prompt number {i}": 1 for i in range(6)}


def test_cancel_with_a_refused_token_says_so_once(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 3)
    sandbox = start_sandbox(queue_delay=30.0, token=TOKEN)
    assert _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out", "--timeout", "1").exit_code == 1
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "wrong-token-456")
    result = runner.invoke(cli, ["cancel", str(manifest), "--api-base", sandbox.url, "-o", "out"])
    assert result.exit_code == 2, result.output
    assert result.output.count("refused the API token") == 1


# -- 5. an outage -------------------------------------------------------------------------------------------------


def test_an_outage_pauses_then_ends_with_one_message_and_the_next_run_sends_everything(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 4)
    down = f"http://127.0.0.1:{_closed_port()}"
    result = _run(runner, str(manifest), "--api-base", down, "-o", "out", "--retries", "2", "--outage-timeout", "1")
    assert result.exit_code == 1, result.output
    assert "could not be reached" in result.output
    assert "failed" not in result.output and "--retry-failed" not in result.output
    assert _categories(tmp_path / "out") == {"pending": 4}

    sandbox = start_sandbox()
    back = _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out")
    assert back.exit_code == 0, back.output
    assert _submits_per_job(sandbox) == {f"prompt number {i}": 1 for i in range(4)}


# -- 6. a 404 on a poll ------------------------------------------------------------------------------------------------


def test_a_request_not_known_yet_is_asked_again_not_failed(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 3)
    sandbox = start_sandbox(unknown_window=0.5)
    result = _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out")
    assert result.exit_code == 0, result.output
    assert _submits_per_job(sandbox) == {f"prompt number {i}": 1 for i in range(3)}


def test_a_lost_request_is_held_and_sent_again_only_when_asked(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    sandbox = start_sandbox(unknown_window=3600)
    result = _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out", "--lost-after", "0.3")
    assert result.exit_code == 1, result.output
    assert "2 lost" in result.output and "--resubmit-uncertain" in result.output
    status = runner.invoke(cli, ["status", str(manifest), "-o", "out", "--json"], catch_exceptions=False)
    assert json.loads(status.output)["counts"]["lost"] == 2
    retried = _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out", "--retry-failed")
    assert retried.exit_code == 1 and len(sandbox.sandbox.submits) == 2
    sandbox.sandbox.config.unknown_window = 0.0
    resubmitted = _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out", "--resubmit-uncertain")
    assert resubmitted.exit_code == 0, resubmitted.output
    assert len(sandbox.sandbox.submits) == 4


# -- 7. 429 past the retries ----------------------------------------------------------------------------------------------


def test_an_account_cap_slows_the_run_down_and_refuses_nothing(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 10)
    sandbox = start_sandbox(max_in_flight=2, retry_after=0.05, run_delay=0.2)
    result = _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out", "-c", "8", "--retries", "1")
    assert result.exit_code == 0, result.output
    assert sandbox.sandbox.account_refusals > 0
    assert _submits_per_job(sandbox) == {f"prompt number {i}": 1 for i in range(10)}
    journal = (tmp_path / "out" / JOURNAL_NAME).read_text()
    assert '"e":"refused"' not in journal and '"e":"deferred"' in journal


# -- 8. --max-cost -----------------------------------------------------------------------------------------------------------------


def test_the_cost_cap_says_how_to_go_on(runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 5)
    sandbox = start_sandbox()
    args = [str(manifest), "--api-base", sandbox.url, "-o", "out", "--max-cost", "0.03"]
    first = _run(runner, *args)
    assert first.exit_code == 1, first.output
    assert "raise --max-cost" in first.output and "To resume" not in first.output
    sent = len(sandbox.sandbox.submits)
    assert 0 < sent < 5
    again = _run(runner, *args)
    assert "--max-cost $0.03 reached" in again.output and "raise --max-cost" in again.output
    assert len(sandbox.sandbox.submits) == sent
    raised = _run(runner, *args[:-1], "1")
    assert raised.exit_code == 0 and len(sandbox.sandbox.submits) == 5


# -- 9. shards and the whole -----------------------------------------------------------------------------------------------------------


def test_unsharded_plan_status_and_report_sum_the_shards(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 6)
    sandbox = start_sandbox()
    for shard in ("1/2", "2/2"):
        assert _run(runner, str(manifest), "--api-base", sandbox.url, "--shard", shard).exit_code == 0
    plan = runner.invoke(cli, ["plan", str(manifest)], catch_exceptions=False)
    assert plan.output.count(" done ") == 6, plan.output
    status = runner.invoke(cli, ["status", str(manifest), "--json"], catch_exceptions=False)
    assert json.loads(status.output)["counts"]["done"] == 6
    report = runner.invoke(cli, ["report", str(manifest)], catch_exceptions=False)
    assert report.exit_code == 0, report.output
    rows = [json.loads(line) for line in (tmp_path / "output" / "m" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all((tmp_path / "output" / "m" / row["file_name"]).is_file() for row in rows)


# -- 10. money adds up ----------------------------------------------------------------------------------------------------------------------


def test_spent_counts_superseded_jobs_and_prints_no_float_noise(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 3, quality="medium")
    sandbox = start_sandbox()
    assert _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out").exit_code == 0
    before = json.loads(runner.invoke(cli, ["status", str(manifest), "-o", "out", "--json"]).output)["spent"]
    manifest.write_text(manifest.read_text().replace("prompt number 0", "an edited prompt"))
    assert _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out").exit_code == 0
    status = runner.invoke(cli, ["status", str(manifest), "-o", "out", "--json"])
    report = json.loads(status.output)
    assert report["spent"] == round(before * 4 / 3, 6) and report["spent_superseded"] == round(before / 3, 6)
    assert all(len(repr(report[key]).split(".")[-1]) <= 6 for key in ("spent", "spent_superseded", "to_spend"))


def test_a_resumed_run_counts_the_failures_it_holds(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 3)
    sandbox = start_sandbox(fail_rate=1.0)
    assert _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out").exit_code == 1
    again = runner.invoke(
        cli, ["run", str(manifest), "--api-base", sandbox.url, "-o", "out", "--poll-interval", "0.05"]
    )
    assert "0/3 done, 3 failed" in again.output, again.output


# -- 11. a figure before spending ----------------------------------------------------------------------------------------------------------


def test_the_run_says_what_it_will_send_and_never_waits_without_a_terminal(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 4, quality="high")
    sandbox = start_sandbox()
    result = _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out", "--confirm-above", "0")
    assert result.exit_code == 0, result.output
    assert "will submit 4 jobs" in result.output and "$" in result.output
    assert len(sandbox.sandbox.submits) == 4


# -- answers that carry a request_id beside an error, or an error body on a gateway status ---------------


@pytest.mark.parametrize(
    ("status", "body", "phase"),
    [
        (200, {"request_id": "r-1", "error_code": 400002, "error_message": "insufficient balance"}, "submitted"),
        (422, {"request_id": "r-1", "error_code": 422001, "error_message": "bad input"}, "submitted"),
        (502, {"error_code": 422001, "error_message": "bad input"}, "uncertain"),
        (504, {"error_code": 500001, "error_message": "retry"}, "uncertain"),
        (200, {"request_id": "r/../../x" + "y" * 100_000}, "uncertain"),
        (200, {"request_id": 12345}, "uncertain"),
    ],
)
async def test_an_answer_that_may_mean_accepted_is_never_sent_again(
    tmp_path: Path, status: int, body: dict[str, object], phase: str
) -> None:
    posts: list[httpx2.Request] = []

    def api(request: httpx2.Request) -> httpx2.Response:
        if request.method == "POST":
            posts.append(request)
            return httpx2.Response(status, json=body)
        return httpx2.Response(200, json={"request_id": "r-1", "status": "in_progress"})

    manifest = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 1))
    for _ in range(2):
        options = fast_options(api_transport=httpx2.MockTransport(api), output_dir=tmp_path / "out", timeout=0.5)
        await run_manifest(manifest, options)
    assert len(posts) == 1
    (record,) = read_journal(tmp_path / "out" / JOURNAL_NAME).records.values()
    assert record.phase == phase and record.submits == 1
    if phase == "submitted":
        assert record.request_id == "r-1"


# -- issue 23: the submit rule, as RunComfy's own clients read an answer -------------------------------------


@pytest.mark.parametrize(
    "fault",
    ["accept_503", "accept_500001", "502", "accept_empty", "accept_list", "accept_no_id", "drop_after_accept"],
    ids=["bare-503", "500-500001", "502-with-body", "empty-200", "list-200", "200-without-id", "reset-after-body"],
)
def test_an_accepted_submit_answered_as_unknown_is_sent_once_until_asked(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox, fault: str
) -> None:
    """The server takes (and charges) each job, creates the request, then answers so: RunComfy's nodes call each
    of these "Submission could not be confirmed" and never send again. Exactly one POST a job after a run and a
    plain rerun; two only with --resubmit-uncertain. 503 and 500001 were read as "not accepted" and resent."""
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2, quality="high")
    sandbox = start_sandbox(fault_rate=1.0, faults=(fault,), fault_paths=("submit",))
    server = sandbox.sandbox
    every = {f"prompt number {i}": 1 for i in range(2)}
    # --timeout: an answer read as "not now" would be sent again for as long as the run lasts.
    args = [str(manifest), "--api-base", sandbox.url, "-o", "out", "--timeout", "20"]
    first = _run(runner, *args)
    assert first.exit_code == 1, first.output
    assert _submits_per_job(sandbox) == every and not any(s.answered for s in server.submits)
    summary = " ".join(first.output.split())
    assert "2 uncertain" in summary and "could cost up to $0.27 more" in summary, summary
    assert "--resubmit-uncertain" in summary
    assert _categories(tmp_path / "out") == {"uncertain": 2}

    again = _run(runner, *args)
    assert again.exit_code == 1, again.output
    assert _submits_per_job(sandbox) == every, "a plain rerun sends no uncertain job again"

    server.config.fault_rate = 0.0
    asked = _run(runner, *args, "--resubmit-uncertain")
    assert asked.exit_code == 0, asked.output
    assert _submits_per_job(sandbox) == {prompt: 2 for prompt in every}
    assert _categories(tmp_path / "out") == {"done": 2}


def _in_progress_with_an_error(data: bytes) -> bytes:
    answer = json.loads(data)
    answer.update(status="in_progress", output=None, error="worker restarted, retrying on another GPU")
    return json.dumps(answer).encode()


def test_an_error_text_beside_in_progress_is_journalled_not_a_failure(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """RunComfy's CLI reads `error` only on a failed status: the job finishes as done, the text is kept."""
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    with fault_proxy(sandbox.url) as proxy:
        proxy.faults.append(Fault(_result_polls, 2, "edit", _in_progress_with_an_error))
        _through(proxy, sandbox)
        result = _run(runner, str(manifest), "--api-base", proxy.url, "-o", "out")
    assert result.exit_code == 0, result.output
    assert _categories(tmp_path / "out") == {"done": 1}
    events = [json.loads(line) for line in (tmp_path / "out" / JOURNAL_NAME).read_text().splitlines()]
    said = [e for e in events if e["e"] == "state" and e.get("error")]
    assert said and said[0]["state"] == "in_progress"
    assert said[0]["error"] == "worker restarted, retrying on another GPU"
    assert not [e for e in events if e["e"] == "failed"]
    assert len(sandbox.sandbox.submits) == 1


def test_a_408_on_a_poll_is_asked_again_in_the_same_run(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """RunComfy's CLI counts 408 with 429 as retryable (src/exit.rs): one 408 no longer holds a paid job."""
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    with fault_proxy(sandbox.url) as proxy:
        proxy.faults.append(Fault(_result_polls, 1, "408"))
        _through(proxy, sandbox)
        result = _run(runner, str(manifest), "--api-base", proxy.url, "-o", "out")
        assert ("GET", next(p for m, p, k in proxy.seen if k == "408"), "408") in proxy.seen
    assert result.exit_code == 0, result.output
    assert _categories(tmp_path / "out") == {"done": 1}
    assert len(sandbox.sandbox.submits) == 1


def _result_polls(method: str, path: str, body: bytes) -> bool:
    return method == "GET" and "/result" in path


def _through(proxy: FaultProxy, sandbox: SandboxThread) -> None:
    """Every other answer's URLs name the proxy, not the sandbox: downloads reach only the API base's origin."""
    origin, own = sandbox.url.encode(), proxy.url.encode()
    proxy.faults.append(Fault(lambda m, p, b: True, 10**9, "edit", lambda data: data.replace(origin, own)))


# -- found by the adversarial review ------------------------------------------------------------------------------


def test_a_renamed_or_copied_manifest_does_not_pay_again(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 3)
    sandbox = start_sandbox()
    assert _run(runner, str(manifest), "--api-base", sandbox.url).exit_code == 0
    renamed = tmp_path / "m-v2.yaml"
    manifest.rename(renamed)
    result = _run(runner, str(renamed), "--api-base", sandbox.url)
    assert result.exit_code == 2, result.output
    assert str(tmp_path / "output" / "m") in result.output and len(sandbox.sandbox.submits) == 3


def test_a_moved_output_folder_is_missed_not_paid_again(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 3)
    sandbox = start_sandbox()
    assert _run(runner, str(manifest), "--api-base", sandbox.url).exit_code == 0
    (tmp_path / "output" / "m").rename(tmp_path / "archive")
    result = _run(runner, str(manifest), "--api-base", sandbox.url)
    assert (
        result.exit_code == 2
        and "is gone" in result.output.replace("journal is gone", "is gone")
        and "--new-output" in result.output
    ), result.output
    moved = _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "archive")
    assert moved.exit_code == 0 and len(sandbox.sandbox.submits) == 3, moved.output


@pytest.mark.slow
def test_jobs_edited_away_while_in_flight_are_still_finished(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    sandbox = start_sandbox(queue_delay=2.0, run_delay=0.2)
    assert _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out", "--timeout", "1").exit_code == 1
    manifest.write_text(manifest.read_text().replace("prompt number", "an edited prompt"))
    result = _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out")
    assert result.exit_code == 0, result.output
    assert "2 no longer in the manifest but paid for, to finish" in result.output
    records = read_journal(tmp_path / "out" / JOURNAL_NAME).records.values()
    assert len(records) == 4 and all(r.downloaded for r in records)  # the paid-for old ones too
    assert len(sandbox.sandbox.submits) == 4


def test_jobs_refused_for_balance_are_their_own_count_and_still_to_spend(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 4)  # $0.009 each
    sandbox = start_sandbox(balance_usd=0.02)
    result = _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out", "-c", "1", "--over-balance")
    assert result.exit_code == 1 and "refused" in result.output and "--retry-failed" not in result.output
    status = json.loads(runner.invoke(cli, ["status", str(manifest), "-o", "out", "--json"]).output)
    assert status["counts"]["refused"] == 1 and status["counts"]["pending"] == 1 and status["counts"]["done"] == 2
    assert status["to_spend"] == pytest.approx(2 * 0.009)


# -- found by the second review ---------------------------------------------------------------------------------------


def test_jobs_edited_away_while_queued_are_cancelled_too(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    sandbox = start_sandbox(queue_delay=60.0)
    assert _run(runner, str(manifest), "--api-base", sandbox.url, "-o", "out", "--timeout", "1").exit_code == 1
    manifest.write_text(manifest.read_text().replace("prompt number", "an edited prompt"))
    result = runner.invoke(cli, ["cancel", str(manifest), "--api-base", sandbox.url, "-o", "out"])
    assert result.exit_code == 0 and "cancelled 2 jobs" in result.output, result.output


def test_another_project_with_a_manifest_of_the_same_name_is_not_blocked(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox()
    (tmp_path / "p1").mkdir()
    (tmp_path / "p2").mkdir()
    first = many_jobs_manifest(tmp_path / "p1" / "london.yaml", 1)
    assert _run(runner, str(first), "--api-base", sandbox.url).exit_code == 0
    import shutil

    shutil.rmtree(tmp_path / "p1")
    second = many_jobs_manifest(tmp_path / "p2" / "london.yaml", 2, quality="medium")
    result = _run(runner, str(second), "--api-base", sandbox.url)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("live", [0.0, 0.01])
async def test_a_live_price_below_the_bundled_one_never_lowers_the_estimates(
    tmp_path: Path, start_sandbox: StartSandbox, live: float
) -> None:
    from batcher.engine.runner import RunPlan

    sandbox = start_sandbox(model_price=live)
    seen: list[RunPlan] = []
    manifest = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 2, quality="high"))
    options = fast_options(api_base=sandbox.url, output_dir=tmp_path / "out", live_prices=True, max_cost=0.2)
    summary = await run_manifest(manifest, options, on_plan=seen.append)
    assert seen[0].estimate == pytest.approx(2 * 0.133)
    assert len(sandbox.sandbox.submits) == 1 and summary.stop_kind == "budget"  # the cap still bites


async def test_server_text_in_the_live_price_is_made_printable(tmp_path: Path) -> None:
    from batcher.engine.runner import RunPlan

    def api(request: httpx2.Request) -> httpx2.Response:
        if request.url.path.startswith("/v1/models/"):
            evil = "output\x1b]0;PWNED\x07\x1b[2J"
            return httpx2.Response(200, json={"base_price_usd": 0.266, "price_unit": evil, "pricing_note": evil})
        return httpx2.Response(503)

    seen: list[RunPlan] = []
    manifest = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 1))
    options = fast_options(
        api_transport=httpx2.MockTransport(api), output_dir=tmp_path / "out", live_prices=True, timeout=1
    )
    await run_manifest(manifest, options, on_plan=seen.append)
    table = (tmp_path / "out" / ".prices" / "openai" / "gpt-image-1-5" / "image-to-image.pricing.json").read_text()
    said = " ".join(seen[0].prices)
    assert "\x1b" not in said and "\\u001b" not in table and "PWNED" not in table and "per output" in said


# -- a prompt file edited during a run -----------------------------------------------------------


async def test_a_prompt_file_edited_during_a_run_stops_it_and_nothing_is_sent_twice(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """A run reads its jobs again to feed them (it holds keys, not jobs): rows inserted at the top of the
    prompt file in between must not make one job's plan apply to another (found by review: paid twice)."""
    rows = tmp_path / "rows.csv"
    rows.write_text("id,prompt\n" + "".join(f"r{i:02d},prompt {i}\n" for i in range(8)))
    path = tmp_path / "m.yaml"
    path.write_text(
        "model: openai/gpt-image-1-5/image-to-image\n"
        "jobs:\n  - from: rows.csv\n    image_urls: ['https://example.org/ref.jpg']\n"
    )
    sandbox = start_sandbox()
    options = fast_options(api_base=sandbox.url, output_dir=tmp_path / "out")
    first = await run_manifest(
        load_manifest(path), fast_options(api_base=sandbox.url, output_dir=tmp_path / "out", limit=4)
    )
    assert first.done == 4

    def edit(_plan: object) -> None:  # after the plan, before the jobs are fed: new rows on top
        rows.write_text("id,prompt\n" + "".join(f"n{i:02d},new {i}\n" for i in range(4)) + rows.read_text()[10:])

    with pytest.raises(ManifestChangedError, match="changed while the run was reading them again"):
        await run_manifest(load_manifest(path), options, on_plan=edit)
    assert max(_submits_per_job(sandbox).values()) == 1, "no job is paid for twice"

    again = await run_manifest(load_manifest(path), options)  # the file as it is now: the rest, once each
    assert again.exit_code == 0
    submits = _submits_per_job(sandbox)
    assert max(submits.values()) == 1 and len(submits) == 12


@pytest.mark.parametrize(
    ("variable", "value"),
    [("RUNCOMFY_API_TOKEN", "SECRETXYZ\nabc"), ("RUNCOMFY_API_TOKENS", "tokenAAAA,SECRET\u00e99999")],
)
def test_a_token_no_http_header_can_carry_is_bad_input_not_uncertain_submits(
    runner: CliRunner,
    tmp_path: Path,
    start_sandbox: StartSandbox,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
) -> None:
    """Found by review: a newline in the token failed in h11 before sending, and every job was journalled
    'uncertain'; a non-ASCII one was a traceback."""
    monkeypatch.delenv("RUNCOMFY_API_TOKEN", raising=False)
    monkeypatch.setenv(variable, value)
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    result = _run(runner, str(manifest), "--api-base", sandbox.url, "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "non-ASCII" in result.output and "Traceback" not in result.output
    assert "SECRET" not in result.output
    assert not sandbox.sandbox.submits and not (tmp_path / "out" / JOURNAL_NAME).exists()


def test_plan_sends_no_token_to_an_api_base_a_journal_names(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: `plan` took the API base from the folder's journal (a file anyone could commit)
    and asked it for prices with the user's token."""
    from batcher.journal.store import Journal

    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    journal = Journal(tmp_path / "out")
    journal.open()
    journal.append("run", manifest=str(manifest), api_base="https://192.0.2.2:18801", jobs=2)
    journal.close()
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "tok-" + "x" * 20)
    result = runner.invoke(cli, ["plan", str(manifest), "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "this folder's runs used https://192.0.2.2:18801" in result.output
    assert "account balance:" not in result.output and "price:" not in result.output


@pytest.mark.parametrize("command", ["review", "export"])
def test_review_and_export_of_an_object_storage_output_are_bad_input(
    runner: CliRunner, tmp_path: Path, command: str
) -> None:
    """Found by review: an s3:// output reached code that reads a local folder (a traceback)."""
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    args = [
        command,
        str(manifest),
        *([str(tmp_path / "dest")] if command == "export" else []),
        "-o",
        "s3://my-bucket/run",
    ]
    result = runner.invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert "works on a local output folder" in result.output
