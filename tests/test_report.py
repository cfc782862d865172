"""The HTML run report: self-contained, one element per completion token, colours follow credit."""

import json
import re
from pathlib import Path

from rlsd.cli import main
from rlsd.report.html import token_color

from .test_cli import argv


def test_token_colours_follow_the_credit():
    assert token_color(1.1, 1.0, 0.1) == "rgba(22,163,74,1.000)"  # full green: most credit
    assert token_color(0.95, 1.0, 0.1) == "rgba(220,38,38,0.500)"  # half red: less credit
    assert token_color(1.0, 1.0, 0.1) == "rgba(22,163,74,0.000)"  # untouched: clear


def test_report_of_an_rlsd_run(tiny_overrides):
    assert main(["train", *argv({**tiny_overrides, "train.steps": "3"})]) == 0
    run_dir = Path(tiny_overrides["output.dir"]) / "t"
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    assert page.count('src="data:image/png;base64,') == 1
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    credited = [s for s in samples if "credit_multiplier" in s]
    assert credited
    blocks = re.findall(r'<div class="tokens">(.*?)</div>', page)
    assert blocks
    for block in blocks:  # one span per completion token, value and colour agree
        values = [float(v) for v in re.findall(r'data-v="([-0-9.]+)"', block)]
        colours = re.findall(r'background:(rgba\([^)]*\))', block)
        assert len(values) == len(colours) == block.count('class="tok"')
        assert any(len(values) == len(s["token_ids"]) for s in credited)
        for value, colour in zip(values, colours):
            assert colour == token_color(value, 1.0, 0.5 * 0.2)
    assert main(["report", str(run_dir.parent / "nope")]) == 2
