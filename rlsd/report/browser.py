"""Render a report with a headless Chromium: a PNG screenshot, or the DOM after its script ran.

Used by `rlsd report RUN_DIR --screenshot` and by the rendering tests. Chromium is not a Python
dependency: Debian's `chromium` package (or Google Chrome) on the PATH is found; without one,
a clear error says what to install.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..config import ConfigError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CONSOLE = re.compile(r":CONSOLE(?:\(\d+\)|:\d+)\] (.*)")


def find_browser() -> str | None:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    return None


def run_headless(
    page: Path, *args: str, fragment: str = "", timeout: float = 120
) -> tuple[str, list[str]]:
    """Open page (a local file) headless; returns (stdout, console messages the page logged)."""
    browser = find_browser()
    if browser is None:
        raise ConfigError(
            "no Chromium found: install Debian's chromium package "
            "(apt-get install chromium) or Google Chrome"
        )
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    with tempfile.TemporaryDirectory(prefix="rlsd-chromium-") as profile:
        done = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                "--enable-logging=stderr",
                "--v=0",
                f"--user-data-dir={profile}",
                *args,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"{browser} exited with {done.returncode}: {done.stderr[-500:]}")
    console = [m.group(1) for line in done.stderr.splitlines() if (m := CONSOLE.search(line))]
    return done.stdout, console


def screenshot(
    page: Path, png: Path, width: int = 1280, height: int = 2400, fragment: str = ""
) -> Path:
    """Write a PNG of the page's first `height` pixels at `width`."""
    run_headless(
        page, f"--screenshot={png.resolve()}", f"--window-size={width},{height}", fragment=fragment
    )
    if not png.is_file():
        raise RuntimeError(f"the browser wrote no screenshot to {png}")
    return png


def rendered_dom(page: Path, fragment: str = "") -> tuple[str, list[str]]:
    """(the DOM after the page's script ran, console messages)."""
    return run_headless(page, "--dump-dom", fragment=fragment)
