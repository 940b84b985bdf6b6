"""User-named files are opened safely (issue 24, point 3, the files' side): a FIFO put in place of a local image,
a prompt file or a thumbnail's source is refused with a clear error, never waited on in ``open`` for good."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batcher import load_manifest
from batcher.errors import LocalImageError, ManifestError
from batcher.manifest.payload import payload_for
from batcher.manifest.promptfile import PromptFile
from batcher.review.thumbnails import InputImages
from batcher.sandbox.server import make_png

from .conftest import MODEL, write_manifest

TIMEOUT = 5.0


def _project(root: Path) -> Path:
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "a.png").write_bytes(make_png("a", 16))
    (root / "rows.csv").write_text("subject\ncat\ndog\n")
    return write_manifest(
        root / "m.yaml",
        f"""
        model: {MODEL}
        jobs:
          - from: rows.csv
            prompt: "a {{subject}}"
            image_urls: ["refs/a.png"]
        """,
    )


def _fifo_in_place_of(path: Path) -> Path:
    path.unlink()
    os.mkfifo(path)
    return path


@contextlib.contextmanager
def _unblocking(fifo: Path) -> Iterator[None]:
    """On the way out, free a reader stuck opening fifo (the bug): open its write end, then close it (EOF)."""
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # ENXIO: nobody is reading, nothing is stuck
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def _in_thread(call: Callable[[], Any]) -> tuple[bool, Any]:
    """(finished within TIMEOUT, its result or the exception it raised)."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    return not thread.is_alive(), outcome[0] if outcome else None


def test_a_fifo_in_place_of_a_local_image_at_load_is_refused(tmp_path: Path) -> None:
    manifest = _project(tmp_path / "proj")
    fifo = _fifo_in_place_of(tmp_path / "proj" / "refs" / "a.png")
    with _unblocking(fifo):
        finished, outcome = _in_thread(lambda: load_manifest(manifest))
    assert finished, "loading waited on a FIFO"
    assert isinstance(outcome, ManifestError), outcome
    assert "is not a regular file" in str(outcome) and "a.png" in str(outcome)


def test_a_fifo_in_place_of_a_local_image_at_send_is_a_certain_refusal(tmp_path: Path) -> None:
    manifest = load_manifest(_project(tmp_path / "proj"))
    job = manifest.jobs[0]
    fifo = _fifo_in_place_of(tmp_path / "proj" / "refs" / "a.png")  # after loading, before sending
    with _unblocking(fifo):
        finished, outcome = _in_thread(lambda: payload_for(job))
    assert finished, "payload_for waited on a FIFO: the run would freeze with its intent journalled"
    assert isinstance(outcome, LocalImageError), outcome
    assert "image_urls.0" in str(outcome) and "not a regular file but a named pipe (FIFO)" in str(outcome)


@pytest.mark.parametrize("read", ["rows", "sha256"])
def test_a_fifo_in_place_of_a_prompt_file_between_its_check_and_its_reads_is_refused(tmp_path: Path, read: str) -> None:
    _project(tmp_path / "proj")
    prompt_file = PromptFile(tmp_path / "proj" / "rows.csv", "rows.csv")  # as the load made it, checked
    fifo = _fifo_in_place_of(prompt_file.path)  # then swapped: the rows are read, and hashed, after the check
    with _unblocking(fifo):
        finished, outcome = _in_thread(lambda: list(prompt_file.rows()) if read == "rows" else prompt_file.sha256())
    assert finished, "reading the prompt file waited on a FIFO"
    assert isinstance(outcome, OSError) and "not a regular file" in str(outcome), outcome


def test_a_fifo_as_a_prompt_file_at_load_is_refused_by_name(tmp_path: Path) -> None:
    manifest = _project(tmp_path / "proj")
    fifo = _fifo_in_place_of(tmp_path / "proj" / "rows.csv")
    with _unblocking(fifo):
        finished, outcome = _in_thread(lambda: load_manifest(manifest))
    assert finished
    assert isinstance(outcome, ManifestError), outcome
    assert "rows.csv" in str(outcome) and "not a regular file but a named pipe (FIFO)" in str(outcome)


def test_a_fifo_in_place_of_a_thumbnails_source_is_a_failure_not_a_hang(tmp_path: Path) -> None:
    manifest = load_manifest(_project(tmp_path / "proj"))
    (tmp_path / "out").mkdir()
    images = InputImages(tmp_path / "out")
    (shown,) = images.add(manifest.jobs[0])
    fifo = _fifo_in_place_of(tmp_path / "proj" / "refs" / "a.png")
    with _unblocking(fifo):
        finished, outcome = _in_thread(lambda: images.get(shown.id))
    assert finished, "the review server's thumbnail waited on a FIFO"
    assert outcome is None
    assert "not a regular file" in (images.failure(shown.id) or "")


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_open_regular_refuses_what_is_not_a_file(tmp_path: Path, kind: str) -> None:
    from batcher.confined import NotRegularFileError, open_regular

    path = tmp_path / "x"
    path.mkdir() if kind == "folder" else os.mkfifo(path)
    with pytest.raises(NotRegularFileError, match="not a regular file"):
        open_regular(path)
