"""A run's start with a big ledger: 40 noted places of 20,000-job journals against a clean ledger.

    python benchmarks/ledger_bench.py                         # this checkout
    python benchmarks/ledger_bench.py --before /path/to/old   # and an earlier checkout's, the same way

Each place is an output folder whose journal was written by batcher's own `Journal` (submitting,
submitted, completed and downloaded for every job, then the run header; a checkpoint beside it, as a run's
end leaves), noted in the ledger for the same API (a loopback server) as another manifest's run. Each
measured run is `python -m batcher run` of a 4-job manifest (new jobs each time, into a new folder) in a
fresh process, against a sandbox on loopback with no delays: its wall time with the big ledger, minus the
same with a clean one, is what the ledger costs a run's start. The first start over the big ledger
builds the summaries (`batcher.output.ledger`); the next ones read them. The last rows time the check
alone (`check_ledger`, three times in a fresh process of each checkout): the ledger's share of a start,
free of the noise of a whole run.

Machines here are shared and noisy: compare the rows of one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batcher.journal.store import CHECKPOINT_NAME, JOURNAL_NAME, Journal  # noqa: E402
from batcher.sandbox import Sandbox, SandboxConfig, SandboxThread  # noqa: E402

MODEL = "openai/gpt-image-1-5/image-to-image"
verbose = False


def write_journal(folder: Path, jobs: int) -> None:
    """One place's journal as a run of `jobs` jobs leaves it, written by batcher's Journal."""
    journal = Journal(folder)
    journal.open()
    try:
        for number in range(jobs):
            key = hashlib.sha256(f"{folder}-{number}".encode()).hexdigest()[:16]
            name = f"shot-{number:05d}"
            model_input = {
                "prompt": f"a lighthouse at dusk, take {number}",
                "image_urls": ["https://example.org/r.jpg"],
            }
            journal.append("submitting", key, name=name, model=MODEL, input=model_input, account="a1b2c3d4")
            journal.append("submitted", key, request_id=f"req-{number:08d}-{key}")
            journal.append("completed", key, outputs=[f"https://files.runcomfy.net/{key}/0.png"], cost=0.009)
            journal.append("downloaded", key, index=0, path=f"{name}/{key[:8]}-0.png", bytes=1234567, sha256=key * 4)
        journal.append("run", manifest="/elsewhere/m.yaml", api_base="http://127.0.0.1:1", jobs=jobs)
    finally:
        journal.close()


def build(home: Path, places: int, jobs: int) -> tuple[Path, int]:
    """The big ledger's places (one journal written, copied to each) and the ledger itself; returns the
    ledger's path and the journals' total bytes."""
    template = home / "template"
    write_journal(template, jobs)
    ledger = home / "state-big" / "batcher" / "ledger.jsonl"
    ledger.parent.mkdir(parents=True)
    lines = []
    total = 0
    for index in range(places):
        folder = home / "places" / f"run-{index:02d}"
        folder.mkdir(parents=True)
        for name in (JOURNAL_NAME, CHECKPOINT_NAME):
            if (template / name).exists():
                shutil.copyfile(template / name, folder / name)
        total += (folder / JOURNAL_NAME).stat().st_size
        lines.append(
            json.dumps(
                {
                    "t": 0,
                    "manifest": f"/elsewhere/m-{index}.yaml",
                    "name": f"m-{index}",
                    "output": str(folder),
                    "api": "loopback",
                }
            )
        )
    ledger.write_text("\n".join(lines) + "\n")
    return ledger, total


def manifest(home: Path, tag: str) -> Path:
    path = home / f"m-{tag}.yaml"
    jobs = "".join(
        f"  - id: j{i}\n    prompt: 'run {tag}, job {i}'\n    image_urls: ['https://example.org/r.jpg']\n"
        for i in range(4)
    )
    path.write_text(f"model: {MODEL}\ndefaults: {{quality: low}}\njobs:\n{jobs}")
    return path


def one_run(checkout: str, home: Path, state: Path, url: str, tag: str) -> float:
    env = {
        **os.environ,
        "PYTHONPATH": checkout,
        "XDG_STATE_HOME": str(state),
        "XDG_CACHE_HOME": str(home / "cache"),
        "RUNCOMFY_API_TOKEN": "sk-bench",
    }
    env.pop("BATCHER_LEDGER", None)
    path = manifest(home, tag)
    command = [sys.executable, "-m", "batcher", "run", str(path), "-o", str(home / "out" / tag), "--api-base", url]
    command += ["-q", "--yes", "--poll-interval", "0.05", "--poll-max", "0.1"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}): {done.stderr[-2000:]}")
    if verbose:
        print(f"  {tag}: {seconds:.2f} s", file=sys.stderr)
    return seconds


def measure(checkout: str, label: str, home: Path, big: Path, url: str, repeat: int) -> None:
    """Runs over the clean and the big ledger in turn (the machine's load drifts: pairs see the same)."""
    clean_state = home / f"state-clean-{label}"
    big_state = home / f"state-big-{label}"
    shutil.copytree(big.parent.parent, big_state)
    base = one_run(checkout, home, clean_state, url, f"{label}-clean-first")
    first = one_run(checkout, home, big_state, url, f"{label}-big-first")
    clean, warm = [], []
    for i in range(repeat):
        clean.append(one_run(checkout, home, clean_state, url, f"{label}-clean-{i}"))
        warm.append(one_run(checkout, home, big_state, url, f"{label}-big-{i}"))
    extra = statistics.median(w - c for w, c in zip(warm, clean, strict=True))
    print(
        f"| {label} | {statistics.median(clean):.2f} | {first:.2f} (+{first - base:.2f}) | "
        f"{statistics.median(warm):.2f} (median of pairs {extra:+.2f}) |"
    )


_CHECK = """
import os, statistics, sys, time
from pathlib import Path
from batcher.manifest.loader import load_manifest
from batcher.output.ledger import check_ledger
loaded = load_manifest(Path(sys.argv[1]))
keys = list(loaded.job_keys())
times = []
for _ in range(3):
    start = time.perf_counter()
    check_ledger(loaded, keys, Path(sys.argv[2]), "loopback")
    times.append(time.perf_counter() - start)
print(statistics.median(times))
"""


def check_alone(checkout: str, label: str, home: Path) -> None:
    """check_ledger alone over the big ledger as the runs above left it (summaries built, for this
    checkout), three times in a fresh process of the checkout: the part of a start the ledger is."""
    env = {**os.environ, "PYTHONPATH": checkout, "XDG_STATE_HOME": str(home / f"state-big-{label}")}
    path = manifest(home, f"{label}-alone")
    done = subprocess.run(
        [sys.executable, "-c", _CHECK, str(path), str(home / "out" / f"{label}-alone")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    print(f"| {label} | check_ledger alone: median of 3 | {float(done.stdout) * 1000:.1f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--places", type=int, default=40)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", help="an earlier checkout, measured the same way")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every run's time")
    args = parser.parse_args()
    global verbose
    verbose = args.verbose
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp:
        home = Path(tmp)
        started = time.perf_counter()
        big, total = build(home, args.places, args.jobs)
        print(
            f"{args.places} places of {args.jobs:,} jobs, {total / 2**20:.0f} MB of journals, built in "
            f"{time.perf_counter() - started:.0f} s\n"
        )
        thread = SandboxThread(Sandbox(SandboxConfig(queue_delay=0.0, run_delay=0.0))).start()
        try:
            print("| checkout | clean ledger: s | big ledger, first start: s | big ledger, next starts: s |")
            print("|---|---|---|---|")
            if args.before:
                measure(args.before, "before", home, big, thread.url, args.repeat)
            measure(str(ROOT), "after", home, big, thread.url, args.repeat)
        finally:
            thread.stop()
        print()
        for checkout, label in ([(args.before, "before")] if args.before else []) + [(str(ROOT), "after")]:
            check_alone(checkout, label, home)


if __name__ == "__main__":
    main()
