from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batcher import JournalCorruptError, JournalLockedError
from batcher.journal.store import JOURNAL_NAME, Journal, encode_event, fold_bytes, read_journal, write_checkpoint


def _events() -> list[dict[str, object]]:
    return [
        {"t": 1.0, "e": "run", "manifest": "m.yaml"},
        {"t": 1.1, "e": "submitting", "job": "a", "name": "a", "input": {"prompt": "é ✓"}},
        {"t": 1.2, "e": "submitted", "job": "a", "request_id": "r1"},
        {"t": 1.3, "e": "submitting", "job": "b", "name": "b"},
        {"t": 1.4, "e": "state", "job": "a", "state": "in_progress"},
        {"t": 1.5, "e": "completed", "job": "a", "outputs": ["http://127.0.0.1/x.png"], "cost": 0.1},
        {"t": 1.6, "e": "downloaded", "job": "a", "index": 0, "path": "a/x.png", "bytes": 3, "sha256": "00"},
        {"t": 1.7, "e": "uncertain", "job": "b", "reason": "reset"},
    ]


def _journal_bytes(events: list[dict[str, object]]) -> bytes:
    return b"".join(encode_event(e) for e in events)


def test_fold_gives_each_jobs_state() -> None:
    folded = fold_bytes(_journal_bytes(_events()))
    a, b = folded.records["a"], folded.records["b"]
    assert a.phase == "completed" and a.downloaded and a.request_id == "r1" and a.cost == 0.1
    assert b.phase == "uncertain" and b.request_id is None and b.submits == 1
    assert folded.headers[0]["manifest"] == "m.yaml"
    assert folded.warnings == []


def test_lines_are_json_with_a_crc() -> None:
    line = encode_event({"e": "submitted", "job": "a", "request_id": "r"})
    parsed = json.loads(line)
    assert parsed["request_id"] == "r" and len(parsed["crc"]) == 8


def test_torn_last_line_is_dropped_with_a_warning_and_cut_before_appending(tmp_path: Path) -> None:
    data = _journal_bytes(_events())
    torn = data + encode_event({"e": "submitted", "job": "b", "request_id": "r2"})[:25]
    (tmp_path / JOURNAL_NAME).write_bytes(torn)
    journal = Journal(tmp_path)
    folded = journal.open()
    assert folded.records["b"].phase == "uncertain"
    assert any("torn last line" in w for w in folded.warnings)
    journal.append("note", "a", reason="after the tear")
    journal.close()
    again = read_journal(tmp_path / JOURNAL_NAME)
    assert again.warnings == []
    assert again.records["a"].error == "after the tear"


def test_damaged_middle_line_is_an_error_naming_it(tmp_path: Path) -> None:
    lines = _journal_bytes(_events()).splitlines(keepends=True)
    lines[2] = lines[2].replace(b"r1", b"r9")  # still valid JSON: only the CRC can tell
    (tmp_path / JOURNAL_NAME).write_bytes(b"".join(lines))
    with pytest.raises(JournalCorruptError, match="line 3 is damaged"):
        read_journal(tmp_path / JOURNAL_NAME)


def test_the_journal_is_private_to_its_owner(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "out")
    journal.open()
    journal.append("note", "a", reason="x")
    journal.close()
    assert (tmp_path / "out" / JOURNAL_NAME).stat().st_mode & 0o077 == 0


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    first = Journal(tmp_path)
    first.open()
    try:
        with pytest.raises(JournalLockedError, match=f"pid {os.getpid()}"):
            Journal(tmp_path).open()
        # ... also from another process, which is how two `batcher run`s meet
        code = (
            "import sys; from pathlib import Path; from batcher.journal.store import Journal\n"
            "try:\n    Journal(Path(sys.argv[1])).open()\nexcept Exception as e:\n    print(type(e).__name__)"
        )
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "JournalLockedError"
    finally:
        first.close()
    Journal(tmp_path).open()  # free again once the first one closed


def _expected_phase(events: list[dict[str, object]], key: str) -> str | None:
    phase = None
    for event in events:
        if event.get("job") != key:
            continue
        phase = {
            "submitting": "submitting",
            "submitted": "submitted",
            "uncertain": "uncertain",
            "completed": "completed",
            "downloaded": phase,
            "state": phase,
        }[str(event["e"])]
    return phase


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(cut=st.integers(min_value=0), padding=st.integers(min_value=0, max_value=64))
def test_any_cut_with_any_padding_folds_to_a_prefix(cut: int, padding: int) -> None:
    """What a crash or power loss leaves: a prefix cut at any byte, maybe NUL padded."""
    events = _events()
    data = _journal_bytes(events)
    cut %= len(data) + 1
    folded = fold_bytes(data[:cut] + b"\0" * padding)
    # A line counts once all of it but its newline survived.
    ends = [len(_journal_bytes(events[: i + 1])) - 1 for i in range(len(events))]
    survivors = [event for event, end in zip(events, ends, strict=True) if end <= cut]
    for key in ("a", "b"):
        expected = _expected_phase(survivors, key)
        record = folded.records.get(key)
        assert (record.phase if record else None) == expected
        # The decision resume takes from here is safe: an intent without its answer is uncertain,
        # never "pending" (which would resubmit and maybe pay twice).
        if expected == "submitting":
            assert record is not None and record.request_id is None
    assert folded.good_length <= cut


