"""Every shell command README.md shows runs, as written, in order, in one fresh bash.

The rule, read from README.md:

- A command is a line of a fenced block whose info string is ``bash``, ``sh`` or ``console``. In ``bash`` and
  ``sh`` blocks every line that is not blank and not a comment is a command (a line ending in ``\\`` goes on
  to the next); in ``console`` blocks only lines starting ``$ `` are, without the ``$ ``. Other blocks
  (``yaml``, ``python``, ``text``, …) are never run, nor is inline code in the prose.
- A command is split at `` && ``. A part in `SKIPPED` (installing, making the virtual environment, running
  this very suite) is not run, by name; any other part that installs (``pip install``, ``-m venv``) fails the
  test instead of being run, so a new install line has to be added to `SKIPPED` on purpose. Everything else runs.
- Each command must exit 0, or N when its comment says ``exits N``.
- A command whose comment says ``Ctrl-C to stop`` is a server a person uses and then stops: it is started in
  the background, the test plays the person (for ``batcher review``: the page's items are read and the first
  image is rejected, the others accepted, through the page's own API with its session token), then it gets
  Ctrl-C (SIGINT) and must exit 0.
- Commands under the heading ``## The real run`` and after it run with ``RUNCOMFY_API_TOKEN`` set to a fake
  token and ``RUNCOMFY_API_BASE`` pointing at a ``batcher sandbox`` the test starts on loopback, so "the real
  run" runs as written without reaching RunComfy.

The shell starts in a scratch copy of the repository's ``manifests/`` (no ``.git`` above it, so outputs land in
the copy's ``output/``), with a ``.venv/bin`` made by the test: ``batcher`` and ``python`` there run the current interpreter
(``python -m batcher``, this checkout first on PYTHONPATH) and ``activate`` puts that folder on PATH, so "Try it"'s
``.venv/bin/batcher`` and ``source .venv/bin/activate`` work as written, and plain ``batcher`` works only after
the README activates it (no folder holding a ``batcher`` is on the PATH the shell starts with). HOME and the XDG folders are the scratch folder's, so the ledger is the test's own. The
copy's reference image URLs point at the test's sandbox (``/inputs/…``), so ``review`` fetches its inputs on
loopback, never from the internet.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

SKIPPED = {
    "python3 -m venv .venv": "makes the virtual environment: the test runs in the current one",
    ".venv/bin/pip install -e .": "installs batcher: the current environment has it",
    ".venv/bin/pip install -e '.[test]'": "installs the test tools: the current environment has them",
    ".venv/bin/python -m pytest": "the test suite itself: it is running",
}
"""Parts of README commands (split at ``&&``) that are not run, each with why."""

INSTALLS = re.compile(r"\bpip install\b|-m venv\b")
REAL_RUN = "## The real run"
SHELLS = {"bash", "sh", "console"}
FAKE_TOKEN = "rc-readme-test-token"


@dataclass
class Command:
    line: int
    text: str
    expected: int
    interactive: bool
    real: bool


def readme_commands(text: str) -> list[Command]:
    """The shell commands of a README, in order, by the rule above."""
    commands: list[Command] = []
    fence: str | None = None
    real = False
    pending: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence = stripped[3:].strip().split(" ")[0].lower()
            elif line.startswith("## "):
                real = real or line.startswith(REAL_RUN)
            continue
        if stripped.startswith("```"):
            fence = None
            continue
        if fence not in SHELLS:
            continue
        if not pending:
            if fence == "console":
                if not stripped.startswith("$ "):
                    continue
                stripped = stripped[2:]
            elif not stripped or stripped.startswith("#"):
                continue
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        whole = " ".join([*pending, stripped])
        pending = []
        comment = whole.partition(" # ")[2]
        found = re.search(r"\bexits (\d+)", comment)
        commands.append(Command(start, whole, int(found.group(1)) if found else 0, "Ctrl-C to stop" in comment, real))
    return commands


def runnable(command: Command) -> str | None:
    """The command without its comment and its skipped parts (None when nothing is left), or AssertionError
    for an install line that is not in `SKIPPED`."""
    kept = []
    for part in command.text.partition(" # ")[0].split(" && "):
        words = part.strip()
        if words in SKIPPED:
            continue
        assert not INSTALLS.search(words), (
            f"README.md:{command.line}: {words!r} installs something; add it to SKIPPED in {__file__} with why"
        )
        kept.append(words)
    return " && ".join(kept) if kept else None


PERSON = textwrap.dedent(
    """
    # The person at the review page: read the items, reject the first image, accept the others.
    import json, re, sys, time, urllib.request
    log = sys.argv[1]
    deadline = time.monotonic() + 60
    while True:
        found = re.search(r"review: (http://[^/\\s]+)/\\?t=(\\S+)", open(log, encoding="utf-8").read())
        if found:
            break
        if time.monotonic() > deadline:
            sys.exit("no review address in 60 s: " + open(log, encoding="utf-8").read())
        time.sleep(0.1)
    origin, token = found.groups()
    with urllib.request.urlopen(f"{origin}/?t={token}", timeout=30) as page:
        assert page.status == 200 and b"<html" in page.read().lower()
    with urllib.request.urlopen(f"{origin}/api/items?t={token}", timeout=30) as answer:
        items = json.load(answer)["items"]
    assert items, "the review page lists no images"
    for number, item in enumerate(items):
        body = {"key": item["k"], "index": item["i"], "sha256": item["sha"],
                "decision": "rejected" if number == 0 else "accepted"}
        request = urllib.request.Request(
            f"{origin}/api/decisions", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", "X-Batcher-Token": token})
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert json.load(answer) == {"ok": True}
    print(f"person: {len(items)} image(s) decided, the first rejected")
    """
)


def script(commands: list[Command], *, python: str, api_base: str) -> str:
    lines = ["set -u", "set +m"]
    real = False
    for number, command in enumerate(commands, 1):
        text = runnable(command)
        if text is None:
            continue
        if command.real and not real:
            real = True
            lines.append(f"export RUNCOMFY_API_TOKEN={FAKE_TOKEN} RUNCOMFY_API_BASE={shlex.quote(api_base)}")
        where = f"README.md:{command.line}"
        lines.append(f"printf '\\n::: %s $ %s\\n' {where} {shlex.quote(text)}")
        failed = f"{{ echo {shlex.quote(f'{where}: exited ')}$rc{shlex.quote(f', expected {command.expected}: {text}')} >&2; exit 99; }}"
        if command.interactive:
            log = f"interactive-{number}.log"
            lines += [
                "set -m",
                f"{text} >{log} 2>&1 &",
                "pid=$!",
                "set +m",
                "echo $pid >>interactive.pids",
                f"{shlex.quote(python)} person.py {log} || {{ cat {log} >&2; kill -INT -- -$pid; exit 98; }}",
                "kill -INT -- -$pid",
                "for _ in $(seq 300); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done",
                f"kill -0 $pid 2>/dev/null && {{ cat {log} >&2; echo {shlex.quote(where + ': still running 30 s after Ctrl-C')} >&2; exit 97; }}",
                "wait $pid; rc=$?",
                f"cat {log}",
            ]
        else:
            lines += [text, "rc=$?"]
        lines.append(f"[ $rc -eq {command.expected} ] || {failed}")
    lines.append("echo '::: every README command ran'")
    return "\n".join(lines) + "\n"


def _fresh_path(venv_bin: Path) -> str:
    """PATH without the current environment's bin, nor any folder holding a `batcher`."""
    kept = [
        entry
        for entry in os.environ.get("PATH", os.defpath).split(os.pathsep)
        if entry and Path(entry).resolve() != venv_bin.resolve() and not (Path(entry) / "batcher").exists()
    ]
    return os.pathsep.join(kept)


def _start_sandbox(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "batcher", "sandbox", "--port", "0", "--queue-delay", "0.1", "--run-delay", "0.2"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert process.stderr is not None
    line = process.stderr.readline()
    found = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
    if not found:
        process.kill()
        process.communicate()
        pytest.fail(f"the sandbox did not start: {line}")
    return process, found.group(1)


def _stop_left_over(pids: Path) -> None:
    """The servers the script started in the background (their own process groups), if any outlived it."""
    for pid in pids.read_text().split() if pids.exists() else []:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(pid), signal.SIGKILL)


def _scratch(work: Path, api_base: str) -> None:
    """The scratch project: manifests/ with reference images on the test's sandbox, and a .venv/bin."""
    shutil.copytree(ROOT / "manifests", work / "manifests")
    for path in (work / "manifests").iterdir():
        if path.suffix in {".yaml", ".csv"}:
            text = re.sub(r"https://[^\s\"',\]]+\.(?:jpg|png)", f"{api_base}/inputs/reference.png", path.read_text())
            path.write_text(text)
    bin_dir = work / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    # Small scripts, never links: nothing the shell does in .venv can reach the real environment.
    python = shlex.quote(sys.executable)
    for name, line in (("batcher", f"exec {python} -m batcher"), ("python", f"exec {python}")):
        wrapper = bin_dir / name
        wrapper.write_text(f'#!/bin/sh\n{line} "$@"\n')
        wrapper.chmod(0o755)
    venv = shlex.quote(str(work / ".venv"))
    (bin_dir / "activate").write_text(
        f'VIRTUAL_ENV={venv}\nexport VIRTUAL_ENV\nPATH="$VIRTUAL_ENV/bin:$PATH"\nexport PATH\n'
    )
    (work / "person.py").write_text(PERSON)


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= 10, commands
    home = tmp_path / "home"
    home.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RUNCOMFY_", "BATCHER_", "XDG_", "VIRTUAL_ENV", "PYTEST", "COV_"))
    }
    env.update(
        HOME=str(home),
        XDG_STATE_HOME=str(home / ".local" / "state"),
        XDG_CACHE_HOME=str(home / ".cache"),
        PATH=_fresh_path(Path(sys.executable).parent),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        COLUMNS="100",
    )
    work = tmp_path / "project"
    work.mkdir()
    sandbox, api_base = _start_sandbox(env)
    try:
        _scratch(work, api_base)
        (work / "readme.sh").write_text(script(commands, python=sys.executable, api_base=api_base))
        started = time.monotonic()
        result = subprocess.run(
            ["bash", "--noprofile", "--norc", "readme.sh"],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
        )
        took = time.monotonic() - started
    finally:
        _stop_left_over(work / "interactive.pids")
        sandbox.send_signal(signal.SIGINT)
        try:
            sandbox.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            sandbox.kill()
            sandbox.communicate()
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
    assert "every README command ran" in result.stdout
    print(f"{len(commands)} README commands in {took:.1f} s")
    # What the walkthrough promises, seen in the files it leaves.
    assert (work / "output" / "sandbox" / "london" / "index.html").is_file()
    assert (work / "output" / "london" / "index.html").is_file()
    assert (work / "output" / "datasets" / "london" / "shard-000000.tar").is_file()
    assert (work / "output" / "datasets" / "london-rehearsal" / "metadata.jsonl").is_file()


