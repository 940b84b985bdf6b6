"""The same run to local disk, to a loopback S3 server (moto's) and to a loopback GCS emulator
(fake-gcs-server), each server in its own process.

    python benchmarks/s3bench.py --jobs 2000 --concurrency 32

Prints, for each: wall time; for the buckets, the journal's cost per job: barriers (a submit waiting for
its intent to be in the bucket), their mean wait, journal PUTs per job and every request to the store per
job. The sandbox runs in process with zero delays, so the bucket figures are the object store's share
alone. moto is a slow server (Python, one process): a real S3 region answers a small PUT in 10-30 ms,
loopback moto in about 10 ms. fake-gcs-server is Go, in memory; GCS itself answers a small upload in
tens of milliseconds.
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
from batcher.output.remote import MirrorFigures, RemoteRun
from batcher.output.storage.bucket import parse_output
from tests.gcsserver import gcs_environment, gcs_server
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
        sandbox=True, sandbox_config=config, concurrency=concurrency, poll_interval=0.01, poll_max=0.05, **extra
    )


def _remote_row(name: str, url: str, manifest: Any, jobs: int, concurrency: int) -> tuple[str, float, MirrorFigures]:
    """One run to a bucket: its name, wall time and what the bucket cost it."""
    started = time.perf_counter()
    summary = anyio.run(run_manifest, manifest, _options(concurrency, remote=parse_output(url), new_output=True))
    wall = time.perf_counter() - started
    assert summary.done == jobs, (name, summary.done)
    return name, wall, _figures[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    _capture()
    rows: list[tuple[str, float, MirrorFigures]] = []
    with tempfile.TemporaryDirectory() as temp, s3_server() as s3_endpoint, gcs_server() as gcs_endpoint:
        root = Path(temp)
        os.environ.update(s3_environment(s3_endpoint))
        env, _ = gcs_environment(gcs_endpoint, None, root / "gcloud")  # the emulator: no credentials
        os.environ.update(env)
        os.environ["BATCHER_CACHE"] = str(root / "cache")
        os.environ["BATCHER_LEDGER"] = str(root / "ledger.jsonl")
        manifest = load_manifest(_manifest(root, args.jobs))
        boto3.client("s3").create_bucket(Bucket="bench")
        from google.cloud import storage

        with storage.Client() as admin:
            admin.create_bucket("bench")

        started = time.perf_counter()
        local = anyio.run(run_manifest, manifest, _options(args.concurrency, output_dir=root / "local"))
        local_wall = time.perf_counter() - started
        assert local.done == args.jobs, local.done
        rows.append(_remote_row("s3 (loopback moto)", "s3://bench/run", manifest, args.jobs, args.concurrency))
        rows.append(
            _remote_row("gcs (loopback fake-gcs-server)", "gs://bench/run", manifest, args.jobs, args.concurrency)
        )

    jobs = args.jobs
    print("| output | jobs | concurrency | wall s | jobs/s | barrier mean ms | journal PUTs/job | requests/job |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| local disk | {jobs} | {args.concurrency} | {local_wall:.1f} | {jobs / local_wall:.0f} | – | – | – |")
    for name, wall, figures in rows:
        print(
            f"| {name} | {jobs} | {args.concurrency} | {wall:.1f} | {jobs / wall:.0f} "
            f"| {figures.barrier_seconds / max(1, figures.barriers) * 1000:.1f} | {figures.segments / jobs:.2f} "
            f"| {figures.requests / jobs:.2f} |"
        )


if __name__ == "__main__":
    main()
