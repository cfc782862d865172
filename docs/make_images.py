"""Regenerate the README's pictures from real runs (this project's own output).

    python docs/make_images.py RLSD_RUN_DIR RUN_DIR [RUN_DIR ...]

docs/img/heatmap.png: the heat-map part of RLSD_RUN_DIR's report, rendered by headless Chromium.
docs/img/compare.png: `rlsd compare` of all the given run directories; its table is printed.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from rlsd.report import write_report
from rlsd.report.browser import screenshot
from rlsd.report.compare import write_compare

IMG = Path(__file__).parent / "img"


def heatmap_png(run_dir: Path, out: Path) -> None:
    page = write_report(run_dir).read_text(encoding="utf-8")
    head, rest = page.split("<h2>Learning curves</h2>", 1)
    heat = rest[rest.index('<h2 id="heatmap">') : rest.index("<h2>Config</h2>")]
    script = rest[rest.index("<script>") :]
    with tempfile.TemporaryDirectory() as tmp:
        trimmed = Path(tmp) / "heatmap.html"
        trimmed.write_text(head + heat + script, encoding="utf-8")
        screenshot(trimmed, out, width=1000, height=760)


if __name__ == "__main__":
    runs = [Path(p) for p in sys.argv[1:]]
    IMG.mkdir(exist_ok=True)
    heatmap_png(runs[0], IMG / "heatmap.png")
    with tempfile.TemporaryDirectory() as tmp:
        paths, table = write_compare(runs, Path(tmp))
        shutil.copy(paths["png"], IMG / "compare.png")
    print(table)
