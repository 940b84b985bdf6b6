"""Exports, each loaded back by its own library and checked row by row against the journal."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batcher import UsageError, load_manifest
from batcher.cli.main import cli
from batcher.output.dataset import dataset_rows
from batcher.output.folders import read_folder
from batcher.reports.export import export_dataset

from .reviewkit import decide, finished_run

JOBS = 5
DECIDED = {"job-0000": "accepted", "job-0001": "rejected", "job-0003": "accepted"}


@pytest.fixture
def reviewed(tmp_path: Path) -> tuple[Path, Path, dict[str, dict[str, Any]]]:
    """A run of five jobs, two accepted and one rejected; returns (manifest, output, expected rows by key)."""
    path, out = finished_run(tmp_path, JOBS)
    manifest = load_manifest(path)
    decide(manifest, out, DECIDED)  # type: ignore[arg-type]
    rows = {}
    for row in dataset_rows(manifest, read_folder(out).records):
        row["decision"] = DECIDED.get(row["job_id"], "undecided")
        row["bytes"] = (out / row["file_name"]).read_bytes()
        rows[f"{row['job_key']}_{row['output_index']}"] = row
    assert len(rows) == JOBS
    return path, out, rows


def _export(path: Path, out: Path, dest: Path, *flags: str) -> str:
    result = CliRunner().invoke(cli, ["export", str(path), str(dest), "-o", str(out), *flags], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _same(row: dict[str, Any], expected: dict[str, Any]) -> None:
    if "file_name" in row:  # the imagefolder loader turns it into the image
        assert row["file_name"] == expected["file_name"]
    for column in ("prompt", "image_urls", "model", "job_id", "job_key", "request_id", "sha256"):
        assert row[column] == expected[column], column
    assert row["repeat_index"] == expected["repeat_index"] and row["output_index"] == expected["output_index"]
    assert row["decision"] == expected["decision"]


# webdataset leaves its shard files for the garbage collector to close: its warning, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning", "ignore::ResourceWarning")
def test_webdataset_shards_load_with_the_webdataset_library(tmp_path: Path, reviewed) -> None:
    wds = pytest.importorskip("webdataset", reason="installed with the test extras")
    path, out, expected = reviewed
    output = _export(path, out, tmp_path / "wds", "--format", "webdataset", "--shard-size", "2")
    assert "5 images" in output and "3 file(s)" in output
    shards = sorted((tmp_path / "wds").glob("shard-*.tar"))
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    seen = {}
    dataset = wds.WebDataset([str(s) for s in shards], shardshuffle=False).decode("pil")
    for sample in dataset:
        want = expected[sample["__key__"]]
        _same(sample["json"], want)
        assert sample["json"]["parameters"] == want["parameters"]
        assert sample["png"].size == (64, 64)
        seen[sample["__key__"]] = sample
    assert set(seen) == set(expected)
    # The raw bytes are the downloaded file's, and a second export is the same, byte for byte.
    with tarfile.open(shards[0]) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".png"))
        data = archive.extractfile(member).read()  # type: ignore[union-attr]
    assert data == expected[member.name.removesuffix(".png")]["bytes"]
    _export(path, out, tmp_path / "wds2", "--format", "webdataset", "--shard-size", "2")
    assert (tmp_path / "wds2" / "shard-000001.tar").read_bytes() == shards[1].read_bytes()


def test_parquet_loads_as_a_datasets_image_column(tmp_path: Path, reviewed, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets", reason="installed with the test extras")
    pq = pytest.importorskip("pyarrow.parquet", reason="installed with the test extras")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    path, out, expected = reviewed
    _export(path, out, tmp_path / "pq", "--format", "parquet", "--shard-size", "3")
    files = sorted((tmp_path / "pq").glob("*.parquet"))
    assert [f.name for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    # pyarrow: the bytes as they were downloaded.
    table = pq.read_table(files[0])
    assert table.num_rows == 3
    for row in table.to_pylist():
        want = expected[f"{row['job_key']}_{row['output_index']}"]
        _same(row, want)
        assert row["image"]["bytes"] == want["bytes"]
        assert json.loads(row["parameters"]) == want["parameters"]
    # datasets: an Image column, decoded to pictures.
    loaded = datasets.load_dataset("parquet", data_dir=str(tmp_path / "pq"), cache_dir=str(tmp_path / "hf"))["train"]
    assert isinstance(loaded.features["image"], datasets.Image)
    assert loaded.num_rows == JOBS
    for row in loaded:
        want = expected[f"{row['job_key']}_{row['output_index']}"]
        _same(row, want)
        assert row["image"].size == (64, 64)
        assert hashlib.sha256(want["bytes"]).hexdigest() == row["sha256"]


def test_imagefolder_export_loads_with_datasets(tmp_path: Path, reviewed, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets", reason="installed with the test extras")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    path, out, expected = reviewed
    _export(path, out, tmp_path / "folder", "--accepted-only")
    dest = tmp_path / "folder"
    assert sorted(p.name for p in dest.iterdir()) == ["job-0000", "job-0003", "metadata.jsonl"]
    loaded = datasets.load_dataset("imagefolder", data_dir=str(dest), cache_dir=str(tmp_path / "hf"))["train"]
    assert loaded.num_rows == 2
    for row in loaded:
        want = expected[f"{row['job_key']}_{row['output_index']}"]
        _same(row, want)
        assert row["decision"] == "accepted" and row["image"].size == (64, 64)


def test_accepted_only_keeps_the_accepted_images_in_every_format(tmp_path: Path, reviewed) -> None:
    path, out, expected = reviewed
    accepted = {key for key, row in expected.items() if row["decision"] == "accepted"}
    _export(path, out, tmp_path / "w", "--format", "webdataset", "--accepted-only")
    with tarfile.open(tmp_path / "w" / "shard-000000.tar") as archive:
        keys = {name.split(".")[0] for name in archive.getnames()}
    assert keys == accepted
    pq = pytest.importorskip("pyarrow.parquet")
    _export(path, out, tmp_path / "p", "--format", "parquet", "--accepted-only")
    rows = pq.read_table(tmp_path / "p" / "train-00000-of-00001.parquet").to_pylist()
    assert {f"{r['job_key']}_{r['output_index']}" for r in rows} == accepted


def test_an_export_never_overwrites_and_leaves_nothing_half_written(tmp_path: Path, reviewed) -> None:
    path, out, _ = reviewed
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    result = CliRunner().invoke(cli, ["export", str(path), str(taken), "-o", str(out)])
    assert result.exit_code == 2 and "not an empty folder" in result.output
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]
    # An image changed since its download is left out, with a warning, never exported as the journal's.
    first = sorted(out.glob("job-0000/*.png"))[0]
    first.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    result = CliRunner().invoke(cli, ["export", str(path), str(tmp_path / "w"), "-o", str(out), "-f", "webdataset"])
    assert result.exit_code == 0 and "left out" in result.output and "4 images" in result.output
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_nothing_to_export_is_a_clear_refusal(tmp_path: Path) -> None:
    path, out = finished_run(tmp_path, 2)
    with pytest.raises(UsageError, match="no accepted images"):
        export_dataset(load_manifest(path), out, tmp_path / "d", "webdataset", accepted_only=True)
    assert not (tmp_path / "d").exists()


def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, out = finished_run(tmp_path, 1)
    real_import = builtins.__import__

    def no_pyarrow(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    result = CliRunner().invoke(cli, ["export", str(path), str(tmp_path / "d"), "-o", str(out), "-f", "parquet"])
    assert result.exit_code == 2
    assert (
        "pip install pyarrow" in result.output and "batcher[parquet]" not in result.output
    )  # the PyPI name is another project's
    assert not (tmp_path / "d").exists()


def test_webdataset_keys_hold_no_dot_and_json_is_the_row(tmp_path: Path, reviewed) -> None:
    path, out, expected = reviewed
    _export(path, out, tmp_path / "w", "-f", "webdataset")
    with tarfile.open(tmp_path / "w" / "shard-000000.tar") as archive:
        names = archive.getnames()
        assert all(name.count(".") == 1 for name in names)
        member = archive.extractfile(names[1])
        assert member is not None
        row = json.load(io.TextIOWrapper(member, encoding="utf-8"))
    assert row["file_name"] == expected[names[1].split(".")[0]]["file_name"]
