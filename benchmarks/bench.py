"""batcher's own cost, measured against the sandbox on loopback.

    python benchmarks/bench.py --jobs 5000 --concurrency 64          # everything
    python benchmarks/bench.py --only overhead,resume                  # some of it

Sections (each prints a table row or two):

load      seconds and peak RSS to load, validate and identify --load-jobs jobs from a CSV prompt file
          and from a YAML jobs list, each in a fresh process (and an earlier checkout's, with --before).
overhead  wall and user/system CPU per job of `run_manifest` (journal, downloads, sidecars,
          progress counters on) against two floors: bare httpx2 and aiohttp scripts making
          the same calls (submit, poll the status until done, fetch the result, download,
          write the image; and httpx2 polling /result, the floor before), at each
          --overhead-concurrency, alternating, each client in a fresh process
          (benchmarks/floors.py), against one sandbox process with zero delays. With
          --before, an earlier checkout's batcher too; with --profile FILE, a pyinstrument
          profile of batcher's run.
memory    peak RSS of planning and of running N jobs, each in a fresh process.
prompts   time and peak RSS of planning a CSV prompt file against the same jobs in YAML.
resume    time to fold a journal of --events events and decide what is left: in full,
          from the checkpoint a run's end writes, and from one with a 10% tail after it.
polls     result calls per job and the delay between a job finishing and the
          client noticing, for jobs of 10-90 s on a clock scaled by --scale,
          with batcher's backoff and with fixed 1 s polling.
fsync     cost per journal event: write only, write+fsync each, grouped.
ratelimit the share of 429s when the sandbox limits requests a second, once adapted.
accounts  jobs a second through one account vs two, in one run of this section, against a
          sandbox where each account may have --account-cap jobs in flight.
cap       the share of one account's cap on jobs in flight (sandbox --max-in-flight --cap) that
          a run keeps busy, with jobs of 10-30 s on a clock scaled by --cap-scale; polls per job
          and the notice delay (the time from a job's end to the run seeing it, over its duration).

Machines here are shared and noisy: compare ratios from one run, not
absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import anyio
import httpx2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batcher import RunOptions, load_manifest, run_manifest  # noqa: E402
from batcher.journal.store import CHECKPOINT_NAME, JOURNAL_NAME, Journal  # noqa: E402
from batcher.runcomfy.polling import DurationModel, remote_duration  # noqa: E402

MODEL = "openai/gpt-image-1-5/image-to-image"
REF = "https://example.org/ref.jpg"


def write_manifest(path: Path, jobs: int) -> Path:
    with path.open("w") as out:
        out.write(f"model: {MODEL}\ndefaults:\n  quality: low\n  image_urls: ['{REF}']\njobs:\n")
        for i in range(jobs):
            out.write(f"  - id: job-{i:06d}\n    prompt: 'benchmark prompt {i}'\n")
    return path


class SandboxProcess:
    """`batcher sandbox` in a process of its own, so that it does not share our CPU clock."""

    def __init__(self, *flags: str) -> None:
        command = [sys.executable, "-m", "batcher", "sandbox", "--port", "0", *flags]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.process.stderr is not None
        line = self.process.stderr.readline()
        self.url = line.split(" at ")[1].split()[0]

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.communicate(timeout=10)


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- overhead ------------------------------------------------------------------------

FLOORS = ROOT / "benchmarks" / "floors.py"


def run_client(
    client: str,
    url: str,
    jobs: int,
    concurrency: int,
    folder: Path,
    root: str | None = None,
    profile: str | None = None,
) -> dict[str, float]:
    """One client of the overhead section in a fresh process (see benchmarks/floors.py): wall, user, sys."""
    command = [sys.executable, str(FLOORS), client, url, str(jobs), str(concurrency), str(folder)]
    if root:
        command += ["--root", root]
    if profile:
        command += ["--profile", profile]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return dict(json.loads(out.stdout.splitlines()[-1]))


def bench_overhead(args: argparse.Namespace) -> None:
    for concurrency in args.overhead_concurrency:
        _overhead_at(args, concurrency)


def _overhead_at(args: argparse.Namespace, concurrency: int) -> None:
    clients: list[tuple[str, str, str | None]] = [
        ("bare httpx2 script", "httpx2", None),
        ("bare httpx2, /result polled", "httpx2-result", None),
        ("bare aiohttp script", "aiohttp", None),
        ("batcher", "batcher", None),
    ]
    if args.before:
        clients.append((f"batcher before ({Path(args.before).name})", "batcher", args.before))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in clients}
    with SandboxProcess("--queue-delay", "0", "--run-delay", "0") as sandbox, tempfile.TemporaryDirectory() as tmp:
        for attempt in range(args.repeat):
            # Alternating, each attempt starting one client later: no client always runs first.
            for k in range(len(clients)):
                name, client, root = clients[(attempt + k) % len(clients)]
                folder = Path(tmp) / f"{client}{k}-{attempt}"
                runs[name].append(run_client(client, sandbox.url, args.jobs, concurrency, folder, root))
        if args.profile:
            path = Path(args.profile).with_suffix(f".c{concurrency}.txt")
            run_client("batcher", sandbox.url, args.jobs, concurrency, Path(tmp) / "profiled", profile=str(path))
            print(f"\n(pyinstrument profile of batcher's run at c={concurrency}: {path})")

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    per_job = 1000 / args.jobs
    floors = {"httpx2": "bare httpx2 script", "aiohttp": "bare aiohttp script"}
    print(f"\n## overhead: {args.jobs} jobs, concurrency {concurrency}, median of {args.repeat} alternating runs")
    print(
        "| client | wall s | user ms/job | system ms/job | CPU ms/job | wall / httpx2 | CPU vs httpx2 "
        "| wall / aiohttp | CPU vs aiohttp |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, _, _ in clients:
        wall, user, system = median(name, "wall"), median(name, "user"), median(name, "sys")
        cpu_job = statistics.median((r["user"] + r["sys"]) for r in runs[name]) * per_job
        ratios = []
        for floor in floors.values():
            floor_cpu = statistics.median((r["user"] + r["sys"]) for r in runs[floor]) * per_job
            ratios.append(f"{wall / median(floor, 'wall'):.2f}x")
            ratios.append(f"{cpu_job - floor_cpu:+.2f} ms")
        print(
            f"| {name} | {wall:.2f} | {user * per_job:.2f} | {system * per_job:.2f} | {cpu_job:.2f} | "
            f"{' | '.join(ratios)} |"
        )
    spread = ", ".join(f"{name}: " + "/".join(f"{r['wall']:.1f}" for r in runs[name]) for name, _, _ in clients)
    print(f"<!-- walls of each run: {spread} -->")


# -- memory ----------------------------------------------------------------------------

_MEMORY_CHILD = """
import resource, sys, anyio
from pathlib import Path
sys.path.insert(0, {root!r})
from batcher import RunOptions, load_manifest, run_manifest
manifest = load_manifest({manifest!r})
planned = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if {run!r}:
    options = RunOptions(
        output_dir=Path({out!r}), concurrency=64, api_base={url!r}, token="bench", poll_interval=0.05, poll_max=0.05
    )
    summary = anyio.run(run_manifest, manifest, options)
    assert summary.done == manifest.count, summary
