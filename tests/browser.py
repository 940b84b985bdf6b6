"""A real headless Chromium driven by Selenium, through Debian's chromium and chromium-driver.

The driver's path is given, so Selenium never tries to download one (there is no network on CI).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest


def _found(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


@contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A headless Chromium under Selenium; skipped where either is missing (a failure on CI, which installs both)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="installed with the test extras")
    from selenium.webdriver.chrome.service import Service

    browser = _found("chromium", "chromium-browser", "google-chrome")
    driver_path = _found("chromedriver")
    if browser is None or driver_path is None:
        if os.environ.get("CI"):
            pytest.fail(".ci/run installs Debian's chromium and chromium-driver; one is missing")
        pytest.skip("no chromium or chromedriver here (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "the page") -> Any:
    """Poll check until it returns something true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{what} did not come within {timeout}s")


def press(driver: Any, *keys: str) -> None:
    """Type keys into the page, as a person at the keyboard does."""
    from selenium.webdriver.common.action_chains import ActionChains

    actions = ActionChains(driver)
    for key in keys:
        actions.send_keys(key)
    actions.perform()


def ready(driver: Any) -> bool:
    return bool(driver.execute_script("return document.documentElement.dataset.ready === '1'"))


def saved(driver: Any) -> bool:
    return bool(driver.execute_script("return window.review && window.review.pending() === 0"))
