"""What polling costs per job, counted at the sandbox: status and result requests, and their answers' bytes.

    python benchmarks/polls.py --jobs 40 --concurrency 16 --queue 2 --run 6

Runs one manifest of --jobs jobs through `run_manifest` with batcher's default poll
bounds against the sandbox on loopback (jobs queued --queue s, then running --run s,
four output images each so the completed answer is a realistic size), and prints,
per job, the status and result calls the sandbox served and the bytes of their answers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batcher import RunOptions, SandboxThread, load_manifest, run_manifest
from batcher.sandbox.server import Sandbox, SandboxConfig

MANIFEST = """
model: openai/gpt-image-1-5/image-to-image
defaults: {quality: low}
jobs:
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--queue", type=float, default=2.0)
    parser.add_argument("--run", type=float, default=6.0)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="batcher-polls-"))
    os.environ["BATCHER_LEDGER"] = str(folder / "ledger.jsonl")  # not the user's ledger
    lines = [MANIFEST.strip()]
    lines += [f'  - {{prompt: "job {i}", image_urls: ["https://example.org/r.jpg"]}}' for i in range(args.jobs)]
    manifest = folder / "m.yaml"
    manifest.write_text("\n".join(lines) + "\n")
    config = SandboxConfig(queue_delay=args.queue, run_delay=args.run, images_per_job=4, seed=1)
    with SandboxThread(Sandbox(config)) as sandbox:
        options = RunOptions(
            api_base=sandbox.url, token="sk-bench", output_dir=folder / "out", concurrency=args.concurrency
        )
        summary = anyio.run(run_manifest, load_manifest(manifest), options)
        stats = sandbox.sandbox.stats()
    assert summary.done == args.jobs, summary
    calls, sizes = stats["calls"], stats["answered_bytes"]
    total_calls = sum(calls.get(kind, 0) for kind in ("status", "result"))
    total_bytes = sum(sizes.get(kind, 0) for kind in ("status", "result"))
    print(f"{args.jobs} jobs, {args.queue:g}s queued + {args.run:g}s running, concurrency {args.concurrency}")
    for kind in ("status", "result"):
        print(
            f"  {kind:7} {calls.get(kind, 0) / args.jobs:6.2f} requests/job  {sizes.get(kind, 0) / args.jobs:8.0f} B/job"
        )
    print(f"  polling {total_calls / args.jobs:6.2f} requests/job  {total_bytes / args.jobs:8.0f} B/job")


if __name__ == "__main__":
    main()