print(planned, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_memory(args: argparse.Namespace) -> None:
    print("\n## memory: peak RSS (MB), each size in a fresh process")
    print("| jobs | after planning | after running |")
    print("|---|---|---|")
    with SandboxProcess("--queue-delay", "0", "--run-delay", "0") as sandbox, tempfile.TemporaryDirectory() as tmp:
        for jobs in args.memory_jobs:
            manifest = write_manifest(Path(tmp) / f"m{jobs}.yaml", jobs)
            run = jobs <= args.memory_run_max
            code = _MEMORY_CHILD.format(
                root=str(ROOT), manifest=str(manifest), run=run, out=f"{tmp}/o{jobs}", url=sandbox.url
            )
            started = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            planned, peak = (int(v) / 1024 for v in out.stdout.split())
            ran = f"{peak:.0f}" if run else "(not run)"
            print(f"| {jobs:,} | {planned:.0f} | {ran} |  <!-- {time.perf_counter() - started:.0f} s -->")


_PLAN_CHILD = """
import resource, sys, time
sys.path.insert(0, {root!r})
from batcher import load_manifest
from batcher.manifest.cost import estimate
started = time.perf_counter()
manifest = load_manifest({manifest!r})
total = sum(estimate(job) or 0.0 for job in manifest.iter_jobs())  # what `batcher plan` does
print(manifest.count, time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_prompt_file(folder: Path, rows: int) -> Path:
    with (folder / f"prompts{rows}.csv").open("w") as out:
        out.write("id,prompt,quality\n")
        for i in range(rows):
            out.write(f"row-{i:06d},benchmark prompt number {i} with a few more words,{('low', 'medium')[i % 2]}\n")
    manifest = folder / f"p{rows}.yaml"
    manifest.write_text(f"model: {MODEL}\njobs:\n  - from: prompts{rows}.csv\n    image_urls: ['{REF}']\n")
    return manifest


def bench_prompts(args: argparse.Namespace) -> None:
    print("\n## prompts: plan a prompt file (load, validate every row, then stream the jobs for costs)")
    print("| source | jobs | plan s | peak RSS MB |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        baseline = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import resource, sys; sys.path.insert(0, {str(ROOT)!r}); import batcher; "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        print(f"| (import batcher only) | 0 | - | {int(baseline.stdout) / 1024:.0f} |")
        for rows in args.prompt_rows:
            for kind, manifest in (
                ("CSV prompt file", write_prompt_file(Path(tmp), rows)),
                ("YAML jobs list", write_manifest(Path(tmp) / f"y{rows}.yaml", rows)),
            ):
                code = _PLAN_CHILD.format(root=str(ROOT), manifest=str(manifest))
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                count, seconds, peak = out.stdout.split()
                assert int(count) == rows
                print(f"| {kind} | {rows:,} | {float(seconds):.1f} | {int(peak) / 1024:.0f} |")


# -- resume ------------------------------------------------------------------------------


_FOLD_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from batcher.journal.store import read_journal
started = time.perf_counter()
folded = read_journal(Path({path!r}))
left = sum(1 for r in folded.records.values() if not r.downloaded)
assert left == 0 and len(folded.records) == {jobs}
print(time.perf_counter() - started)
"""


def bench_resume(args: argparse.Namespace) -> None:
    print("\n## resume: fold a journal and decide what is left (seconds)")
    print(
        "| events | jobs | journal MB | full fold | from checkpoint | checkpoint + 10% tail | writing the checkpoint |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for events in (args.events // 10, args.events):
            folder = Path(tmp) / str(events)
            jobs = events // 5
            journal = Journal(folder)
            journal.open()
            tail_from = jobs - jobs // 10
            for i in range(jobs):
                if i == tail_from:
                    started = time.perf_counter()
                    journal.close()  # a run ends here: checkpoint; the next one is killed after 10% more
                    closing = time.perf_counter() - started
                    tail_checkpoint = (folder / CHECKPOINT_NAME).read_bytes()
                    journal = Journal(folder)
                    journal.open()
                key = f"{i:016x}"
                journal.append("submitting", key, name=f"job-{i}", input={"prompt": f"p {i}", "quality": "low"})
                journal.append("submitted", key, request_id=f"sbx-{i:x}-000000000000")
                journal.append("state", key, state="in_progress")
                journal.append("completed", key, outputs=[f"https://cdn.example/{i}.png"], cost=0.013)
                journal.append("downloaded", key, index=0, path=f"job-{i}/0.png", bytes=1000, sha256="0" * 64)
            started = time.perf_counter()
            journal.close()
            closing = max(closing, time.perf_counter() - started)
            size = (folder / JOURNAL_NAME).stat().st_size / 1e6
            full_checkpoint = (folder / CHECKPOINT_NAME).read_bytes()

            del journal  # a resume starts in a fresh process: so does each measurement

            def fold(folder: Path = folder, jobs: int = jobs) -> float:
                code = _FOLD_CHILD.format(root=str(ROOT), path=str(folder / JOURNAL_NAME), jobs=jobs)
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                return float(out.stdout)

            with_checkpoint = fold()
            (folder / CHECKPOINT_NAME).write_bytes(tail_checkpoint)
            with_tail = fold()
            (folder / CHECKPOINT_NAME).unlink()
            full = fold()
            (folder / CHECKPOINT_NAME).write_bytes(full_checkpoint)
            print(
                f"| {events:,} | {jobs:,} | {size:.0f} | {full:.2f} | {with_checkpoint:.2f} | {with_tail:.2f} "
                f"| {closing:.2f} |"
            )


# -- polls ---------------------------------------------------------------------------------


class _Unlearned(DurationModel):
    """A DurationModel that never learns: batcher's polling as it was before, for comparison."""

    def add(self, seconds: float) -> None:
        pass


def bench_polls(args: argparse.Namespace) -> None:
    import batcher.engine.shared

    scale = args.scale
    print(
        f"\n## polls: jobs of 12-92 s (2 s queue + 10-90 s run; clock scaled 1/{scale:g}), "
        f"{args.poll_jobs} jobs, {args.poll_concurrency} at a time"
    )
    print("| policy | result calls per job | mean notice delay | delay / job duration |")
    print("|---|---|---|---|")
    flags = ["--queue-delay", f"{2 / scale}", "--run-delay", f"{10 / scale}", "--run-delay-max", f"{90 / scale}"]
    policies = {
        "batcher: learned from finished jobs": (1.0 / scale, 10.0 / scale, True),
        "backoff only (1 s growing 1.5x to 10 s)": (1.0 / scale, 10.0 / scale, False),
        "fixed 1 s": (1.0 / scale, 1.0 / scale, False),
    }
    learning = DurationModel
    for name, (poll_min, poll_max, learn) in policies.items():
        batcher.engine.shared.DurationModel = learning if learn else _Unlearned  # type: ignore[misc, assignment]
        with SandboxProcess(*flags) as sandbox, tempfile.TemporaryDirectory() as tmp:
            manifest = load_manifest(write_manifest(Path(tmp) / "polls.yaml", args.poll_jobs))
            options = RunOptions(
                output_dir=Path(tmp) / "out",
                concurrency=args.poll_concurrency,
                api_base=sandbox.url,
                token="bench",
                poll_interval=poll_min,
                poll_max=poll_max,
            )
            anyio.run(run_manifest, manifest, options)
            calls = httpx2.get(f"{sandbox.url}/_sandbox/stats").json()["calls"]
            delays, ratios = [], []
            for line in (Path(tmp) / "out" / JOURNAL_NAME).read_text().splitlines():
                event = json.loads(line)
                if event["e"] == "completed":
                    result = event["result"]
                    # Timestamps come as RunComfy writes them (ISO strings): read them as batcher does.
                    delay = remote_duration({"created_at": result["finished_at"], "finished_at": event["t"]}) or 0.0
                    duration = remote_duration(result) or math.nan
                    delays.append(delay)
                    ratios.append(delay / duration)
            per_job = (calls.get("result", 0) + calls.get("status", 0)) / args.poll_jobs
            print(
                f"| {name} | {per_job:.1f} | {statistics.mean(delays) * scale:.2f} s (unscaled) | "
                f"{statistics.mean(ratios) * 100:.1f}% |"
            )
    batcher.engine.shared.DurationModel = learning  # type: ignore[misc]


# -- cap -------------------------------------------------------------------------------------


def _stamp(text: str) -> float:
    """The sandbox's ISO 8601 stamps (UTC, Z) as epoch seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _server_times(journal: Path) -> list[tuple[float, float, float]]:
    """(accepted, finished, noticed) of each completed job, as the sandbox stamped them and the journal saw."""
    times = []
    for line in journal.read_text().splitlines():
        event = json.loads(line)
        if event["e"] == "completed":
            result = event["result"]
            accepted, finished = (_stamp(result[name]) for name in ("created_at", "finished_at"))
            times.append((accepted, finished, float(event["t"])))
    return times


def cap_share(times: list[tuple[float, float, float]], cap: int) -> tuple[float, float]:
    """The share of the account's cap held at the server: while jobs were still waiting to be sent (from the
    first acceptance to the last), and over the whole run (to the last finish)."""
    start, last_sent, end = min(t[0] for t in times), max(t[0] for t in times), max(t[1] for t in times)
    steady = sum(max(0.0, min(f, last_sent) - a) for a, f, _ in times) / (cap * (last_sent - start))
    whole = sum(f - a for a, f, _ in times) / (cap * (end - start))
    return steady, whole


def bench_cap(args: argparse.Namespace) -> None:
    """The account, not the client, is the limit: how much of a per-account cap a run keeps busy."""
    scale, cap, jobs = args.cap_scale, args.cap, args.cap_jobs
    print(
        f"\n## cap: {jobs} jobs of 10-30 s (clock scaled 1/{scale:g}), one account capped at {cap} in flight "
        f"(429 past it), --concurrency {args.cap_concurrency}"
    )
    print(
        "| run | wall s (unscaled) | cap used while sending | cap used, whole run | 429s | result calls/job "
        "| mean notice delay / job duration |"
    )
    print("|---|---|---|---|---|---|---|")
    flags = ["--queue-delay", "0", "--run-delay", f"{10 / scale}", "--run-delay-max", f"{30 / scale}"]
    flags += ["--max-in-flight", str(cap), "--retry-after", f"{1 / scale:g}"]  # 1 s, scaled
    for attempt in range(args.repeat):
        with SandboxProcess(*flags) as sandbox, tempfile.TemporaryDirectory() as tmp:
            manifest = load_manifest(write_manifest(Path(tmp) / "cap.yaml", jobs))
            options = RunOptions(
                output_dir=Path(tmp) / "out",
                concurrency=args.cap_concurrency,
                api_base=sandbox.url,
                token="bench",
                poll_interval=1.0 / scale,  # batcher's defaults (1 s growing to 10 s), on the scaled clock
                poll_max=10.0 / scale,
                live_prices=False,
                new_output=True,  # the same jobs each repeat, on purpose (and against a fresh sandbox)
            )
            started = time.perf_counter()
            summary = anyio.run(run_manifest, manifest, options)
            wall = time.perf_counter() - started
            assert summary.done == jobs, summary
            stats = httpx2.get(f"{sandbox.url}/_sandbox/stats").json()
            times = _server_times(Path(tmp) / "out" / JOURNAL_NAME)
        steady, whole = cap_share(times, cap)
        calls = stats["calls"]
        per_job = (calls.get("result", 0) + calls.get("status", 0)) / jobs
        delay = statistics.mean((n - f) / (f - a) for a, f, n in times)
        print(
            f"| {attempt + 1} | {wall * scale:.0f} | {steady:.1%} | {whole:.1%} | {stats['account_refusals']} "
            f"| {per_job:.2f} | {delay:.1%} |"
        )


# -- rate limit ----------------------------------------------------------------------------


def bench_ratelimit(args: argparse.Namespace) -> None:
    limit = args.rate_limit
    print(f"\n## rate limit: the sandbox allows {limit:g} requests/s; {args.rate_jobs} jobs, concurrency 64")
    print("| client | requests | 429s | 429s in the second half | wall s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = load_manifest(write_manifest(Path(tmp) / "rate.yaml", args.rate_jobs))
        for name, rate in (
            ("batcher, no --rate (adapts)", None),
            (f"batcher --rate {limit * 2:g} (adapts)", limit * 2),
        ):
            with SandboxProcess("--queue-delay", "0", "--run-delay", "0.5", "--rate-limit", f"{limit}") as sandbox:
                options = RunOptions(
                    output_dir=Path(tmp) / f"out{rate}",
                    concurrency=64,
                    api_base=sandbox.url,
                    token="bench",
                    poll_interval=0.2,
                    poll_max=1.0,
                    rate=rate,
                    new_output=True,  # the same jobs twice, on purpose (and against a fresh sandbox)
                )
                started = time.perf_counter()
                anyio.run(run_manifest, manifest, options)
                wall = time.perf_counter() - started
                stats = httpx2.get(f"{sandbox.url}/_sandbox/stats").json()
            calls, refused = stats["rate_calls_at"], stats["rate_limited_at"]
            middle = calls[0] + (calls[-1] - calls[0]) / 2
            late_calls = sum(1 for t in calls if t >= middle)
            late_refused = sum(1 for t in refused if t >= middle)
            print(
                f"| {name} | {len(calls)} | {len(refused)} ({len(refused) / len(calls):.1%}) | "
                f"{late_refused} ({late_refused / max(late_calls, 1):.1%}) | {wall:.1f} |"
            )


# -- accounts --------------------------------------------------------------------------------


def bench_accounts(args: argparse.Namespace) -> None:
    cap, jobs, run_delay = args.account_cap, args.account_jobs, args.account_run_delay
    print(
        f"\n## accounts: {jobs} jobs of {run_delay:g} s, concurrency {args.account_concurrency}; "
        f"each account may have {cap} jobs in flight (429 past it)"
    )
    print("| tokens | wall s | jobs/s | 429s (cap) | submits per account | 403001s |")
    print("|---|---|---|---|---|---|")
    tokens = ("bench-account-one-0001", "bench-account-two-0002")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BATCHER_LEDGER"] = str(Path(tmp) / "ledger.jsonl")  # not the user's ledger
        manifest = load_manifest(write_manifest(Path(tmp) / "accounts.yaml", jobs))
        for count in (1, 2):
            flags = ["--queue-delay", "0", "--run-delay", f"{run_delay}", "--max-in-flight", str(cap)]
            flags += [f"--account={token}" for token in tokens]
            with SandboxProcess(*flags) as sandbox:
                options = RunOptions(
                    output_dir=Path(tmp) / f"out{count}",
                    concurrency=args.account_concurrency,
                    api_base=sandbox.url,
                    tokens=tokens[:count],
                    poll_interval=0.1,
                    poll_max=0.5,
                    live_prices=False,
                    new_output=True,  # the same jobs twice, on purpose (and against a fresh sandbox)
                )
                started = time.perf_counter()
                summary = anyio.run(run_manifest, manifest, options)
                wall = time.perf_counter() - started
                stats = httpx2.get(f"{sandbox.url}/_sandbox/stats").json()
            assert summary.done == jobs, summary
            per = ", ".join(f"{n}" for _, n in sorted(stats["submits_by_account"].items()))
            print(
                f"| {count} | {wall:.1f} | {jobs / wall:.2f} | {stats['account_refusals']} | {per} | "
                f"{stats['other_user_refusals']} |"
            )


# -- fsync -----------------------------------------------------------------------------------


def bench_fsync(args: argparse.Namespace) -> None:
    print(f"\n## fsync: cost per journal event ({args.fsync_events} events)")
    print("| policy | µs per event |")
    print("|---|---|")
    with tempfile.TemporaryDirectory(dir=ROOT / "output") as tmp:
        for name, every in (("write only (SIGKILL-safe)", 0), ("fsync every event", 1), ("fsync every 100", 100)):
            journal = Journal(Path(tmp) / name.split()[0] / str(every))
            journal.open()
            started = time.perf_counter()
            for i in range(args.fsync_events):
                journal.append("state", f"{i:016x}", state="in_progress")
                if every and i % every == 0:
                    journal.sync()
            elapsed = time.perf_counter() - started
            journal.close()
            print(f"| {name} | {elapsed / args.fsync_events * 1e6:.1f} |")


# -- load ---------------------------------------------------------------------------------

_LOAD_CHILD = """
import resource, sys, time
sys.path.insert(0, {root!r})
from batcher import load_manifest
started = time.perf_counter()
manifest = load_manifest({manifest!r})  # read, expand, validate every job and hash its identity
print(manifest.count, time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_load(args: argparse.Namespace) -> None:
    """Load + validate + identity, each source in a fresh process; with --before, the same for another checkout."""
    print(f"\n## load: read, expand, validate and identify every job (best of {args.repeat})")
    print("| source | jobs | seconds | peak RSS MB | before: seconds | before: peak RSS MB |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        rows = args.load_jobs
        for kind, manifest in (
            ("CSV prompt file", write_prompt_file(Path(tmp), rows)),
            ("YAML jobs list", write_manifest(Path(tmp) / f"y{rows}.yaml", rows)),
        ):
            figures = []
            for root in (str(ROOT), args.before):
                if root is None:
                    figures.append("–")
                    figures.append("–")
                    continue
                runs = []
                for _ in range(args.repeat):
                    code = _LOAD_CHILD.format(root=root, manifest=str(manifest))
                    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                    count, seconds, peak = out.stdout.split()
                    assert int(count) == rows
                    runs.append((float(seconds), int(peak) / 1024))
                figures.append(f"{min(r[0] for r in runs):.2f}")
                figures.append(f"{min(r[1] for r in runs):.0f}")
            print(f"| {kind} | {rows:,} | {' | '.join(figures)} |")


SECTIONS = {
    "load": bench_load,
    "overhead": bench_overhead,
    "memory": bench_memory,
    "prompts": bench_prompts,
    "resume": bench_resume,
    "polls": bench_polls,
    "fsync": bench_fsync,
    "ratelimit": bench_ratelimit,
    "accounts": bench_accounts,
    "cap": bench_cap,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1500, help="jobs for the overhead section")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--overhead-concurrency", type=int, nargs="+", default=[64, 256], help="concurrencies of the overhead section"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each client in the overhead section")
    parser.add_argument("--profile", help="overhead: write a pyinstrument profile of batcher's run (FILE.cNN.txt)")
    parser.add_argument("--memory-jobs", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--memory-run-max", type=int, default=10_000, help="run (not only plan) up to this size")
    parser.add_argument("--events", type=int, default=1_000_000, help="journal events for the resume section")
    parser.add_argument("--poll-jobs", type=int, default=320)
    parser.add_argument("--poll-concurrency", type=int, default=40)
    parser.add_argument(
        "--scale",
        type=float,
        default=3.0,
        help="clock scale for the polls section (the client must keep up: see the note)",
    )
    parser.add_argument("--prompt-rows", type=int, nargs="+", default=[5_000, 50_000])
    parser.add_argument("--fsync-events", type=int, default=2000)
    parser.add_argument("--rate-limit", type=float, default=40.0, help="the sandbox's limit in the ratelimit section")
    parser.add_argument("--rate-jobs", type=int, default=600)
    parser.add_argument("--account-cap", type=int, default=4, help="jobs in flight per account (accounts section)")
    parser.add_argument("--account-jobs", type=int, default=120)
    parser.add_argument("--account-run-delay", type=float, default=1.0)
    parser.add_argument("--account-concurrency", type=int, default=16)
    parser.add_argument("--cap", type=int, default=8, help="the account's cap on jobs in flight (cap section)")
    parser.add_argument("--cap-jobs", type=int, default=240)
    parser.add_argument("--cap-concurrency", type=int, default=32)
    parser.add_argument("--cap-scale", type=float, default=10.0, help="clock scale of the cap section's job times")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--load-jobs", type=int, default=100_000, help="jobs for the load section")
    parser.add_argument(
        "--before",
        help="a checkout of an earlier batcher (git worktree add /tmp/old REV): the load and overhead "
        "sections measure it too, in the same run",
    )
    args = parser.parse_args()
    # Runs of one manifest into several folders on purpose: keep them out of the user's ledger (and its refusals).
    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="batcher-bench-state-")
    os.environ.pop("BATCHER_LEDGER", None)
    print(f"# batcher benchmark — {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}")
    for name in args.only.split(","):
        SECTIONS[name.strip()](args)


if __name__ == "__main__":
    main()
