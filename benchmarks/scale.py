"""Whole commands at 100,000 and 1,000,000 jobs: what a person waits for, and the memory it takes.

    python benchmarks/scale.py                                  # 100k CSV, 100k YAML, 1M CSV, resume
    python benchmarks/scale.py --sizes 100000 --no-resume        # quicker
    python benchmarks/scale.py --before /tmp/old                 # an earlier checkout too, alternating

Each command runs as `python -m batcher ...` in a process of its own; the table gives its wall seconds to
exit and its peak RSS (the kernel's, from wait4). `run` is `run --sandbox --limit 1` (a trial of one job
against the in-process sandbox, to exit); `status` and `report` then read that run's folder.

resume: a 100,000-job run (CSV prompt file) against a `batcher sandbox` process with zero delays is
SIGKILLed once half its jobs were submitted; `batcher run` on that folder is timed from its start to its
first new submit reaching the sandbox (the journal folded, the plan made, the paid jobs queued), with its
peak RSS at that moment (VmHWM); then `run --limit 1` on another copy, to its exit. The killed folder is made
once (with this checkout) and copied for each checkout measured; --killed DIR keeps it for a later bench run
(killing a 100,000-job run takes ~13 minutes on 2 cores).

Machines here are shared and noisy: compare figures from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "openai/gpt-image-1-5/image-to-image"
REF = "https://example.org/ref.jpg"
COMMANDS = ("validate", "plan", "run", "status", "report")


def write_prompt_file(folder: Path, rows: int) -> Path:
    with (folder / f"prompts{rows}.csv").open("w") as out:
        out.write("id,prompt,quality\n")
        for i in range(rows):
            out.write(f"row-{i:07d},benchmark prompt number {i} with a few more words,{('low', 'medium')[i % 2]}\n")
    manifest = folder / f"csv{rows}.yaml"
    manifest.write_text(f"model: {MODEL}\njobs:\n  - from: prompts{rows}.csv\n    image_urls: ['{REF}']\n")
    return manifest


def write_yaml_list(folder: Path, jobs: int) -> Path:
    manifest = folder / f"yaml{jobs}.yaml"
    with manifest.open("w") as out:
        out.write(f"model: {MODEL}\ndefaults:\n  quality: low\n  image_urls: ['{REF}']\njobs:\n")
        for i in range(jobs):
            out.write(f"  - id: job-{i:07d}\n    prompt: 'benchmark prompt {i}'\n")
    return manifest


def environment(root: str, state: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = root
    env["XDG_STATE_HOME"] = str(state)  # runs of one manifest into several folders: not the user's ledger
    env["RUNCOMFY_API_TOKEN"] = "bench-token-0001"
    env.pop("BATCHER_LEDGER", None)
    return env


def timed(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, int]:
    """Wall seconds to exit, peak RSS in MB, exit code."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    errors = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        print(f"  ! {' '.join(command[3:])} exited {process.returncode}: {errors.decode()[-400:]}", file=sys.stderr)
    return wall, usage.ru_maxrss / 1024, process.returncode


def command_line(name: str, manifest: Path, out: Path) -> list[str]:
    batcher = [sys.executable, "-m", "batcher"]
    if name == "validate":
        return [*batcher, "validate", str(manifest)]
    if name == "plan":
        return [*batcher, "plan", str(manifest), "--sandbox", "-o", str(out)]
    if name == "run":
        return [*batcher, "run", str(manifest), "--sandbox", "--limit", "1", "-o", str(out), "-y", "-q"]
    return [*batcher, name, str(manifest), "--sandbox", "-o", str(out)]


class SandboxProcess:
    def __init__(self, root: str, env: dict[str, str], *flags: str) -> None:
        command = [sys.executable, "-m", "batcher", "sandbox", "--port", "0", *flags]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=root, env=env)
        assert self.process.stderr is not None
        self.url = self.process.stderr.readline().split(" at ")[1].split()[0]

    def submits(self) -> int:
        with urllib.request.urlopen(f"{self.url}/_sandbox/stats", timeout=10) as answer:
            return int(json.load(answer)["calls"].get("submit", 0))

    def close(self) -> None:
        self.process.terminate()
        self.process.communicate(timeout=10)