def test_the_readme_runs_the_tests_as_ci_does() -> None:
    """The README's test command is the one .ci/run uses, so "Test it" is what CI runs."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    shown = [
        part.strip()
        for command in readme_commands(README.read_text(encoding="utf-8"))
        for part in command.text.split(" && ")
        if "-m pytest" in part
    ]
    assert shown, "README.md shows no test command"
    ci_lines = {line.strip() for line in ci.splitlines()}
    for command in shown:
        assert command in ci_lines, f"README.md's {command!r} is not the test command of .ci/run"


def test_the_readme_is_a_guide_not_a_manual() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 350


def test_the_rule_reads_blocks_as_documented() -> None:
    text = textwrap.dedent(
        """\
        ```bash
        # a comment
        echo one   # exits 3
        echo two \\
          three
        ```
        ```yaml
        not: run
        ```
        ## The real run
        ```console
        $ echo four   # a server; Ctrl-C to stop
        output line
        ```
        """
    )
    commands = readme_commands(text)
    assert [(c.text, c.expected, c.interactive, c.real) for c in commands] == [
        ("echo one   # exits 3", 3, False, False),
        ("echo two  three", 0, False, False),
        ("echo four   # a server; Ctrl-C to stop", 0, True, True),
    ]
    with pytest.raises(AssertionError, match="SKIPPED"):
        runnable(Command(1, "pip install x && echo ok", 0, False, False))
    assert runnable(Command(1, "python3 -m venv .venv && .venv/bin/batcher run x", 0, False, False)) == (
        ".venv/bin/batcher run x"
    )
