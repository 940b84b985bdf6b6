"""Every hint true, every hint a whole command: what a person is told after a rehearsal, a failure or a prompt,
driven through the real CLI against the sandbox."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from batcher import SandboxThread, load_manifest, run_manifest
from batcher.cli.main import cli
from batcher.engine.progress import RunProgress
from batcher.engine.runner import RunPlan

from .conftest import TOKEN, fast_options, many_jobs_manifest

StartSandbox = Callable[..., SandboxThread]
FAST = ["--poll-interval", "0.05", "--poll-max", "0.1", "--retries", "3", "-q"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _run(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(cli, ["run", *FAST, *args], catch_exceptions=False)


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_after_a_rehearsal_every_plain_command_says_where_it_is_with_the_command(
    runner: CliRunner, tmp_path: Path
) -> None:
    """Found by a newcomer: after `run --sandbox`, plain `status` said `pending 4`, `report` "nothing to report
    (run the manifest first)": the hint looked only in the per-user ledger, where rehearsals are never noted."""
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    assert _run(runner, str(manifest), "--sandbox").exit_code == 0
    rehearsal = tmp_path / "output" / "sandbox" / "m"
    for command, extra in (
        ("status", []),
        ("plan", []),
        ("report", []),
        ("review", []),
        ("export", [str(tmp_path / "ds")]),
        ("cancel", []),
    ):
        result = runner.invoke(cli, [command, str(manifest), *extra], catch_exceptions=False)
        said = _flat(result.output)
        assert f"the sandbox rehearsal's is in {rehearsal}" in said, (command, result.output)
        assert f" {command} {manifest} {' '.join(extra)}{' ' if extra else ''}--sandbox" in said, (command, said)
        assert "no API token" not in said  # cancel: said before any token is asked for
        # The command printed works: the same command with --sandbox finds the rehearsal.
        if command in ("status", "plan", "report"):
            again = runner.invoke(cli, [command, str(manifest), *extra, "--sandbox"], catch_exceptions=False)
            assert again.exit_code == 0 and "rehearsal's is in" not in again.output, again.output


@pytest.mark.slow
def test_a_rehearsal_is_priced_as_the_sandbox_s_alike_in_every_view(runner: CliRunner, tmp_path: Path) -> None:
    """`plan --sandbox` called the sandbox's price "RunComfy's live price" and told a user with no token to give
    --api-base; the same sharded folder called it "RunComfy's playground page"."""
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 4)
    assert _run(runner, str(manifest), "--sandbox", "--limit", "1").exit_code == 0
    plan = _flat(runner.invoke(cli, ["plan", str(manifest), "--sandbox"], catch_exceptions=False).output)
    assert "the sandbox's live price (GET /v1/models/" in plan, plan
    assert "RunComfy's live price" not in plan and "give --api-base" not in plan

    sharded = tmp_path / "sharded.yaml"
    sharded.write_text(manifest.read_text(encoding="utf-8"), encoding="utf-8")
    assert _run(runner, str(sharded), "--sandbox", "--shard", "1/2").exit_code == 0
    labels = []
    for extra in ([], ["--shard", "1/2"]):
        out = _flat(runner.invoke(cli, ["plan", str(sharded), "--sandbox", *extra], catch_exceptions=False).output)
        labels.append(out[out.index("(prices: ") :])
        assert "the sandbox's live price (GET /v1/models/" in out and "playground page" not in out, out
    assert labels[0] == labels[1]


def test_a_loopback_rehearsal_never_asks_to_spend(tmp_path: Path, start_sandbox: StartSandbox) -> None:
    """On a terminal, a run against `batcher sandbox` said "sandbox: nothing is charged" and then asked
    `Spend about $7.98? [y/N]`."""
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    server = start_sandbox()
    env = {**os.environ, "RUNCOMFY_API_TOKEN": TOKEN, "PYTHONPATH": str(Path(__file__).parents[1])}
    words = [sys.executable, "-m", "batcher", "run", str(manifest), "--api-base", server.url, "--confirm-above", "0"]
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [*words, *FAST[:-1]], stdin=follower, stdout=follower, stderr=follower, env=env, cwd=tmp_path
    )
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 60
    try:
        while process.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(leader, 65536)
                except OSError:
                    break
            if b"Spend about" in seen:
                os.write(leader, b"n\n")  # the old question: answered, so the test ends
                break
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)
    said = seen.decode(errors="replace")
    assert "nothing is charged" in said, said
    assert "Spend about" not in said
    assert process.returncode == 0, said


