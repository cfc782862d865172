"""Render a report with a headless Chromium: a PNG screenshot, or the DOM after its script ran.

Used by `rlsd report RUN_DIR --screenshot` (the whole page: its height is measured first, in the
browser) and by the rendering tests. Chromium is not a Python
dependency: Debian's `chromium` package (or Google Chrome) on the PATH is found; without one,
a clear error says what to install.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..schema.config import ConfigError

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


MAX_HEIGHT = 16384  # pixels: a taller page is cut there (Chromium's limit for one image)
HEIGHT = re.compile(r"rlsd-page-height (\d+)")
MEASURE = (
    "<script>addEventListener('load', function () {"
    " console.log('rlsd-page-height ' + document.documentElement.scrollHeight); });</script>"
)


def page_height(page: Path, width: int = 1280, fragment: str = "") -> int:
    """The page's whole height in pixels at `width` (its scrollHeight once loaded, measured in a
    copy of the page with one more script, in a window shorter than any page)."""
    text = page.read_text(encoding="utf-8")
    at = text.rfind("</body>")
    text = text[:at] + MEASURE + text[at:] if at >= 0 else text + MEASURE
    with tempfile.TemporaryDirectory(prefix="rlsd-measure-") as tmp:
        probe = Path(tmp) / page.name
        probe.write_text(text, encoding="utf-8")
        _, console = run_headless(
            probe, "--dump-dom", f"--window-size={width},200", fragment=fragment
        )
    heights = [int(m.group(1)) for line in console if (m := HEIGHT.search(line))]
    if not heights:
        raise RuntimeError(f"the browser did not report the height of {page}")
    return heights[-1]


def screenshot(
    page: Path, png: Path, width: int = 1280, height: int | None = None, fragment: str = ""
) -> Path:
    """Write a PNG of the page at `width`: the whole page (height None, up to MAX_HEIGHT
    pixels) or its first `height` pixels."""
    if height is None:
        height = min(page_height(page, width, fragment), MAX_HEIGHT)
    run_headless(
        page, f"--screenshot={png.resolve()}", f"--window-size={width},{height}", fragment=fragment
    )
    if not png.is_file():
        raise RuntimeError(f"the browser wrote no screenshot to {png}")
    return png


def rendered_dom(page: Path, fragment: str = "") -> tuple[str, list[str]]:
    """(the DOM after the page's script ran, console messages)."""
    return run_headless(page, "--dump-dom", fragment=fragment)
