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
    assert len(blocks) >= 1
    for block in blocks:  # one span per completion token, value and colour agree
        spans = re.findall(
            r'<span class="tok" data-m="([-0-9.]+)" data-a="([-0-9.]+)" '
            r'title="[^"]*" style="background:(rgba\([^)]*\))">',
            block,
        )
        assert len(spans) == block.count('class="tok"')
        assert any(len(spans) == len(s["token_ids"]) for s in credited)
        for multiplier, _, colour in spans:
            assert colour == token_color(float(multiplier), 1.0, 0.5 * 0.2)
    assert 'value="m" checked' in page and 'value="a"' in page  # the colour switch
    assert "Here is a reference solution" in page  # the teacher's privileged context
    assert main(["report", str(run_dir.parent / "nope")]) == 2


def test_token_pieces_keep_split_characters_whole():
    from rlsd.report.html import token_pieces

    from .conftest import build_tokenizer

    tok = build_tokenizer()
    ids = tok("9 + 6 = 15 😀 é", add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok, ids)
    assert len(pieces) == len(ids) and len(ids) > len(["9", "+", "6", "=", "15", "😀", "é"])
    assert "".join(pieces) == tok.decode(ids) == "9 + 6 = 15 😀 é"
    assert not any("\ufffd" in p for p in pieces) and "" in pieces  # the emoji spans tokens
