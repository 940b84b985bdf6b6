"""One client of the overhead section, run in a process of its own: a bare script or batcher itself.

    python benchmarks/floors.py CLIENT URL JOBS CONCURRENCY FOLDER [--root CHECKOUT] [--profile FILE]

CLIENT is ``httpx2`` or ``aiohttp`` (a bare script making the calls batcher makes: submit, wait the
first poll interval, poll the status until it says completed, fetch the result once, download the
image, write it; as RunComfy's docs and clients wait, and batcher since issue 23.5), ``httpx2-result``
(the httpx2 floor before: the result polled, one call a job fewer than batcher makes) or
``batcher`` (`run_manifest` of a YAML list of the same jobs, journal, downloads, sidecars and progress
counters on). It prints one JSON line: wall seconds and the process's user and system CPU seconds
(every thread) spent in the run, imports and setup not counted. --root imports batcher from another
checkout (an earlier commit, for a before/after in one run). --profile writes a pyinstrument text
profile of batcher's run (slower: read its shares, not its seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = "openai/gpt-image-1-5/image-to-image"
REF = "https://example.org/ref.jpg"
POLL = 0.05
"""The poll interval of every client: batcher's --poll-min/--poll-max in this bench, and the floors' too."""


def body(i: int) -> dict[str, Any]:
    return {"prompt": f"benchmark prompt {i}", "image_urls": [REF], "quality": "low"}


async def httpx2_floor(url: str, jobs: int, concurrency: int, folder: Path, status: bool = True) -> None:
    import anyio
    import httpx2

    headers = {"Authorization": "Bearer bench"}
    limits = httpx2.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with (
        httpx2.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as api,
        httpx2.AsyncClient(limits=limits, timeout=60) as files,
    ):
        send, receive = anyio.create_memory_object_stream[int](0)

        async def worker(stream: Any) -> None:
            async with stream:
                async for i in stream:
                    request_id = (await api.post(f"/v1/models/{MODEL}", json=body(i))).json()["request_id"]
                    await anyio.sleep(POLL)
                    # /status until it ends, then /result once; the floor before polled /result itself.
                    ask = "status" if status else "result"
                    while True:
                        result = (await api.get(f"/v1/requests/{request_id}/{ask}")).json()
                        if result["status"] == "completed":
                            break
                        await anyio.sleep(POLL)
                    if status:
                        result = (await api.get(f"/v1/requests/{request_id}/result")).json()
                    image = await files.get(result["output"]["image"])
                    (folder / f"{i}.png").write_bytes(image.content)

        async with anyio.create_task_group() as group:
            for _ in range(concurrency):
                group.start_soon(worker, receive.clone())
            receive.close()
            async with send:
                for i in range(jobs):
                    await send.send(i)


async def aiohttp_floor(url: str, jobs: int, concurrency: int, folder: Path) -> None:
    import aiohttp

    headers = {"Authorization": "Bearer bench"}
    queue: asyncio.Queue[int | None] = asyncio.Queue(maxsize=concurrency)
    async with (
        aiohttp.ClientSession(
            base_url=url, headers=headers, connector=aiohttp.TCPConnector(limit=concurrency * 2)
        ) as api,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency * 2)) as files,
    ):

        async def worker() -> None:
            while (i := await queue.get()) is not None:
                async with api.post(f"/v1/models/{MODEL}", json=body(i)) as answer:
                    request_id = (await answer.json())["request_id"]
                await asyncio.sleep(POLL)
                while True:
                    async with api.get(f"/v1/requests/{request_id}/status") as answer:
                        if (await answer.json())["status"] == "completed":
                            break
                    await asyncio.sleep(POLL)
                async with api.get(f"/v1/requests/{request_id}/result") as answer:
                    result = await answer.json()
                async with files.get(result["output"]["image"]) as image:
                    (folder / f"{i}.png").write_bytes(await image.read())

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        for i in range(jobs):
            await queue.put(i)
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)


def write_manifest(path: Path, jobs: int) -> Path:
    with path.open("w") as out:
        out.write(f"model: {MODEL}\ndefaults:\n  quality: low\n  image_urls: ['{REF}']\njobs:\n")
        for i in range(jobs):
            out.write(f"  - id: job-{i:06d}\n    prompt: 'benchmark prompt {i}'\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("client", choices=["httpx2", "httpx2-result", "aiohttp", "batcher"])
    parser.add_argument("url")
    parser.add_argument("jobs", type=int)
    parser.add_argument("concurrency", type=int)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--profile")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    run: Any
    if args.client in ("httpx2", "httpx2-result"):
        import anyio

        def run() -> None:
            status = args.client == "httpx2"
            anyio.run(httpx2_floor, args.url, args.jobs, args.concurrency, args.folder, status)

    elif args.client == "aiohttp":
        import aiohttp  # noqa: F401  (imported before the clock starts)

        def run() -> None:
            asyncio.run(aiohttp_floor(args.url, args.jobs, args.concurrency, args.folder))

    else:
        # The same jobs in a new folder each time, on purpose: never in the user's ledger of runs.
        os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="batcher-floors-state-")
        os.environ.pop("BATCHER_LEDGER", None)
        sys.path.insert(0, args.root)
        import anyio

        from batcher import RunOptions, load_manifest, run_manifest

        manifest = load_manifest(write_manifest(args.folder / "bench.yaml", args.jobs))
        options = RunOptions(
            output_dir=args.folder / "out",
            concurrency=args.concurrency,
            api_base=args.url,
            token="bench",
            poll_interval=POLL,  # the floors' pace: the first look one interval after the submit, then each interval
            poll_max=POLL,
            new_output=True,
        )

        def run() -> None:
            summary = anyio.run(run_manifest, manifest, options)
            assert summary.done == args.jobs, summary

    profiler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    run()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    if profiler is not None:
        profiler.stop()
        Path(args.profile).write_text(profiler.output_text(unicode=False, show_all=False))
    print(json.dumps({"wall": wall, "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime}))


if __name__ == "__main__":
    main()
