"""Helpers for the review, replacement and export tests: a finished sandbox run, decisions, a big folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anyio

from batcher import load_manifest, run_manifest
from batcher.journal.records import JobRecord
from batcher.journal.store import Journal
from batcher.manifest.loader import Manifest
from batcher.output.folders import read_folder
from batcher.review.decisions import Decision, DecisionLog, input_group
from batcher.review.replacements import with_replacements
from batcher.sandbox.png import make_png
from batcher.sandbox.server import SandboxConfig

from .conftest import fast_options, many_jobs_manifest


def finished_run(tmp_path: Path, jobs: int, *, name: str = "night", **config: object) -> tuple[Path, Path]:
    """A sandbox run of `jobs` jobs, all done; returns (manifest path, output folder)."""
    path = many_jobs_manifest(tmp_path / f"{name}.yaml", jobs)
    out = tmp_path / "output" / name
    settings: dict[str, object] = {"queue_delay": 0.01, "run_delay": 0.01, "seed": 3, **config}
    options = fast_options(token=None, output_dir=out, sandbox=True, sandbox_config=SandboxConfig(**settings))  # type: ignore[arg-type]
    summary = anyio.run(run_manifest, load_manifest(path), options)
    assert summary.done == jobs, summary
    return path, out


def records_of(out: Path) -> dict[str, JobRecord]:
    return read_folder(out).records


def decide(manifest: Manifest, out: Path, wanted: dict[str, Decision]) -> None:
    """Record decisions by job name (output 0 of each), as the review page would."""
    manifest = with_replacements(manifest, out)
    jobs = {job.name: job for job in manifest.jobs}
    records = records_of(out)
    with DecisionLog(out) as log:
        for name, decision in wanted.items():
            job = jobs[name]
            log.append(job.key, 0, records[job.key].files[0].sha256, decision, input_group(job))


def big_folder(tmp_path: Path, images: int) -> tuple[Path, Path]:
    """A manifest of `images` jobs (one entry, repeat) and an output folder where every one is done, written
    straight into the journal (a run of 10,000 jobs takes minutes; a review needs only its result)."""
    manifest_path = tmp_path / "big.yaml"
    manifest_path.write_text(
        "model: openai/gpt-image-1-5/image-to-image\n"
        "defaults: {quality: low}\n"
        "jobs:\n"
        "  - id: shot\n"
        '    prompt: "a lighthouse at dusk, long exposure"\n'
        "    image_urls: ['https://example.org/ref.jpg']\n"
        f"    repeat: {images}\n",
        encoding="utf-8",
    )
    manifest = load_manifest(manifest_path)
    out = tmp_path / "output" / "big"
    journal = Journal(out)
    journal.open()
    try:
        for number, job in enumerate(manifest.jobs):
            data = make_png(f"{job.key}", 16 + number % 48)
            relative = f"{job.name}/{job.key[:8]}-0.png"
            (out / job.name).mkdir(parents=True, exist_ok=True)
            (out / relative).write_bytes(data)
            url = f"https://files.example/{job.key}.png"
            journal.append("submitting", job.key, name=job.name, model=job.model, input=job.input)
            journal.append("submitted", job.key, request_id=f"r-{number}")
            journal.append("completed", job.key, outputs=[url], cost=0.009)
            sha = hashlib.sha256(data).hexdigest()
            journal.append("downloaded", job.key, index=0, path=relative, bytes=len(data), sha256=sha)
        journal.append("run", manifest=str(manifest_path), api_base="sandbox", jobs=images)
    finally:
        journal.close()
    return manifest_path, out
