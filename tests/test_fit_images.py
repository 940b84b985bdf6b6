"""Local images within RunComfy's limits (issue 23, point 3): RunComfy's own ComfyUI nodes send an image inline
only up to 6 MiB and 32 megapixels (runcomfy-com/comfyui-runcomfy-partner-nodes, runcomfy/media.py). `validate`
refuses a larger one naming that limit; ``--fit-images`` (or ``fit_images: true``) re-encodes it to fit, and the
job's identity is the hash of the re-encoded bytes, the bytes sent."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from batcher import SandboxThread
from batcher.cli.main import cli
from batcher.journal.store import JOURNAL_NAME
from batcher.manifest.imagefit import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, dimensions, fit_image

from .conftest import MODEL, TOKEN, write_manifest

StartSandbox = Callable[..., SandboxThread]
FAST = ["--poll-interval", "0.05", "--poll-max", "0.1", "--retries", "3", "-q", "--yes"]


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    return CliRunner()


def _noise_png(width: int, height: int) -> bytes:
    """A PNG of random pixels: it does not compress, so its size is about 3 bytes a pixel."""
    image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _flat_jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def _project(root: Path, *, setting: str = "") -> tuple[Path, bytes, bytes]:
    """A manifest naming refs/big.png (over 6 MiB) and refs/wide.jpg (over 32 MP, a small file)."""
    (root / "refs").mkdir(parents=True)
    big, wide = _noise_png(1500, 1500), _flat_jpeg(8000, 4200)
    assert len(big) > MAX_IMAGE_BYTES and len(wide) < MAX_IMAGE_BYTES
    (root / "refs" / "big.png").write_bytes(big)
    (root / "refs" / "wide.jpg").write_bytes(wide)
    manifest = write_manifest(
        root / "m.yaml",
        f"""
        model: {MODEL}
        {setting}
        defaults: {{quality: low}}
        jobs:
          - prompt: "big"
            image_urls: ["refs/big.png"]
          - prompt: "wide"
            image_urls: ["refs/wide.jpg"]
        """,
    )
    return manifest, big, wide


def test_validate_refuses_an_image_over_runcomfys_limits_naming_them(runner: CliRunner, tmp_path: Path) -> None:
    manifest, _big, _wide = _project(tmp_path / "proj")
    result = runner.invoke(cli, ["validate", str(manifest)], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    found = [line.strip() for line in result.output.splitlines()]
    lines = {line.split(": ", 1)[0]: line for line in found if line.startswith(str(manifest))}
    big, wide = lines[f"{manifest}:6"], lines[f"{manifest}:8"]
    assert "big.png is 6.4 MiB" in big or "big.png is 6.5 MiB" in big, big
    assert "wide.jpg is 33.6 megapixels" in wide, wide
    for line in (big, wide):
        assert "RunComfy's own ComfyUI nodes send an image inline only up to 6 MiB and 32 megapixels" in line
        assert "runcomfy-com/comfyui-runcomfy-partner-nodes, runcomfy/media.py" in line
        assert "--fit-images" in line and "fit_images: true" in line


def test_dimensions_are_read_from_the_header() -> None:
    assert dimensions(io.BytesIO(_flat_jpeg(640, 480))) == (640, 480)
    for kind in ("PNG", "GIF", "WEBP"):
        buffer = io.BytesIO()
        Image.new("RGB", (321, 123)).save(buffer, format=kind)
        assert dimensions(buffer) == (321, 123), kind


def test_the_re_encode_fits_and_is_deterministic() -> None:
    data = _noise_png(1500, 1500)
    fitted = fit_image(data)
    assert fitted == fit_image(data), "the same bytes in, the same bytes out: the job's identity is their hash"
    assert len(fitted) <= MAX_IMAGE_BYTES
    with Image.open(io.BytesIO(fitted)) as image:
        assert image.format == "PNG" and image.width * image.height <= MAX_IMAGE_PIXELS
        assert image.width < 1500


def _sent_images(sandbox: SandboxThread) -> dict[str, bytes]:
    found = {}
    for record in sandbox.sandbox.submits:
        head, _, data = record.body["image_urls"][0].partition(",")
        assert head == "data:image/png;base64"
        found[record.body["prompt"]] = base64.b64decode(data)
    return found


@pytest.mark.slow
def test_fit_images_sends_the_re_encoded_bytes_and_names_the_job_by_them(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox()
    manifest, _big, _wide = _project(tmp_path / "proj")
    run = ["run", *FAST, str(manifest), "--api-base", sandbox.url, "-o", str(tmp_path / "out")]
    result = runner.invoke(cli, [*run, "--fit-images"], catch_exceptions=False)  # validate shares the option
    assert result.exit_code == 0, result.output
    sent = _sent_images(sandbox)
    assert sorted(sent) == ["big", "wide"]
    journal = (tmp_path / "out" / JOURNAL_NAME).read_text()
    for data in sent.values():
        assert len(data) <= MAX_IMAGE_BYTES
        with Image.open(io.BytesIO(data)) as image:
            assert image.width * image.height <= MAX_IMAGE_PIXELS
        assert f"#fit&sha256={hashlib.sha256(data).hexdigest()}" in journal, "the identity is of the bytes sent"

    # The same images, the manifest's own setting: the same jobs (a deterministic re-encode), nothing sent again.
    manifest.write_text(manifest.read_text().replace("defaults:", "fit_images: true\ndefaults:"))
    result = runner.invoke(cli, run, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(sandbox.sandbox.submits) == 2


def test_fit_images_must_be_true_or_false(runner: CliRunner, tmp_path: Path) -> None:
    manifest, _big, _wide = _project(tmp_path / "proj", setting="fit_images: sometimes")
    result = runner.invoke(cli, ["validate", str(manifest)], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert f"{manifest}:2: fit_images: expected true or false" in result.output


def test_fit_images_without_pillow_says_what_to_install(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, _big, _wide = _project(tmp_path / "proj")
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed: its import fails
    result = runner.invoke(cli, ["validate", str(manifest), "--fit-images"], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert "needs pillow: pip install pillow" in result.output and ".[images]" in result.output
