"""Regenerate the pictures of the README and docs/guide.md from real runs (this project's output).

    python docs/make_images.py [RLSD_RUN_DIR RUN_DIR ...]

docs/img/heatmap.png: the heat-map part of RLSD_RUN_DIR's report, rendered by headless Chromium.
docs/img/report.png: the whole report of RLSD_RUN_DIR (`rlsd report --screenshot`, full page).
docs/img/compare.png: `rlsd compare` of all the given run directories; its table is printed.

Without arguments it uses the committed CPU study runs (benchmarks/results/study-cpu/arith):
RLSD and GRPO with three seeds each and three one-seed RLSD ablations, runs that differ in more
than the method. Reports are written to a temporary directory: the run directories are only read.
Needs Chromium on the PATH (Debian: apt-get install chromium).
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
STUDY = Path(__file__).parent.parent / "benchmarks" / "results" / "study-cpu" / "arith"
DEFAULT_RUNS = [
    *(f"rlsd-seed{s}" for s in range(3)),
    *(f"grpo-seed{s}" for s in range(3)),
    "rlsd-lambda1-seed0",
    "rlsd-frozen-seed0",
    "rlsd-no-reference-seed0",
]


def report_pngs(run_dir: Path, heatmap: Path, report: Path) -> None:
    """The heat map (the page's title, then the heat-map section) and the whole report."""
    with tempfile.TemporaryDirectory() as tmp:
        page = write_report(run_dir, out=Path(tmp) / "report.html")
        screenshot(page, report)  # the whole page
        text = page.read_text(encoding="utf-8")
        head = text[: text.index("</h1>") + len("</h1>")]
        heat = text[text.index('<h2 id="heatmap">') : text.index("<h2>Config</h2>")]
        script = text[text.rindex("<script>") :]
        trimmed = Path(tmp) / "heatmap.html"
        trimmed.write_text(head + heat + script, encoding="utf-8")
        screenshot(trimmed, heatmap, width=1000, height=760)


if __name__ == "__main__":
    runs = [Path(p) for p in sys.argv[1:]] or [STUDY / name for name in DEFAULT_RUNS]
    IMG.mkdir(exist_ok=True)
    report_pngs(runs[0], IMG / "heatmap.png", IMG / "report.png")
    with tempfile.TemporaryDirectory() as tmp:
        paths, table = write_compare(runs, Path(tmp))
        shutil.copy(paths["png"], IMG / "compare.png")
    print(table)
