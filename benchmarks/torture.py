"""The torture test: faults on the wire, SIGKILL at random moments, resume until done.

    python benchmarks/torture.py --jobs 300 --kills 20 --fault-rate 0.1 --seed 1

A sandbox (on a thread of this process, so its records survive every kill)
injects every fault kind at --fault-rate; `batcher run` runs in a child
process that is killed with SIGKILL at random moments, then resumed until
done. Then the invariants are checked from the sandbox's own records and the
files on disk (see `check`). Seeded: the same seed replays the same kills
and the same fault draws. A short form runs in the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from batcher import Sandbox, SandboxConfig, SandboxThread, read_journal  # noqa: E402
from batcher.journal.store import JOURNAL_NAME  # noqa: E402
from benchmarks.bench import write_manifest  # noqa: E402

TOKEN = "sk-torture-SENTINEL-0f9e"


@dataclass
class TortureReport:
    jobs: int
    seed: int
    kills: int = 0
    runs: int = 0
    uncertain_after_each_kill: list[int] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    submits: int = 0
    duplicates: int = 0
    uncertain_events: int = 0
    automatic_resubmits: int = 0
    files_verified: int = 0
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)


def _run(manifest: Path, url: str, out: Path, *flags: str) -> subprocess.Popen[bytes]:
    # Checkpoints for every journal, however small: each kill then resumes from one plus a tail.
    env = {**os.environ, "RUNCOMFY_API_TOKEN": TOKEN, "BATCHER_CHECKPOINT_MIN_BYTES": "0"}
    # A ledger of its own: the user's would refuse the second torture run on this machine (the same
    # jobs, already submitted from the last run's folder), and this run must not enter the user's.
    env["XDG_STATE_HOME"] = str(out.parent / ".state")
    command = [sys.executable, "-m", "batcher", "run", str(manifest), "--api-base", url, "--output", str(out)]
    command += ["--poll-interval", "0.1", "--poll-max", "0.5", "--read-timeout", "1", "-v", *flags]
    with (out.parent / "runs.log").open("ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, env=env, stdout=log, stderr=log, cwd=out.parent)


def _held(out: Path) -> set[str]:
    folded = read_journal(out / JOURNAL_NAME)
    return {r.name for r in folded.records.values() if r.phase in ("submitting", "uncertain")}


def torture(workdir: Path, jobs: int, kills: int, fault_rate: float, seed: int) -> TortureReport:
    rng = random.Random(seed)
    report = TortureReport(jobs=jobs, seed=seed)
    started = time.monotonic()
    config = SandboxConfig(
        queue_delay=0.2,
        run_delay=0.4,
        fault_rate=fault_rate,
        slow_seconds=1.5,
        retry_after=0.2,
        seed=seed,
        token=TOKEN,
    )
    sandbox = SandboxThread(Sandbox(config)).start()
    server = sandbox.sandbox
    manifest = write_manifest(workdir / "torture.yaml", jobs)
    out = workdir / "out"
    try:
        prompt_of = {f"job-{i:06d}": f"benchmark prompt {i}" for i in range(jobs)}

        def submits_of(names: set[str]) -> int:
            prompts = {prompt_of[n] for n in names}
            return sum(1 for s in server.submits if s.body.get("prompt") in prompts)

        # Phase 1: kill at random moments.
        while report.kills < kills:
            held = _held(out)
            before = submits_of(held)
            process = _run(manifest, sandbox.url, out, "--concurrency", str(rng.choice([4, 8, 16])))
            # Short enough that five kills land before 50 jobs are all done or held (else fewer kills happen).
            deadline = time.monotonic() + rng.uniform(0.3, 1.5)
            while time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.02)
            report.runs += 1
            finished = process.poll() is not None
            if not finished:
                process.send_signal(signal.SIGKILL)
            process.wait()
            report.automatic_resubmits += submits_of(held) - before
            if finished:
                break
            report.kills += 1
            report.uncertain_after_each_kill.append(len(_held(out)))

        # Phase 2: plain resumes until only uncertain jobs are left, then ask for those.
        for attempt in range(20):
            held = _held(out)
            before = submits_of(held)
            flags = ("--resubmit-uncertain",) if attempt >= 2 else ()
            process = _run(manifest, sandbox.url, out, "--concurrency", "16", *flags)
            code = process.wait(timeout=600)
            report.runs += 1
            if not flags:
                report.automatic_resubmits += submits_of(held) - before
            if code == 0:
                break
        check(report, out, server)
    finally:
        sandbox.stop()
    report.seconds = round(time.monotonic() - started, 1)
    return report


def check(report: TortureReport, out: Path, server: Sandbox) -> None:
    """The invariants; each broken one becomes a line in report.violations."""
    bad = report.violations.append
    folded = read_journal(out / JOURNAL_NAME)  # raises if any line but a torn last one is damaged
    if any("torn" not in w for w in folded.warnings):
        bad(f"journal warnings: {folded.warnings}")
    records = list(folded.records.values())
    report.requests = dict(server.calls)
    report.faults = dict(server.faults_injected)
    report.submits = len(server.submits)
    report.uncertain_events = sum(
        line.count('"e":"uncertain"') for line in (out / JOURNAL_NAME).read_text().splitlines()
    )

    not_done = [r.name for r in records if not r.downloaded]
    if len(records) != report.jobs or not_done:
        bad(f"{report.jobs - len(records) + len(not_done)} jobs not done: {not_done[:5]}")

    # No job whose request_id was journalled is ever submitted again.
    journalled = {rid for r in records for rid in r.request_ids}
    per_prompt: dict[str, list[tuple[float, str]]] = {}
    for submit in server.submits:
        per_prompt.setdefault(str(submit.body.get("prompt")), []).append((submit.accepted_at, submit.request_id))
    for prompt, submits in per_prompt.items():
        submits.sort()
        known = [t for t, rid in submits if rid in journalled]
        if known and any(t > known[0] for t, _ in submits):
            bad(f"{prompt!r} was submitted again after its request id was journalled")
    report.duplicates = sum(len(s) - 1 for s in per_prompt.values())
    if report.duplicates > report.uncertain_events:
        bad(f"{report.duplicates} duplicates but only {report.uncertain_events} uncertain submits")
    if report.automatic_resubmits:
        bad(f"{report.automatic_resubmits} uncertain jobs were resubmitted without --resubmit-uncertain")

    # Every byte on disk is what the server served; nothing partial under a final name.
    served = set(server.served.values())
    recorded = set()
    for record in records:
        for file in record.files.values():
            path = out / file.path
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if not data or digest != file.sha256 or digest not in served:
                bad(f"{file.path} does not hold the bytes the server served")
            recorded.add(path)
            report.files_verified += 1
    for path in out.rglob("*"):
        if path.is_file() and path.suffix == ".png" and path not in recorded:
            bad(f"{path} is under a final name but not in the journal")
        if path.name.endswith(".part"):
            bad(f"{path} is a temporary file left behind")

    # The token never lands in anything a run writes, nor in what status prints for scripts.
    status = subprocess.run(
        [sys.executable, "-m", "batcher", "status", str(out.parent / "torture.yaml"), "--output", str(out), "--json"],
        capture_output=True,
        env={**os.environ, "RUNCOMFY_API_TOKEN": TOKEN},
        check=False,
    )
    if status.returncode != 0 or TOKEN.encode() in status.stdout + status.stderr:
        bad(f"batcher status --json failed or showed the token: {status.stderr[-300:]!r}")
    for path in [*out.rglob("*"), out.parent / "runs.log"]:
        if path.is_file() and TOKEN.encode() in path.read_bytes():
            bad(f"the API token appears in {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--fault-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = torture(Path(tmp), args.jobs, args.kills, args.fault_rate, args.seed)
    print(json.dumps(asdict(report), indent=2))
    total_requests = sum(report.requests.values())
    total_faults = sum(report.faults.values())
    print(
        f"\n{report.jobs} jobs, {total_requests} requests, {total_faults} faults "
        f"({total_faults / max(total_requests, 1):.0%}), {report.kills} SIGKILLs in {report.runs} runs; "
        f"held as uncertain after each kill (cumulative) {report.uncertain_after_each_kill}; {report.duplicates} duplicate submits "
        f"(all from {report.uncertain_events} uncertain submits, {report.automatic_resubmits} automatic); "
        f"{report.files_verified} files verified; {report.seconds}s"
    )
    print("PASS" if not report.violations else "FAIL:\n" + "\n".join(report.violations))
    sys.exit(1 if report.violations else 0)


if __name__ == "__main__":
    main()