@pytest.mark.slow
async def test_time_at_the_prompt_is_not_counted_as_the_run_s(tmp_path: Path) -> None:
    """The wait at `Spend about $X? [y/N]` counted into "elapsed" and jobs/min."""
    manifest = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 1))
    clocks: list[float] = []

    def on_plan(_plan: RunPlan) -> None:
        time.sleep(1.0)  # a person reading the question

    def on_start(progress: RunProgress) -> None:
        clocks.append(progress.elapsed)

    await run_manifest(manifest, fast_options(sandbox=True, token=None), on_plan=on_plan, on_start=on_start)
    assert clocks and clocks[0] < 0.5, clocks


def test_failures_are_sentences_with_their_class_and_whole_commands(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After failures: "run again with --retry-failed…" without the command, and the error as raw JSON."""
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    server = start_sandbox(fail_rate=1.0)
    result = _run(runner, str(manifest), "--api-base", server.url, "-o", "out")
    said = _flat(result.output)
    assert "[model_error] sandbox: the model failed on this input" in said, said
    assert '{"message"' not in said
    assert f"run {manifest.resolve()} -o {tmp_path / 'out'} --api-base {server.url} --retry-failed" in said, said
    status = _flat(runner.invoke(cli, ["status", str(manifest), "-o", "out"], catch_exceptions=False).output)
    assert "[model_error] sandbox: the model failed on this input" in status and '{"message"' not in status
    assert f"run: {status.split('run: ')[1].split(' --retry-failed')[0]}" in status
    assert f"run {manifest} -o out --retry-failed" in status, status


def test_one_job_is_counted_in_the_singular(runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox) -> None:
    """ "1 of these jobs were already submitted", "will submit 1 job(s)"."""
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    server = start_sandbox()
    env = {"RUNCOMFY_API_TOKEN": TOKEN}
    first = runner.invoke(cli, ["run", *FAST[:-1], str(manifest), "--api-base", server.url, "-o", "a"], env=env)
    assert first.exit_code == 0 and "will submit 1 job (" in first.output, first.output
    second = runner.invoke(cli, ["run", *FAST, str(manifest), "--api-base", server.url, "-o", "b"], env=env)
    assert second.exit_code == 2
    assert "1 of these jobs was already submitted" in _flat(second.output), second.output


# -- the live display and -v -----------------------------------------------------------------------------


def _on_a_terminal(words: list[str], cwd: Path, columns: int = 80) -> tuple[int, str]:
    """Run words on a pseudo-terminal `columns` wide; its exit code and everything it showed, escapes removed."""
    import fcntl
    import re
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "COLUMNS": str(columns), "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(words, stdin=follower, stdout=follower, stderr=follower, env=env, cwd=cwd)
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
            elif process.poll() is not None:
                break
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)
    text = re.sub(r"\x1b\[[0-9;]*m", "", seen.decode(errors="replace"))  # colours: gone, the text stays whole
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "\n", text)  # cursor moves: line ends
    return process.returncode, text


@pytest.mark.slow
def test_the_live_line_fits_80_columns_and_shows_jobs_running(tmp_path: Path) -> None:
    """At 80 columns the live line was cut (`…176 pending  8 que`); an in-process sandbox run showed every job
    "queued, 0 running" until done: its jobs wait 0.3 s and run 0.7 s, and a 1 s poll never saw one running."""
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 40)
    code, shown = _on_a_terminal([sys.executable, "-m", "batcher", "run", str(manifest), "--sandbox"], tmp_path)
    assert code == 0, shown
    counts = [line.strip() for line in shown.replace("\r", "\n").split("\n") if re.search(r"\d+/40  ", line)]
    assert counts, shown
    for line in counts:
        assert len(line) <= 80 and re.search(r"(downloading|dl\.)$", line), line  # whole, its last count too
    journal = (tmp_path / "output" / "sandbox" / "m" / "state.jsonl").read_text()
    assert journal.count('"state":"in_progress"') >= 20  # RunComfy's (the sandbox's) running state, seen


def test_verbose_submit_lines_name_the_job_and_the_request(runner: CliRunner, tmp_path: Path) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    result = runner.invoke(cli, ["run", str(manifest), "--sandbox", "-v"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "submit openai/" in line]
    assert len(lines) == 2, result.output
    for name, line in zip(("job-0000", "job-0001"), sorted(lines), strict=True):
        assert re.search(rf"submit openai/gpt-image-1-5/image-to-image job {name}: HTTP 200, request sbx-\S+ in ", line)
