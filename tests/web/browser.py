"""Helpers for driving a headless Debian Chromium with selenium + chromedriver (the set-up `make test` runs
installs both: `apt-get install chromium chromium-driver`)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("OPENFT_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("OPENFT_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)


def wait_until(condition: Callable[[], Any], *, what: str, timeout: float = 600, every: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy (a guard against hanging, not a speed test)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as e:  # the page is re-rendering; try again
            last_error = e
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_error})")


def screenshot(driver: Any, name: str, tmp_dir: Path) -> Path:
    """Save a screenshot; with OPENFT_UPDATE_SCREENSHOTS=1 it also replaces docs/screenshots/NAME.png."""
    path = tmp_dir / f"{name}.png"
    driver.save_screenshot(str(path))
    if os.environ.get("OPENFT_UPDATE_SCREENSHOTS") == "1":
        (REPO / "docs" / "screenshots").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, REPO / "docs" / "screenshots" / f"{name}.png")
    return path
