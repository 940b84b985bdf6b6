"""What becomes of a completed job: its answer journalled, its files fetched, its sidecar written.

`finish` journals RunComfy's completed answer (bounded) or fails a completion
without outputs; `download` fetches each output not already verified on disk
(or held in a remote output's bucket), asking RunComfy once for fresh URLs
when one has expired or moved; `flush_sidecars` writes the waiting sidecars
in batches (derived from the journal, written again by a resume).
"""

from __future__ import annotations

import anyio

from ..confined import OutputDir
from ..errors import ApiError, DownloadError, OutputFolderError
from ..journal.store import JobRecord
from ..manifest.loader import Job
from ..output.jobfiles import file_matches, output_path, write_sidecar
from ..runcomfy.client import RequestResult
from ..runcomfy.polling import remote_duration
from .shared import RunShared

__all__ = ["download", "finish", "flush_sidecars"]


def finish(run: RunShared, job: Job, result: RequestResult) -> None:
    """Journal RunComfy's answer that job completed."""
    if not result.outputs:
        reason = "RunComfy reported the job completed but returned no output files"
        run.record(job, "failed", reason=reason, failure="model_error")
        run.progress.set(job.key, "failed")
        run.progress.error(job.name, reason)
        return
    # The answer is kept up to a bound (fields unknown today may matter tomorrow; a hostile
    # 200 MB answer must not live in the journal for ever), with RunComfy's own duration read
    # here, so that the journal's fold depends on no parsing of answers.
    record = run.record(
        job,
        "completed",
        outputs=result.outputs,
        cost=result.cost,
        duration=remote_duration(result.raw),
        result=result.for_journal(),
    )
    if record.duration is not None:
        run.durations.add(record.duration)


async def download(run: RunShared, job: Job) -> None:
    """Fetch every output of a completed job that is not already where it belongs."""
    progress = run.progress
    record = run.records[job.key]
    refreshed = False
    index = 0
    while index < len(record.outputs):
        url = record.outputs[index]
        target = output_path(run.output_dir, job, index, url)
        known = record.files.get(index)
        if known is not None and (
            run.stored(known) or await anyio.to_thread.run_sync(file_matches, run.output_dir, known)
        ):
            index += 1
            continue
        progress.set(job.key, "downloading")
        try:
            got = await run.downloader.fetch(url, target)
        except DownloadError as exc:
            # Signed URLs expire, and hosts move: ask RunComfy for fresh URLs once.
            if refreshed or record.request_id is None or exc.permanent:
                _failed(run, job, index, str(exc))
                return
            refreshed = True
            fresh = await _fresh_urls(run, job, record, index, exc)
            if fresh is None:
                return
            record = fresh
            continue
        relative = got.path.relative_to(run.output_dir).as_posix()
        record = run.record(job, "downloaded", index=index, path=relative, bytes=got.bytes, sha256=got.sha256)
        index += 1
    # Written in batches (see flush_sidecars): they are derived from the journal, and
    # a resumed run writes them again, so a kill can delay them but not lose them.
    run.sidecars.append((job, record))
    progress.set(job.key, "done")


async def _fresh_urls(run: RunShared, job: Job, record: JobRecord, index: int, exc: DownloadError) -> JobRecord | None:
    """The record with RunComfy's fresh output URLs journalled; None when there are none (journalled)."""
    assert record.request_id is not None
    lane = run.accounts.lane_for(record.account)
    if lane is None:
        _failed(run, job, index, f"{exc}; no token for account {record.account} in this run to ask for fresh URLs")
        return None
    try:
        fresh = await lane.client.result(record.request_id)
    except ApiError as api_exc:
        _failed(run, job, index, f"{exc}; refreshing the URL failed: {api_exc}")
        return None
    if not fresh.outputs:
        _failed(run, job, index, f"{exc}; RunComfy no longer lists outputs")
        return None
    return run.record(job, "urls", outputs=fresh.outputs)


def _failed(run: RunShared, job: Job, index: int, reason: str) -> None:
    run.record(job, "download_failed", index=index, reason=reason)
    run.progress.set(job.key, "failed")
    run.progress.error(job.name, reason)


async def flush_sidecars(run: RunShared) -> None:
    """Write the waiting sidecars, here on the event loop.

    A sidecar is a small JSON file with no fsync (derived from the journal, written again by a
    resume): a few page-cache writes each. On a worker thread, each of its system calls handed the
    GIL to the event loop and back; measured in one process, four pairs of 1,500 jobs at
    concurrency 64, writing them here cost 5.2 against 5.7 ms of CPU a job.
    """
    waiting, run.sidecars = run.sidecars, []
    if not waiting:
        await anyio.lowlevel.checkpoint()
        return
    try:
        folder = OutputDir(run.output_dir)  # opened once a batch, not once a sidecar
    except OSError as exc:
        run.sidecars = waiting + run.sidecars
        msg = f"cannot write the sidecars in {run.output_dir}: {exc.strerror or exc}"
        raise OutputFolderError(msg) from exc
    with folder:
        _write_sidecars(run, waiting, folder)
    await anyio.lowlevel.checkpoint()


def _write_sidecars(run: RunShared, waiting: list[tuple[Job, JobRecord]], folder: OutputDir) -> None:
    for done, (job, record) in enumerate(waiting):
        try:
            write_sidecar(run.output_dir, run.manifest, job, record, folder)
        except OSError as exc:
            run.sidecars = waiting[done:] + run.sidecars  # the final flush tries them again, or says why
            msg = f"cannot write the sidecar of {job.name}: {exc.strerror or exc}"
            raise OutputFolderError(msg) from exc
        except BaseException:
            run.sidecars = waiting[done:] + run.sidecars
            raise