def vm_hwm(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_command(root: str, env: dict[str, str], manifest: Path, out: Path, url: str) -> list[str]:
    return [
        sys.executable, "-m", "batcher", "run", str(manifest), "--api-base", url, "-o", str(out),
        "-c", "128", "--poll-interval", "0.05", "-y", "-q",
    ]  # fmt: skip


def killed_half(folder: Path, jobs: int, sandbox: SandboxProcess) -> tuple[Path, Path, float]:
    """A run SIGKILLed once half its jobs were submitted: (manifest, its output folder, seconds it ran).

    Made once in folder and kept there (--killed): a second bench run reuses it, its in-flight jobs then
    unknown to a new sandbox (their polls answer 404, which a run treats as transient: for every checkout)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "killed"
    if (out / "state.jsonl").exists():  # the journal (batcher.journal.store.JOURNAL_NAME)
        return folder / f"csv{jobs}.yaml", out, 0.0
    manifest = write_prompt_file(folder, jobs)
    env = environment(str(ROOT), folder / "state-killed")
    started = time.perf_counter()
    process = subprocess.Popen(run_command(str(ROOT), env, manifest, out, sandbox.url), env=env, cwd=folder)
    while sandbox.submits() < jobs // 2:
        time.sleep(0.2)
        if process.poll() is not None:
            raise SystemExit(f"the run to kill ended early: exit {process.returncode}")
    process.send_signal(signal.SIGKILL)
    process.wait()
    return manifest, out, time.perf_counter() - started


def resume(root: str, manifest: Path, killed: Path, copy: Path, sandbox: SandboxProcess) -> tuple[float, float]:
    """Seconds from `batcher run` on a copy of the killed folder to its first new submit, and its peak RSS then.

    The killed run's sandbox answers: the jobs it had in flight are polled and downloaded first, as a real
    resume does. Each copy has a ledger of its own (it is a copy of one run's folder, on purpose)."""
    shutil.copytree(killed, copy, symlinks=True)
    env = environment(root, copy.with_name(copy.name + "-state"))
    before = sandbox.submits()
    started = time.perf_counter()
    process = subprocess.Popen(
        run_command(root, env, manifest, copy, sandbox.url),
        env=env,
        cwd=copy.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while sandbox.submits() == before:
        if process.poll() is not None:
            raise SystemExit(f"the resumed run ended before a submit: exit {process.returncode}")
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    peak = vm_hwm(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return seconds, peak


def resume_limited(root: str, manifest: Path, killed: Path, copy: Path, sandbox: SandboxProcess) -> tuple[float, float]:
    """`batcher run --limit 1` on a copy of the killed folder, to its exit: (seconds, peak RSS MB).

    Its one job is done already: the journal folded, the plan made, the summary and the gallery written."""
    shutil.copytree(killed, copy, symlinks=True)
    env = environment(root, copy.with_name(copy.name + "-state"))
    command = [*run_command(root, env, manifest, copy, sandbox.url), "--limit", "1"]
    wall, peak, _ = timed(command, env, copy.parent)
    return wall, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="CSV prompt file rows")
    parser.add_argument("--yaml", type=int, nargs="*", default=[100_000], help="YAML jobs list sizes")
    parser.add_argument("--resume-jobs", type=int, default=100_000)
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--killed", help="a folder to keep the killed run in, reused by a later bench run")
    parser.add_argument("--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS), help="the ones to time")
    parser.add_argument("--before", help="an earlier checkout (git worktree add /tmp/old REV), measured alternating")
    args = parser.parse_args()
    roots = [("after", str(ROOT))] + ([("before", args.before)] if args.before else [])
    print(f"# batcher at scale — {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory(prefix="batcher-scale-") as tmp:
        folder = Path(tmp)
        state = folder / "state"
        sources = [(f"CSV prompt file, {n:,}", write_prompt_file(folder, n)) for n in args.sizes]
        sources += [(f"YAML jobs list, {n:,}", write_yaml_list(folder, n)) for n in args.yaml]
        commands = [c for c in COMMANDS if c in args.commands]  # status and report read the run's folder
        header = " | ".join(f"{c} s / MB" for c in commands)
        print(f"\n| source | checkout | {header} |")
        print("|---|---|" + "---|" * len(commands))
        for name, manifest in sources:
            figures: dict[str, list[str]] = {label: [] for label, _ in roots}
            for command in commands:
                for k in range(len(roots)):
                    # Alternating: the checkouts take turns going first.
                    label, root = roots[(commands.index(command) + k) % len(roots)]
                    out = folder / f"out-{manifest.stem}-{label}"
                    wall, peak, code = timed(command_line(command, manifest, out), environment(root, state), folder)
                    mark = "" if code == 0 else f" (exit {code})"
                    figures[label].append(f"{wall:.1f} / {peak:.0f}{mark}")
            for label, _ in roots:
                print(f"| {name} | {label} | {' | '.join(figures[label])} |", flush=True)
        if not args.no_resume:
            sandbox = SandboxProcess(str(ROOT), environment(str(ROOT), state), "--queue-delay", "0", "--run-delay", "0")
            try:
                kept = Path(args.killed) if args.killed else folder / "kill"
                manifest, killed, ran = killed_half(kept, args.resume_jobs, sandbox)
                made = f"it ran {ran:.0f} s" if ran else f"made earlier, in {kept}"
                print(f"\n## resume after SIGKILL: {args.resume_jobs:,} jobs, killed half done ({made})")
                print("| checkout | to the first new submit s / peak RSS MB | --limit 1 to exit s / peak RSS MB |")
                print("|---|---|---|")
                for attempt in range(2):
                    for label, root in roots if attempt % 2 == 0 else roots[::-1]:
                        copy = folder / f"resume-{label}-{attempt}"
                        seconds, peak = resume(root, manifest, killed, copy, sandbox)
                        shutil.rmtree(copy)
                        wall, most = resume_limited(root, manifest, killed, copy, sandbox)
                        shutil.rmtree(copy)
                        print(f"| {label} | {seconds:.2f} / {peak:.0f} | {wall:.2f} / {most:.0f} |", flush=True)
            finally:
                sandbox.close()


if __name__ == "__main__":
    main()