def test_a_last_line_missing_only_its_newline_is_kept_and_mended(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_NAME).write_bytes(_journal_bytes(_events())[:-1])
    journal = Journal(tmp_path)
    assert journal.open().records["b"].phase == "uncertain"
    journal.append("note", "b", reason="next")
    journal.close()
    assert read_journal(tmp_path / JOURNAL_NAME).records["b"].error == "next"


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
@example(position=210, flip=32)  # found by Hypothesis: "b" -> "B" in a CRC's hex digits
def test_a_flipped_byte_before_the_last_line_is_always_caught(position: int, flip: int) -> None:
    events = _events()
    data = bytearray(_journal_bytes(events))
    last_line_start = data.rindex(b"\n", 0, len(data) - 1) + 1
    position %= last_line_start
    if data[position] == ord("\n") or data[position] ^ flip == ord("\n"):
        return  # a newline moved makes a different line split; covered by the cut test
    data[position] ^= flip
    with pytest.raises(JournalCorruptError):
        fold_bytes(bytes(data))


def test_a_failed_redownload_no_longer_claims_the_file() -> None:
    from batcher.journal.standing import category

    events = [*_events(), {"t": 2.0, "e": "download_failed", "job": "a", "index": 0, "reason": "disk"}]
    record = fold_bytes(_journal_bytes(events)).records["a"]
    assert not record.downloaded and record.error == "disk"
    assert category(record) == "failed"


# -- checkpoints ---------------------------------------------------------------------------


def _write_session(folder: Path, start: int, count: int, *, close: bool = True) -> Journal:
    journal = Journal(folder)
    journal.open()
    for i in range(start, start + count):
        key = f"{i:04d}"
        journal.append("submitting", key, name=f"job-{i}", input={"prompt": f"p {i}"})
        journal.append("submitted", key, request_id=f"r-{i}")
        if i % 3 == 0:
            journal.append("completed", key, outputs=[f"https://cdn.example/{i}.png"], cost=0.01)
            journal.append("downloaded", key, index=0, path=f"job-{i}/0.png", bytes=10, sha256="ab")
        elif i % 3 == 1:
            journal.append("failed", key, reason="nsfw")
    if close:
        journal.close()
    return journal


def _same(a: object, b: object) -> None:
    from batcher.journal.store import FoldedJournal

    assert isinstance(a, FoldedJournal) and isinstance(b, FoldedJournal)
    assert a.records == b.records and a.headers == b.headers and a.good_length == b.good_length


@pytest.fixture
def small_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("batcher.journal.store.CHECKPOINT_MIN_BYTES", 0)


@pytest.mark.usefixtures("small_checkpoints")
def test_a_checkpoint_folds_only_the_tail_and_agrees_with_a_full_fold(tmp_path: Path) -> None:
    from batcher.journal.store import CHECKPOINT_NAME

    _write_session(tmp_path, 0, 30)
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    killed = _write_session(tmp_path, 30, 10, close=False)  # a killed run leaves no new checkpoint
    killed._fd = None  # type: ignore[attr-defined]
    data = (tmp_path / JOURNAL_NAME).read_bytes()
    with_checkpoint = read_journal(tmp_path / JOURNAL_NAME)
    _same(with_checkpoint, fold_bytes(data))
    assert len(with_checkpoint.records) == 40 and with_checkpoint.records["0003"].downloaded


@pytest.mark.usefixtures("small_checkpoints")
def test_a_checkpoint_that_does_not_match_is_ignored(tmp_path: Path) -> None:
    from batcher.journal.store import CHECKPOINT_NAME

    _write_session(tmp_path, 0, 20)
    path = tmp_path / JOURNAL_NAME
    full = fold_bytes(path.read_bytes())

    (tmp_path / CHECKPOINT_NAME).write_bytes(b"{not json")
    _same(read_journal(path), full)

    _write_session(tmp_path, 20, 1)  # a fresh checkpoint, then the journal's start is damaged by hand
    data = bytearray(path.read_bytes())
    data[30] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError, match="line 1 is damaged"):
        read_journal(path)  # the checkpoint does not hide the damage: its hash no longer matches


@pytest.mark.usefixtures("small_checkpoints")
def test_a_torn_tail_after_a_checkpoint_is_cut_as_usual(tmp_path: Path) -> None:
    _write_session(tmp_path, 0, 10)
    path = tmp_path / JOURNAL_NAME
    good = path.read_bytes()
    with path.open("ab") as handle:
        handle.write(encode_event({"t": 9.0, "e": "submitting", "job": "x", "name": "x"})[:25])
    folded = read_journal(path)
    assert folded.good_length == len(good) and "torn last line" in folded.warnings[0]
    assert "(line 32)" in folded.warnings[0]  # 31 lines before it: numbered from the journal's start, not the tail's
    journal = Journal(tmp_path)
    journal.open()
    journal.close()
    assert path.read_bytes() == good


