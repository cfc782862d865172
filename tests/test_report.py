"""The HTML run report: self-contained, one element per completion token, colours follow credit."""

import json
import re
from pathlib import Path

import pytest

from rlsd.commands.cli import main
from rlsd.report.html import token_color, write_report
from rlsd.report.plots import curves_figure
from rlsd.schema.config import load_config, to_yaml

from .test_cli import argv

THREE_STEPS = [  # a hand-made 3-step run: rewards, accuracies, seconds and raw peak memory
    {
        "step": step,
        "reward/mean": reward,
        "reward/accuracy": acc,
        "perf/step_seconds": 20.0,
        "perf/peak_mem_mb": mem,
        "perf/peak_mem_scope": "run",
        **extra,
    }
    for step, reward, acc, mem, extra in [
        (1, 0.25, 0.0, 1000.0, {}),
        (2, 0.5, 0.25, 1800.0, {}),
        (3, 0.75, 0.5, 1500.0, {"eval/pass@1": 0.25, "eval/items": 4.0, "eval/seconds": 5.0}),
    ]
]


@pytest.fixture
def hand_made_run(tmp_path) -> Path:
    """A 3-step rlsd run directory with training's evaluation (step 3) and an `rlsd eval`."""
    run = tmp_path / "hand-made"
    run.mkdir()
    cfg = load_config(None, {"train.steps": "3", "output.run_name": "hand-made"})
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in THREE_STEPS))
    (run / "evals.jsonl").write_text(
        json.dumps({"step": 3, "correct": [True, False, False, False]}) + "\n"
    )
    result = {
        "n_items": 16,
        "samples_per_item": 4,
        "pass@1": 0.375,
        "pass@4": 0.625,
        "maj@4": 0.5,
        "lenient@1": 0.4375,
        "items": [],
        "model": f"{run} (checkpoint-3)",
        "items_from": "held-out split",
    }
    (run / "eval-20260101-120000.json").write_text(json.dumps(result))
    return run


def page_of(run: Path) -> str:
    from .conftest import build_tokenizer

    return write_report(run, tokenizer=build_tokenizer()).read_text()


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


def test_report_header_is_a_readable_summary(hand_made_run):
    page = page_of(hand_made_run)
    header = page[page.index("</h1>") : page.index("<h2>Learning curves</h2>")]
    assert "{" not in header and "}" not in header and "&quot;" not in header  # no raw JSON
    text = " ".join(re.sub(r"<[^>]+>", " ", header).split())
    assert "steps 3 of 3" in text and "method rlsd on smollm2-135m-instruct" in text
    assert "final reward 0.750 at step 3 (0.500 over the last 3 steps)" in text
    assert "final accuracy 0.500 at step 3 (0.250 over the last 3 steps)" in text
    assert "0.375 (rlsd eval of checkpoint-3, 16 items, 4 samples/item)" in text
    assert "0.250 (training eval at step 3, 4 items)" in text
    assert "run time 1 min 0 s of steps + 5 s of evaluation" in text
    assert "peak memory 1800 MB" in text


def test_rlsd_eval_results_are_shown(hand_made_run):
    page = page_of(hand_made_run)
    section = page[page.index('<h2 id="evals">') : page.index('<h2 id="heatmap">')]
    cells = re.findall(r"<td>([^<]*)</td>", section)
    assert cells[:7] == [
        "eval-20260101-120000.json",
        "3",
        "16 (held-out split)",
        "4",
        "0.375",
        "pass@4 0.625, maj@4 0.500",
        "0.438",
    ]
    assert cells[7:] == ["3", "0.250", "4"]  # training's own evaluation


def test_step_ticks_are_integers_for_a_3_step_run():
    import matplotlib.pyplot as plt

    fig = curves_figure(THREE_STEPS)
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.axison]
    assert panels
    for ax in panels:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)
    plt.close(fig)


def test_peak_memory_is_drawn_raw_and_rlsd_eval_marked():
    import matplotlib.pyplot as plt

    fig = curves_figure(THREE_STEPS, [{"step": 3, "pass@1": 0.375}])
    (memory,) = [ax for ax in fig.axes if ax.get_title() == "peak memory (MB)"]
    (line,) = memory.get_lines()  # one curve: the values as logged, no moving average
    assert list(line.get_xdata()) == [1, 2, 3]
    assert list(line.get_ydata()) == [1000.0, 1800.0, 1500.0]
    (held,) = [ax for ax in fig.axes if ax.get_title() == "held-out accuracy (greedy)"]
    stars = [line for line in held.get_lines() if line.get_marker() == "*"]
    assert [list(s.get_ydata()) for s in stars] == [[0.375]]
    plt.close(fig)
