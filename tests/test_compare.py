"""`rlsd compare`: grouping by config, bands over seeds, runs of different lengths, missing
metrics, time to a target; values computed by hand."""

import json
import math
from pathlib import Path

import pytest

from rlsd.cli import main
from rlsd.config import load_config, to_yaml
from rlsd.report.compare import band, group_runs, load_run, summary, time_to_target


def make_run(
    root: Path,
    name: str,
    method: str,
    seed: int,
    acc: list[float],
    seconds: float,
    mem: float | None,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    overrides = {"algorithm.name": method, "train.seed": str(seed), "output.run_name": name}
    if method == "grpo":
        overrides["teacher.mode"] = "live"  # the default: allowed to be restated
    (run / "config.yaml").write_text(to_yaml(load_config(None, overrides)))
    rows = []
    for step, value in enumerate(acc, start=1):
        row = {
            "step": step,
            "reward/accuracy": value,
            "reward/mean": value,
            "perf/step_seconds": seconds,
        }
        if mem is not None:
            row["perf/peak_mem_mb"] = mem + step
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [
        make_run(tmp_path, "rlsd-s0", "rlsd", 0, [0, 0.5, 0.5, 1.0], 10, 100),
        make_run(tmp_path, "rlsd-s1", "rlsd", 1, [0, 1.0], 20, 200),  # shorter run
        make_run(tmp_path, "grpo-s0", "grpo", 0, [0, 0, 0.5, 0.5], 10, None),
    ]  # no memory


def test_runs_differing_in_seed_share_a_group(runs):
    groups = group_runs([load_run(p) for p in runs])
    assert sorted(groups) == ["grpo", "rlsd"]
    assert [r.path.name for r in groups["rlsd"]] == ["rlsd-s0", "rlsd-s1"]


def test_band_spans_the_runs_that_reached_each_step(runs):
    rlsd = group_runs([load_run(p) for p in runs])["rlsd"]
    steps, mean, low, high = band(rlsd, "reward/accuracy", smooth=1)
    assert steps == [1, 2, 3, 4]
    assert mean == [0.0, 0.75, 0.5, 1.0]
    assert low == [0.0, 0.5, 0.5, 1.0] and high == [0.0, 1.0, 0.5, 1.0]
    assert band(rlsd, "eval/pass@1") == ([], [], [], [])  # never logged: no curve, no error


def test_time_to_target_uses_the_moving_average(runs):
    s0, s1, grpo = (load_run(p) for p in runs)
    assert time_to_target(s0, 0.25) == (2, 20.0)  # moving averages 0, .25, .33, .5
    assert time_to_target(s1, 0.25) == (2, 40.0)
    assert time_to_target(grpo, 0.25) == (4, 40.0)  # 0, 0, .167, .25
    assert time_to_target(grpo, 0.3) is None


def test_summary_table_by_hand(runs):
    table, target = summary(group_runs([load_run(p) for p in runs]), None)
    assert target == 0.25  # the lowest final accuracy: grpo's mean of 0, 0, .5, .5
    rlsd, grpo = sorted(table, key=lambda row: row["group"], reverse=True)
    assert rlsd["runs"] == 2 and rlsd["steps"] == 4
    assert rlsd["final_accuracy"] == (0.5, 0.0)  # both seeds average 0.5 over their steps
    assert rlsd["steps_to_target"] == (2.0, 0.0)
    assert rlsd["seconds_to_target"][0] == 30.0
    assert rlsd["seconds_to_target"][1] == pytest.approx(math.sqrt(200))  # std of 20 and 40
    assert rlsd["peak_mem_mb"] == 202 and grpo["peak_mem_mb"] is None
    assert rlsd["final_eval"] is None
    table, _ = summary(group_runs([load_run(p) for p in runs]), 0.5)
    assert [row["reached"] for row in table] == ["2/2", "0/1"]
    assert table[0]["steps_to_target"][0] == 3.0 and table[1]["steps_to_target"] is None


def test_compare_cli_writes_png_markdown_html(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| rlsd | 2 | 4 | 0.500 |" in printed
    assert "| grpo | 1 | 4 | 0.250 | - | 1/1 | 4.0 | 40 | - |" in printed
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "![curves](compare.png)" in (out / "compare.md").read_text()
    page = (out / "compare.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page


def test_compare_refuses_a_non_run(runs, tmp_path, capsys):
    assert main(["compare", str(runs[0]), str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text((runs[0] / "config.yaml").read_text())
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert main(["compare", str(tmp_path / "empty")]) == 2
    assert "no steps logged yet" in capsys.readouterr().err
