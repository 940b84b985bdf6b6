"""The review page in a real browser: keys and clicks, a reload, the replacements, and 10,000 images.

Set BATCHER_SCREENSHOTS=docs to refresh the README's screenshots from these tests.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest

from batcher import load_manifest, run_manifest
from batcher.output.folders import read_folder
from batcher.review.decisions import read_decisions
from batcher.review.server import ReviewServer

from .browser import chromium, press, ready, saved, wait_for
from .conftest import fast_options
from .reviewkit import big_folder

pytestmark = pytest.mark.slow

JOBS = 6


def _shot(driver, tmp_path: Path, name: str) -> Path:
    target = Path(os.environ.get("BATCHER_SCREENSHOTS") or tmp_path)
    path = (target if target.is_absolute() else Path(__file__).parent.parent / target) / name
    driver.save_screenshot(str(path))
    assert path.read_bytes().startswith(b"\x89PNG")
    return path


def _manifest(tmp_path: Path, sandbox_url: str) -> Path:
    lines = ["model: openai/gpt-image-1-5/image-to-image", "defaults: {quality: low}", "jobs:"]
    prompts = ["a lighthouse at dusk", "the same lighthouse in fog", "a harbour at night"]
    for i in range(JOBS):
        inputs = f"['{sandbox_url}/inputs/ref-{i % 3}.png']" if i < JOBS - 1 else "['http://127.0.0.1:9/gone.png']"
        lines += [f"  - id: shot-{i}", f'    prompt: "{prompts[i % 3]}, take {i}"', f"    image_urls: {inputs}"]
    path = tmp_path / "harbour.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cards(driver) -> dict[str, str]:
    """Job name -> decision, for the cards drawn."""
    return dict(
        driver.execute_script(
            "return Array.from(document.querySelectorAll('.card')).map(c => "
            "[c.querySelector('.name').textContent, c.querySelector('.badge').textContent])"
        )
    )


def test_review_by_keyboard_survives_a_reload_and_replaces_exactly_the_rejected(tmp_path: Path, start_sandbox) -> None:
    sandbox = start_sandbox(queue_delay=0.01, run_delay=0.01)
    _manifest(tmp_path, sandbox.url)
    path, out = Path("harbour.yaml"), Path("output/harbour")  # relative, as a person types them (cwd: tmp_path)
    options = fast_options(output_dir=out, api_base=sandbox.url)
    assert anyio.run(run_manifest, load_manifest(path), options).done == JOBS

    with ReviewServer(load_manifest(path), out) as server, chromium(1280, 1000) as driver:
        driver.get(server.url)
        wait_for(lambda: ready(driver))
        assert len(_cards(driver)) == JOBS
        hint = f"batcher run harbour.yaml --api-base {sandbox.url} --replace-rejected"
        assert driver.find_element("id", "hint").get_attribute("textContent").count(hint) == 1
        # shot-0 accepted, shot-1 rejected, shot-2 skipped, shot-3 rejected; shot-4 accepted by a click.
        press(driver, "a", "r", "j", "r")
        driver.find_element("css selector", '.card[data-pos="4"] .acc').click()
        wait_for(lambda: saved(driver), what="the decisions' answers")
        # The input thumbnails, fetched by the server from the sandbox's loopback host; the last job's is a placeholder.
        loaded = driver.execute_script(
            "return Array.from(document.querySelectorAll('.ins img')).map(i => i.complete && i.naturalWidth)"
        )
        assert all(loaded) and len(loaded) == JOBS
        driver.execute_script("window.scrollTo(0, 0)")
        _shot(driver, tmp_path, "review.png")

        driver.refresh()
        wait_for(lambda: ready(driver))
        expected = {
            "shot-0": "accepted",
            "shot-1": "rejected",
            "shot-2": "undecided",
            "shot-3": "rejected",
            "shot-4": "accepted",
            "shot-5": "undecided",
        }
        assert _cards(driver) == expected
        press(driver, "u")  # the undecided only
        wait_for(lambda: len(_cards(driver)) == 2, what="the filter")
        assert set(_cards(driver)) == {"shot-2", "shot-5"}
        # x takes a decision back: with the filter off again, shot-0 is undecided.
        press(driver, "u", "k", "k", "x")  # back to all, on shot-2 still; up to shot-0
        wait_for(lambda: saved(driver))
        assert _cards(driver)["shot-0"] == "undecided"

    decisions = read_decisions(out)
    records = read_folder(out).records
    manifest = load_manifest(path)
    now = {job.name: decisions.of(job.key, 0, records[job.key].files[0].sha256) for job in manifest.jobs}
    assert now == {**expected, "shot-0": "undecided"}

    submits_before = len(sandbox.sandbox.submits)
    replacing = fast_options(output_dir=out, api_base=sandbox.url, replace_rejected=True)
    summary = anyio.run(run_manifest, load_manifest(path), replacing)
    assert summary.done == summary.total == JOBS + 2
    sent = Counter(s.body["prompt"] for s in sandbox.sandbox.submits[submits_before:])
    assert sent == Counter(["the same lighthouse in fog, take 1", "a lighthouse at dusk, take 3"])
    names = {r.name for k, r in read_folder(out).records.items() if k not in {j.key for j in manifest.jobs}}
    assert names == {"shot-1-r1", "shot-3-r1"}

    # The replacements are on the page at once, undecided.
    with ReviewServer(load_manifest(path), out, prefetch=False) as server, chromium() as driver:
        driver.get(server.url)
        wait_for(lambda: ready(driver))
        cards = _cards(driver)
        assert cards["shot-1-r1"] == cards["shot-3-r1"] == "undecided" and len(cards) == JOBS + 2


def test_ten_thousand_images_stay_responsive(tmp_path: Path) -> None:
    """Only the cards in view are drawn and only their images fetched; the figures go to the README."""
    images = 10_000
    path, out = big_folder(tmp_path, images)
    with ReviewServer(load_manifest(path), out, prefetch=False) as server, chromium(1280, 900) as driver:
        started = time.monotonic()
        driver.get(server.url)
        wait_for(lambda: ready(driver), timeout=60)
        loaded_in = time.monotonic() - started
        figures = driver.execute_script(
            "var paint = performance.getEntriesByName('first-contentful-paint')[0];"
            "return {nodes: document.getElementsByTagName('*').length, cards: window.review.cards(),"
            " images: document.images.length, ready: window.review.readyAt,"
            " paint: paint ? paint.startTime : null, height: document.body.scrollHeight};"
        )
        assert figures["cards"] < 60 and figures["nodes"] < 1500, figures
        assert figures["height"] > 1_000_000, "the grid is as tall as every card"
        # Scroll through 200 screens, one a frame: each frame draws the cards that come into view.
        frames = driver.execute_async_script(
            "var done = arguments[0], gaps = [], step = 0, last = performance.now();"
            "function next(now) { gaps.push(now - last); last = now; window.scrollBy(0, 900);"
            " if (++step < 200) { requestAnimationFrame(next); } else { done(gaps.slice(1)); } }"
            "requestAnimationFrame(next);"
        )
        frames.sort()
        p95 = frames[int(len(frames) * 0.95)]
        # Jump to the end and walk back with the keyboard: each key press redraws what is in view.
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        wait_for(lambda: driver.execute_script(f"return !!document.querySelector('.card[data-pos=\"{images - 1}\"]')"))
        started = time.monotonic()
        press(driver, *("j" * 100))
        wait_for(lambda: driver.execute_script("return !!document.querySelector('.card.sel[data-pos=\"100\"]')"))
        keys = (time.monotonic() - started) / 100
        after = driver.execute_script("return document.getElementsByTagName('*').length")
        assert after < 1500
    print(
        f"\n10,000 images: ready in {loaded_in:.2f} s (first paint {figures['paint']:.0f} ms, page ready at "
        f"{figures['ready']:.0f} ms), {figures['nodes']} DOM nodes, {figures['cards']} cards, {figures['images']} "
        f"images loaded at once, {keys * 1000:.0f} ms a key press (j, selenium round trip included), "
        f"scrolling a screen a frame: median frame {frames[len(frames) // 2]:.1f} ms, p95 {p95:.1f} ms"
    )
    assert loaded_in < 30
