"""Hostile repositories: links committed into the output folder, and journals whose paths were edited.

A link below the output folder is an error naming it, and nothing is ever
written through one; the output folder itself may be reached through a link
(the user's choice). A journalled path is checked again wherever it is used.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from batcher import (
    JournalError,
    OutputFolderError,
    RunSummary,
    SandboxThread,
    load_manifest,
    read_journal,
    run_manifest,
)
from batcher.cli.main import cli
from batcher.journal.store import JOURNAL_NAME, encode_event
from batcher.output.dataset import METADATA_NAME
from batcher.reports.gallery import GALLERY_NAME

from .conftest import fast_options, many_jobs_manifest

StartSandbox = Callable[..., SandboxThread]
PRECIOUS = b"precious: must never change\n"


async def _run(manifest: Path, sandbox: SandboxThread, output: str = "out") -> RunSummary:
    options = fast_options(api_base=sandbox.url, output_dir=Path(output))
    return await run_manifest(load_manifest(manifest), options)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the output folder that a planted link points at."""
    path = tmp_path / "victim.txt"
    path.write_bytes(PRECIOUS)
    return path


@pytest.mark.parametrize(
    "name",
    [
        ".batcher.lock",
        JOURNAL_NAME,
        "state.checkpoint",
        ".state.checkpoint.part",
        METADATA_NAME,
        ".metadata.jsonl.part",
    ],
)
async def test_links_in_the_output_folder_stop_the_run_before_anything_is_sent(
    tmp_path: Path, start_sandbox: StartSandbox, victim: Path, name: str
) -> None:
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / name).symlink_to(victim)
    # The output folder itself given through a link is the user's choice, and fine.
    (tmp_path / "via-link").symlink_to(tmp_path / "out", target_is_directory=True)
    with pytest.raises(JournalError, match=re.escape(name) + " is a symbolic link.*Remove it"):
        await _run(manifest, sandbox, "via-link")
    assert victim.read_bytes() == PRECIOUS
    assert sandbox.sandbox.submits == [], "refused before paying for anything"

    (tmp_path / "out" / name).unlink()
    summary = await _run(manifest, sandbox, "via-link")
    assert summary.done == 2 and len(list((tmp_path / "out").glob("job-*/*.png"))) == 2
    assert victim.read_bytes() == PRECIOUS


async def test_a_job_folder_that_is_a_link_is_refused(tmp_path: Path, start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "job-0001").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(JournalError, match=r"job-0001 is a symbolic link"):
        await _run(manifest, sandbox)
    assert list(elsewhere.iterdir()) == [] and sandbox.sandbox.submits == []


def _key8(manifest: Path, index: int = 0) -> str:
    return load_manifest(manifest).jobs[index].key[:8]


@pytest.mark.parametrize(
    "planted", ["{key}-0.png", ".{key}.json.part", "{key}.json"], ids=["image", "sidecar-part", "sidecar"]
)
async def test_links_inside_a_job_folder_stop_the_run_and_it_resumes_once_removed(
    tmp_path: Path, start_sandbox: StartSandbox, victim: Path, planted: str
) -> None:
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    link = tmp_path / "out" / "job-0000" / planted.format(key=_key8(manifest))
    link.parent.mkdir(parents=True)
    link.symlink_to(victim)
    with pytest.raises(OutputFolderError, match=re.escape(link.name) + " is a symbolic link"):
        await _run(manifest, sandbox)
    assert victim.read_bytes() == PRECIOUS

    link.unlink()
    summary = await _run(manifest, sandbox)
    assert summary.done == 1 and len(sandbox.sandbox.submits) == 1, "resumed, not paid for again"
    assert victim.read_bytes() == PRECIOUS


@pytest.mark.parametrize("name", [f".{GALLERY_NAME}.part", GALLERY_NAME, f".{METADATA_NAME}.part"])
async def test_report_never_writes_through_a_link(
    tmp_path: Path, start_sandbox: StartSandbox, victim: Path, name: str
) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    sandbox = start_sandbox()
    assert (await _run(manifest, sandbox)).done == 1
    (tmp_path / "out" / name).unlink(missing_ok=True)  # the run wrote its gallery and metadata at its end
    (tmp_path / "out" / name).symlink_to(victim)
    result = CliRunner().invoke(cli, ["report", str(manifest), "-o", "out"])
    assert result.exit_code != 0
    assert f"{name} is a symbolic link" in " ".join(result.output.split())
    assert victim.read_bytes() == PRECIOUS
    # Nor does a run, which writes both at its end: it refuses the folder before it starts.
    with pytest.raises(JournalError, match="is a symbolic link"):
        await _run(manifest, sandbox)
    assert victim.read_bytes() == PRECIOUS


