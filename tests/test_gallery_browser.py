"""The gallery a run writes at its end (issue 26, item 7), in a real browser: where the summary says, input
images that cannot be loaded shown as the review page's placeholder, local ones as thumbnails, ten cards to a
1280x900 screen, and refreshed by ``run --replace-rejected``.

Set BATCHER_SCREENSHOTS=docs to refresh docs/gallery.png from this test.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batcher import load_manifest
from batcher.cli.main import cli
from batcher.sandbox.png import make_png

from .browser import chromium, wait_for
from .reviewkit import decide

pytestmark = pytest.mark.slow

LOCAL, WEB = 6, 6
OFFLINE = "https://images.example.invalid/ref"  # .invalid never resolves: as good as no network at all


def _manifest(tmp_path: Path) -> Path:
    (tmp_path / "refs").mkdir()
    for name, size in (("harbour", 48), ("lighthouse", 64)):
        (tmp_path / "refs" / f"{name}.png").write_bytes(make_png(name, size))
    path = tmp_path / "harbour.yaml"
    path.write_text(
        "model: openai/gpt-image-1-5/image-to-image\n"
        "defaults: {quality: low}\n"
        "jobs:\n"
        '  - id: "local-{ref}-{take}"\n'
        '    prompt: "the {ref} from the reference at dusk, take {take}, a long prompt that wraps over lines"\n'
        '    image_urls: ["refs/{ref}.png"]\n'
        f"    matrix: {{ref: [harbour, lighthouse], take: [{', '.join(str(n) for n in range(LOCAL // 2))}]}}\n"
        '  - id: "web-{take}"\n'
        '    prompt: "a harbour at night, take {take}"\n'
        f'    image_urls: ["{OFFLINE}-{{take}}.jpg"]\n'
        "    image_size: 1536x1024\n"
        f"    matrix: {{take: [{', '.join(str(n) for n in range(WEB))}]}}\n",
        encoding="utf-8",
    )
    return path


def _run(*args: str) -> str:
    result = CliRunner().invoke(cli, ["run", *args, "--sandbox", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _inputs(driver: Any) -> list[dict[str, Any]]:
    return list(
        driver.execute_script(
            "return Array.from(document.querySelectorAll('.inputs img')).map(i => ({"
            "src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth,"
            "missing: i.dataset.missing || '', card: i.closest('.card').querySelector('.name').textContent}))"
        )
    )


def _settled(driver: Any) -> bool:
    """Every image loaded, or failed and swapped for the placeholder (which then loaded)."""
    return bool(
        driver.execute_script(
            "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
            " && document.querySelectorAll('.inputs img[data-missing]').length === arguments[0]",
            WEB,
        )
    )


def _cards_on_screen(driver: Any) -> int:
    """Cards wholly inside the window."""
    return int(
        driver.execute_script(
            "return Array.from(document.querySelectorAll('.card')).filter(c => { var r = c.getBoundingClientRect();"
            " return r.top >= 0 && r.left >= 0 && r.bottom <= innerHeight && r.right <= innerWidth; }).length"
        )
    )


def test_a_run_writes_a_gallery_that_works_offline_and_replace_rejected_refreshes_it(tmp_path: Path) -> None:
    path = _manifest(tmp_path).resolve()
    out = (tmp_path / "output" / "harbour").resolve()
    said = _run("harbour.yaml", "-o", "output/harbour")  # as a person types them (cwd: tmp_path)
    gallery = out / "index.html"
    # The summary says where the gallery is, and the command that writes it again.
    assert f"Gallery: {gallery} (open it in a browser); to write it again: " in said, said
    assert re.search(rf"to write it again: .+ report {re.escape(str(path))} -o {re.escape(str(out))}\n", said), said

    with chromium(1280, 900) as driver:
        # The page itself 1280x900, as `chromium --headless --window-size=1280,900` shows it (a window's frame
        # takes ~140 px of Selenium's window).
        metrics = {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        driver.get(gallery.as_uri())
        wait_for(lambda: _settled(driver), what="every image, or its placeholder")
        inputs = _inputs(driver)
        assert len(inputs) == LOCAL + WEB
        for found in inputs:
            if found["card"].startswith("web-"):
                # Unreachable: the review page's placeholder, not a broken image.
                assert found["missing"] == "1" and found["src"].startswith("data:image/svg+xml;base64,"), found
            else:
                # A local image: a thumbnail of the file beside the manifest, by a relative link.
                ref = "harbour" if "-harbour-" in found["card"] else "lighthouse"
                assert found["src"] == f"../../refs/{ref}.png", found
                assert found["missing"] == "" and found["width"] == (48 if ref == "harbour" else 64), found
        on_screen = _cards_on_screen(driver)
        assert on_screen >= 8, f"{on_screen} cards on a 1280x900 screen"
        target = Path(os.environ.get("BATCHER_SCREENSHOTS") or tmp_path)
        shot = (target if target.is_absolute() else Path(__file__).parent.parent / target) / "gallery.png"
        driver.save_screenshot(str(shot))
        assert shot.read_bytes().startswith(b"\x89PNG")

    # Reject one image; the run that replaces it writes the gallery again, the replacement's card in it.
    decide(load_manifest(path), out, {"local-harbour-0": "rejected"})
    before = gallery.read_text(encoding="utf-8")
    assert before.count('<article class="card"') == LOCAL + WEB
    said = _run("harbour.yaml", "-o", "output/harbour", "--replace-rejected")
    assert f"Gallery: {gallery}" in said, said
    after = gallery.read_text(encoding="utf-8")
    assert after.count('<article class="card"') == LOCAL + WEB + 1
    assert after.count('<article class="card" data-state="done"') == LOCAL + WEB + 1
