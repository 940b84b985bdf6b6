"""A non-editable install finds its bundled schemas from any folder; the sandbox command serves."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx2

from batcher import __version__

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_the_schemas_and_uses_them(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("batcher-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "batcher/_schemas/openai/gpt-image-1-5/image-to-image.input.json" in names
    assert "batcher/_schemas/openai/gpt-image-1-5/image-to-image.pricing.json" in names
    assert "batcher/py.typed" in names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import batcher.manifest.schema as s; m = s.load_model_schema('openai/gpt-image-1-5/image-to-image');"
        "print(s.bundled_schema_dir().name, sorted(m.properties)[0])"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["_schemas", "background"]


def test_the_sandbox_command_serves_the_api(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "batcher", "sandbox", "--port", "0", "--queue-delay", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert "serving a RunComfy-compatible API at" in line
        url = line.split(" at ")[1].split()[0]
        headers = {"Authorization": "Bearer any"}
        body = {"prompt": "x", "image_urls": ["https://example.org/a.png"]}
        submitted = httpx2.post(f"{url}/v1/models/openai/gpt-image-1-5/image-to-image", json=body, headers=headers)
        assert submitted.status_code == 200
        request_id = submitted.json()["request_id"]
        status = httpx2.get(f"{url}/v1/requests/{request_id}/status", headers=headers).json()
        assert status["status"] in ("in_queue", "in_progress", "completed")
        bad = httpx2.post(f"{url}/v1/models/openai/gpt-image-1-5/image-to-image", json={"prompt": 1}, headers=headers)
        assert bad.status_code == 422 and bad.json()["error_code"] == 422001
        assert httpx2.get(f"{url}/v1/requests/{request_id}/status").json()["error_code"] == 401001
    finally:
        process.terminate()
        process.communicate(timeout=10)


def test_version_is_exposed() -> None:
    out = subprocess.run([sys.executable, "-m", "batcher", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout
