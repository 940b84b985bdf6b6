"""`batcher status` of a bucket prefix holding many shard folders (``shard-K-of-N/``), against moto on loopback.

    python benchmarks/shardbench.py --shards 1000 --of 3000

Builds the prefix as a sharded run leaves it: a manifest of N jobs is run once to a local folder (the sandbox,
zero delays), its journal is cut by shard (`batcher.manifest.job.shard_of`) and each of the first K shards'
lines put in the bucket as two journal segments under ``shard-K-of-N/journal/``, and the images
its journal names. Then times ``batcher status -o s3://…`` in a fresh process (the client's set-up included) and prints
the wall time and the requests the store saw.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import boto3
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batcher import RunOptions, SandboxConfig, load_manifest, run_manifest
from batcher.journal.store import JOURNAL_NAME
from batcher.manifest.job import shard_of
from tests.s3server import s3_environment, s3_server


def _manifest(folder: Path, jobs: int) -> Path:
    lines = ["model: openai/gpt-image-1-5/image-to-image", "defaults:", "  quality: low", "jobs:"]
    for i in range(jobs):
        lines += [f"  - id: job-{i:05d}", f'    prompt: "prompt {i}"', "    image_urls: ['https://example.org/r.jpg']"]
    path = folder / "bench.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _shard_journals(journal: bytes, shards: int, of: int) -> dict[int, list[bytes]]:
    """Each of the first `shards` shards' lines: the run's headers, then its own jobs' events."""
    headers: list[bytes] = []
    lines: dict[int, list[bytes]] = collections.defaultdict(list)
    for line in journal.splitlines(keepends=True):
        key = orjson.loads(line).get("job")
        if key is None:
            headers.append(line)
        elif (part := shard_of(key, of)) <= shards:
            lines[part].append(line)
    return {part: headers + lines[part] for part in range(1, shards + 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=1000, help="shard folders in the prefix")
    parser.add_argument("--of", type=int, default=3000, help="N of shard-K-of-N (and jobs in the manifest)")
    parser.add_argument("--profile", action="store_true", help="print where status spends its time (cProfile)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp, s3_server() as endpoint:
        root = Path(temp)
        env = {**os.environ, **s3_environment(endpoint), "BATCHER_CACHE": str(root / "cache")}
        env["BATCHER_LEDGER"] = str(root / "ledger.jsonl")
        os.environ.update(env)
        manifest_path = _manifest(root, args.of)
        manifest = load_manifest(manifest_path)
        options = RunOptions(
            sandbox=True,
            sandbox_config=SandboxConfig(queue_delay=0.0, run_delay=0.0),
            concurrency=64,
            poll_interval=0.01,
            poll_max=0.05,
            output_dir=root / "local",
        )
        started = time.perf_counter()
        summary = anyio.run(run_manifest, manifest, options)
        assert summary.done == args.of, summary.done
        print(f"built: {args.of} jobs run locally in {time.perf_counter() - started:.1f}s")

        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        journals = _shard_journals((root / "local" / JOURNAL_NAME).read_bytes(), args.shards, args.of)

        def put(part: int) -> None:
            folder = f"run/shard-{part}-of-{args.of}"
            lines = journals[part]
            half = len(lines) // 2
            for number, chunk in enumerate((lines[:half], lines[half:])):
                body = b"".join(chunk)
                client.put_object(Bucket="bench", Key=f"{folder}/journal/{number:08d}.jsonl", Body=body)
            for line in lines:  # the images the journal says were downloaded (status counts them as there)
                event = orjson.loads(line)
                if event["e"] == "downloaded":
                    client.put_object(Bucket="bench", Key=f"{folder}/{event['path']}", Body=b"\x89PNG")

        started = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, journals))
        print(f"built: {args.shards} shard folders put in {time.perf_counter() - started:.1f}s")

        profiled = ["-m", "cProfile", "-s", "cumtime", "-o", str(root / "status.prof")] if args.profile else []
        command = [
            sys.executable,
            *profiled,
            "-m",
            "batcher",
            "status",
            str(manifest_path),
            "-o",
            "s3://bench/run",
            "--json",
        ]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            print(done.stdout, done.stderr, sep="\n")
        if args.profile:
            import pstats

            pstats.Stats(str(root / "status.prof")).sort_stats("cumtime").print_stats(30)
        counts = orjson.loads(done.stdout)["counts"] if done.returncode == 0 else {}
        print("| shards | of | status wall s | exit | done |\n|---|---|---|---|---|")
        print(f"| {args.shards} | {args.of} | {wall:.1f} | {done.returncode} | {counts.get('done')} |")


if __name__ == "__main__":
    main()
