"""The same run to local disk and to a loopback S3 server (moto's, in its own process).

    python benchmarks/s3bench.py --jobs 2000 --concurrency 32

Prints, for each: wall time; for S3, the journal's cost per job: barriers (a submit waiting for its intent
to be in the bucket), their mean wait, journal PUTs per job and every S3 request per job. The sandbox runs
in process with zero delays, so the S3 figures are the object store's share alone. moto is a slow server
(Python, one process): a real S3 region answers a small PUT in 10-30 ms, loopback moto in about 10 ms.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import boto3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batcher import RunOptions, SandboxConfig, load_manifest, run_manifest
from batcher.remote import MirrorFigures, RemoteRun
from batcher.storage import parse_output
from tests.s3server import s3_environment, s3_server

_figures: list[MirrorFigures] = []


def _capture() -> None:
    """Keep each remote run's figures as its end is reached."""
    original = RemoteRun._finish

    def finish(self: RemoteRun, flusher: Any) -> None:
        original(self, flusher)
        _figures.append(self.figures)

    RemoteRun._finish = finish  # type: ignore[method-assign]


def _manifest(folder: Path, jobs: int) -> Path:
    lines = ["model: openai/gpt-image-1-5/image-to-image", "defaults:", "  quality: low", "jobs:"]
    for i in range(jobs):
        lines += [f"  - id: job-{i:05d}", f'    prompt: "prompt {i}"', "    image_urls: ['https://example.org/r.jpg']"]
    path = folder / "bench.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _options(concurrency: int, **extra: Any) -> RunOptions:
    config = SandboxConfig(queue_delay=0.0, run_delay=0.0)
    return RunOptions(
        sandbox=True, sandbox_config=config, concurrency=concurrency, poll_min=0.01, poll_max=0.05, **extra
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    _capture()
    with tempfile.TemporaryDirectory() as temp, s3_server() as endpoint:
        root = Path(temp)
        os.environ.update(s3_environment(endpoint))
        os.environ["BATCHER_CACHE"] = str(root / "cache")
        os.environ["BATCHER_LEDGER"] = str(root / "ledger.jsonl")
        manifest = load_manifest(_manifest(root, args.jobs))
        boto3.client("s3").create_bucket(Bucket="bench")

        started = time.perf_counter()
        local = anyio.run(run_manifest, manifest, _options(args.concurrency, output_dir=root / "local"))
        local_wall = time.perf_counter() - started

        started = time.perf_counter()
        remote = anyio.run(
            run_manifest, manifest, _options(args.concurrency, remote=parse_output("s3://bench/run"), new_output=True)
        )
        remote_wall = time.perf_counter() - started
        figures = _figures[-1]
        assert local.done == remote.done == args.jobs, (local.done, remote.done)

    jobs = args.jobs
    print("| output | jobs | concurrency | wall s | jobs/s | barrier mean ms | journal PUTs/job | S3 requests/job |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| local disk | {jobs} | {args.concurrency} | {local_wall:.1f} | {jobs / local_wall:.0f} | – | – | – |")
    print(
        f"| s3 (loopback moto) | {jobs} | {args.concurrency} | {remote_wall:.1f} | {jobs / remote_wall:.0f} "
        f"| {figures.barrier_seconds / max(1, figures.barriers) * 1000:.1f} | {figures.segments / jobs:.2f} "
        f"| {figures.requests / jobs:.2f} |"
    )


if __name__ == "__main__":
    main()