def _tamper(journal: Path, path: str) -> None:
    """Point every `downloaded` event at path, with a correct CRC (what a hostile edit would do)."""
    lines = []
    for line in journal.read_text().splitlines():
        event = json.loads(line)
        event.pop("crc")
        if event["e"] == "downloaded":
            event["path"] = path
        lines.append(encode_event(event))
    journal.write_bytes(b"".join(lines))


@pytest.mark.parametrize("where", ["dotdot", "absolute", "through-link"])
async def test_journalled_paths_are_checked_again_wherever_they_are_used(
    tmp_path: Path, start_sandbox: StartSandbox, where: str
) -> None:
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    assert (await _run(manifest, sandbox)).done == 1
    out = tmp_path / "out"
    (image,) = out.glob("job-0000/*.png")
    # The same bytes outside the folder: a journal pointing there would pass a size and hash check.
    outside = tmp_path / "elsewhere" / "victim.png"
    outside.parent.mkdir()
    outside.write_bytes(image.read_bytes())
    (out / "job-0000" / "sub").symlink_to(outside.parent, target_is_directory=True)
    path = {"dotdot": "../elsewhere/victim.png", "absolute": str(outside), "through-link": "job-0000/sub/victim.png"}
    _tamper(out / JOURNAL_NAME, path[where])
    image.unlink()

    result = CliRunner().invoke(cli, ["report", str(manifest), "-o", "out"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "victim" not in (out / GALLERY_NAME).read_text(), "the gallery must not point outside"
    assert (out / METADATA_NAME).read_text() == "", "the dataset must not list it"

    # The next run treats it as not downloaded: fetched again into the folder, not paid for again.
    summary = await _run(manifest, sandbox)
    assert summary.done == 1 and len(sandbox.sandbox.submits) == 1
    (record,) = read_journal(out / JOURNAL_NAME).records.values()
    assert record.files[0].path == image.relative_to(out).as_posix() and image.is_file()
    assert outside.read_bytes() == image.read_bytes()


def test_a_symlink_error_is_a_batcher_error_with_a_clear_message(tmp_path: Path, victim: Path) -> None:
    """Through the CLI: a BatcherError's exit code and message, no traceback."""
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".batcher.lock").symlink_to(victim)
    result = CliRunner().invoke(cli, ["run", str(manifest), "--sandbox", "-o", "out", "-q"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert ".batcher.lock is a symbolic link" in " ".join(result.output.split())
    assert victim.read_bytes() == PRECIOUS
    assert os.path.islink(tmp_path / "out" / ".batcher.lock"), "reported, not silently replaced"


@pytest.mark.parametrize("linked", ["output", "output/sandbox", "output/sandbox/m"])
def test_a_default_output_folder_committed_as_a_link_is_refused(tmp_path: Path, linked: str) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / linked
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(elsewhere, target_is_directory=True)
    result = CliRunner().invoke(cli, ["run", str(manifest), "--sandbox", "-q"], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert f"{link} is a symbolic link" in result.output and "-o" in result.output
    assert list(elsewhere.iterdir()) == []


def test_status_never_reads_a_journal_that_is_a_link_or_a_device(tmp_path: Path) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / JOURNAL_NAME).symlink_to("/dev/zero")  # read to the end, this never ends
    result = CliRunner().invoke(cli, ["status", str(manifest), "-o", str(folder), "--json"], catch_exceptions=False)
    assert result.exit_code == 0 and json.loads(result.output)["counts"]["pending"] == 1
    with pytest.raises(JournalError, match="cannot read the journal"):
        read_journal(folder / JOURNAL_NAME)


def test_live_prices_committed_into_the_output_folder_cannot_lower_the_estimates(tmp_path: Path) -> None:
    from batcher.manifest.cost import forget_price_tables

    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2, quality="high")
    table = tmp_path / "out" / ".prices" / "openai" / "gpt-image-1-5" / "image-to-image.pricing.json"
    table.parent.mkdir(parents=True)
    zeros = {"model": "openai/gpt-image-1-5/image-to-image", "keys": ["quality"], "prices": {"high": 0.0}}
    table.write_text(json.dumps(zeros), encoding="utf-8")
    forget_price_tables()
    result = CliRunner().invoke(cli, ["status", str(manifest), "-o", str(tmp_path / "out"), "--json"])
    assert json.loads(result.output)["to_spend"] == pytest.approx(2 * 0.133)