def test_a_settled_record_reads_back_equal_and_changes_only_through_live(tmp_path: Path) -> None:
    """RecordTable keeps records a run is done with as deflated rows: reading gives an equal copy,
    `live` the one to change, and a checkpoint of settled rows folds back to the same records."""
    from batcher.journal.table import RecordTable, record_row

    journal = Journal(tmp_path)
    journal.open()
    for i in range(3):
        key = f"{i:016x}"
        journal.append("submitting", key, name=f"job-{i}", model="m/a/b", input={"prompt": f"p {i}"})
        journal.append("submitted", key, request_id=f"r-{i}", result_url=f"http://h/v1/requests/r-{i}/result")
        journal.append("completed", key, outputs=[f"http://h/files/r-{i}/0.png"], cost=0.01)
        journal.append("downloaded", key, index=0, path=f"job-{i}/0.png", bytes=10, sha256="0" * 64)
    table: RecordTable = journal.folded.records
    before = {key: record_row(record) for key, record in table.items()}
    for key in list(table):
        table.settle(key)
    assert {key: record_row(record) for key, record in table.items()} == before
    first = f"{0:016x}"
    table[first].name = "changed on a copy"  # a copy: the table does not change
    assert table[first].name == "job-0"
    live = table.live(first)
    assert live is not None and live is table.live(first)
    journal.append("note", first, reason="after settling")  # goes through live
    assert table[first].error == "after settling"
    journal.close()
    write_checkpoint(tmp_path / JOURNAL_NAME, journal.folded, journal.folded.good_length)
    resumed = read_journal(tmp_path / JOURNAL_NAME)
    assert {k: record_row(r) for k, r in resumed.records.items()} == {
        k: record_row(r) for k, r in fold_bytes((tmp_path / JOURNAL_NAME).read_bytes()).records.items()
    }


def test_a_row_too_long_for_the_arena_stays_a_live_record() -> None:
    """A place holds a row's length in 24 bits: a longer row (a hostile server's thousands of output URLs, or a
    checkpoint line made long) must not wrap into another row's bytes."""
    import orjson

    from batcher.journal.records import JobRecord
    from batcher.journal.table import RecordTable, record_row

    table = RecordTable()
    huge = JobRecord("a" * 16, name="huge", phase="completed", outputs=["https://x/" + "y" * (1 << 24)])
    table["a" * 16] = huge
    table.settle("a" * 16)
    assert table["a" * 16].outputs == huge.outputs
    small = JobRecord("b" * 16, name="small")
    table.put_row("b" * 16, orjson.dumps(record_row(small)))
    table.put_row("c" * 16, orjson.dumps(record_row(huge)))
    assert table["b" * 16].name == "small" and table["c" * 16].outputs == huge.outputs
    assert isinstance(table._rows["c" * 16], JobRecord), "a 16 MB checkpoint row is kept live, not wrapped"


def test_a_line_past_the_cap_is_refused_naming_it_when_read_and_never_written(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from batcher.cli.main import cli
    from batcher.journal.store import MAX_LINE_BYTES

    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "model: openai/gpt-image-1-5/image-to-image\njobs:\n"
        "  - prompt: a lighthouse\n    image_urls: ['https://example.org/r.jpg']\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    # A sound line (its CRC matches) far longer than any batcher writes: folding it would cost ~5x its size.
    huge = {"t": 1.15, "e": "submitting", "job": "c", "name": "c", "input": {"prompt": "x" * (MAX_LINE_BYTES + 1)}}
    events = _events()
    (out / JOURNAL_NAME).write_bytes(_journal_bytes([events[0], huge, *events[1:]]))
    result = CliRunner().invoke(cli, ["status", str(manifest), "-o", str(out)])
    assert result.exit_code == 2, result.output[:500]
    assert re.search(rf"{JOURNAL_NAME} line 2 is 16,777,\d{{3}} bytes long, over the 16,777,216", result.output)
    assert "remove that line" in result.output
    # The writer refuses such an event before a byte of it is written, and the journal stays readable.
    sound = tmp_path / "sound"
    journal = Journal(sound)
    journal.open()
    try:
        journal.append("submitting", "a", name="a", input={"prompt": "a lighthouse"})
        before = (sound / JOURNAL_NAME).read_bytes()
        with pytest.raises(JournalCorruptError, match=r"'submitting' event of job b would be a journal line"):
            journal.append("submitting", "b", name="b", input={"prompt": "x" * MAX_LINE_BYTES})
        assert (sound / JOURNAL_NAME).read_bytes() == before
    finally:
        journal.close()
    assert list(read_journal(sound / JOURNAL_NAME).records) == ["a"]
