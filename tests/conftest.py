from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from batcher import RetryPolicy, RunOptions, Sandbox, SandboxConfig, SandboxThread
from batcher.journal.store import Journal

TOKEN = "sk-test-SENTINEL-7f3a9"
REF = "https://example.org/ref.jpg"
MODEL = "openai/gpt-image-1-5/image-to-image"
"""The bundled model most tests' manifests use."""


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """The CLI's logging set-up (`basicConfig(force=True)`, ERROR with -q) is the process's: undone after each
    test, so a later test in the same worker (pytest-xdist runs many in one) sees warnings again."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    ours = {name: logging.getLogger(name).level for name in ("batcher", "httpx2", "httpcore2")}
    yield
    root.setLevel(level)
    root.handlers[:] = handlers
    for name, was in ours.items():
        logging.getLogger(name).setLevel(was)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test works in its own folder with no token or API base from the outside."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RUNCOMFY_API_TOKEN", raising=False)
    monkeypatch.delenv("RUNCOMFY_API_TOKENS", raising=False)
    monkeypatch.delenv("RUNCOMFY_API_TOKEN_FILE", raising=False)
    monkeypatch.delenv("RUNCOMFY_API_BASE", raising=False)
    # The per-user ledger of output folders: each test's own, never the real one.
    monkeypatch.delenv("BATCHER_LEDGER", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / ".state"))
    # Every journal gets a checkpoint, so that resumes in tests start from one and fold only the tail.
    monkeypatch.setattr("batcher.journal.store.CHECKPOINT_MIN_BYTES", 0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def start_sandbox() -> Iterator[Callable[..., SandboxThread]]:
    """Start sandboxes on loopback threads: start_sandbox(queue_delay=..., fault_rate=...)."""
    started: list[SandboxThread] = []

    def start(**config: object) -> SandboxThread:
        config.setdefault("queue_delay", 0.05)
        config.setdefault("run_delay", 0.1)
        config.setdefault("seed", 1)
        thread = SandboxThread(Sandbox(SandboxConfig(**config))).start()  # type: ignore[arg-type]
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.stop()


def fast_options(**overrides: object) -> RunOptions:
    """Run options that keep tests quick: short polls and backoffs."""
    values: dict[str, object] = {
        "poll_interval": 0.02,
        "poll_max": 0.1,
        "retry": RetryPolicy(attempts=6, base=0.01, cap=0.05, max_retry_after=0.05),
        "download_backoff": 0.01,
        "token": TOKEN,
        # Scripted APIs count every request: the balance and price look-ups are tested on their own.
        "live_prices": False,
    }
    values.update(overrides)
    return RunOptions(**values)  # type: ignore[arg-type]


def write_manifest(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def many_jobs_manifest(path: Path, count: int, *, quality: str = "low") -> Path:
    lines = ["model: openai/gpt-image-1-5/image-to-image", "defaults:", f"  quality: {quality}", "jobs:"]
    for i in range(count):
        lines += [f"  - id: job-{i:04d}", f'    prompt: "prompt number {i}"', f"    image_urls: ['{REF}']"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def user_schema_folder(root: Path, model: str = "acme/pixel-art/text-to-image") -> Path:
    """A folder of the user's own model schemas under root, holding one for model (prompt, palette, steps)."""
    folder = root / "my-schemas"
    target = folder / (model + ".input.json")
    target.parent.mkdir(parents=True)
    target.write_text(
        json.dumps(
            {
                "type": "object",
                "required": ["prompt"],
                "properties": {
                    "prompt": {"type": "string"},
                    "palette": {"type": "string", "enum": ["gameboy", "nes"], "default": "nes"},
                    "steps": {"type": "integer", "minimum": 1, "default": 20},
                },
            }
        ),
        encoding="utf-8",
    )
    return folder


@contextmanager
def another_run_holding(folder: Path) -> Iterator[None]:
    """Hold folder's lock the way a running `batcher run` does."""
    journal = Journal(folder)
    journal.open()
    try:
        yield
    finally:
        journal.close()
