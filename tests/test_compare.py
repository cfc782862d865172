"""`rlsd compare`: grouping by config, short labels, bands over seeds, runs of different lengths,
missing metrics, the default target and time to it, held-out results read from the run
directory, a figure whose legend stays inside it and off the curves; values computed by hand."""

import json
import math
from pathlib import Path

import pytest

from rlsd.commands.cli import main
from rlsd.report.compare import (
    MAX_LABEL,
    band,
    compare_figure,
    group_runs,
    load_run,
    summary,
    time_to_target,
)
from rlsd.schema.config import load_config, to_yaml

THREE_FIELDS = {  # the quick start's defaults are 64, 4 and 8
    "rollout.max_new_tokens": "128",
    "rollout.num_generations": "8",
    "train.prompts_per_step": "16",
}


def make_run(
    root: Path,
    name: str,
    method: str,
    seed: int,
    acc: list[float],
    seconds: float,
    mem: float | None,
    **overrides: str,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    overrides = {
        "algorithm.name": method,
        "train.seed": str(seed),
        "output.run_name": name,
        **overrides,
    }
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


def write_eval(run: Path, name: str, pass1: float, step: int, items: int = 8) -> None:
    """What `rlsd eval RUN_DIR` writes (greedy), without the per-item detail."""
    result = {
        "n_items": items,
        "samples_per_item": 1,
        "pass@1": pass1,
        "maj@1": pass1,
        "lenient@1": pass1,
        "items": [],
        "model": f"{run} (checkpoint-{step})",
        "items_from": "held-out split",
    }
    (run / name).write_text(json.dumps(result))


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [
        make_run(tmp_path, "rlsd-s0", "rlsd", 0, [0, 0.5, 0.5, 1.0], 10, 100),
        make_run(tmp_path, "rlsd-s1", "rlsd", 1, [0, 1.0], 20, 200),  # shorter run
        make_run(tmp_path, "grpo-s0", "grpo", 0, [0, 0, 0.5, 0.5], 10, None),
    ]  # no memory


def test_runs_differing_in_seed_share_a_group(runs):
    groups = group_runs([load_run(p) for p in runs])
    assert list(groups) == ["rlsd", "grpo"]
    assert [r.path.name for r in groups["rlsd"].runs] == ["rlsd-s0", "rlsd-s1"]


def test_labels_name_only_what_differs_from_most_groups(tmp_path):
    runs = [
        make_run(tmp_path, "rlsd", "rlsd", 0, [0.5], 1, None),
        make_run(tmp_path, "grpo", "grpo", 0, [0.5], 1, None),
        make_run(tmp_path, "big", "rlsd", 0, [0.5], 1, None, **THREE_FIELDS),
        make_run(tmp_path, "lr", "rlsd", 0, [0.5], 1, None, **{"train.lr": "0.001"}),
    ]
    groups = group_runs([load_run(p) for p in runs])
    assert list(groups) == ["rlsd", "grpo", "rlsd · T=128 · G=8 · B=16", "rlsd · lr=0.001"]
    full = groups["rlsd · T=128 · G=8 · B=16"].key  # the full key, every differing field
    assert full["rollout.num_generations"] == "8" and full["train.lr"] == "0.0005"
    assert groups["rlsd"].common["rollout.num_generations"] == "4"
    # two groups, no value shared by more: both name every field
    pair = group_runs([load_run(p) for p in runs[2:]])
    assert list(pair) == [
        "rlsd · T=128 · G=8 · lr=0.0005 · B=16",
        "rlsd · T=64 · G=4 · lr=0.001 · B=8",
    ]


def test_long_values_are_numbered_and_labels_stay_short(tmp_path):
    template = "{{ prompt }}\n\nSolve it.\nEnd with 'Answer: <answer>'."
    runs = [
        make_run(tmp_path, "a", "rlsd", 0, [0.5], 1, None),
        make_run(tmp_path, "b", "rlsd", 1, [0.5], 1, None),
        make_run(tmp_path, "c", "grpo", 0, [0.5], 1, None),
        make_run(tmp_path, "d", "rlsd", 0, [0.5], 1, None, **{"data.teacher_template": template}),
        make_run(
            tmp_path,
            "e",
            "rlsd",
            0,
            [0.5],
            1,
            None,
            **{**THREE_FIELDS, "train.lr": "0.001", "rlsd.lambda": "1.0", "teacher.mode": "frozen"},
        ),
    ]
    labels = list(group_runs([load_run(p) for p in runs]))
    assert labels[:3] == ["rlsd", "grpo", "rlsd · template #2"]
    assert all(len(label) <= MAX_LABEL and "\n" not in label for label in labels)
    assert labels[3].startswith("rlsd · λ=1.0 · T=128 · G=8 · teacher=frozen") and labels[
        3
    ].endswith("…")


def test_labels_of_runs_differing_in_three_fields_fit_inside_the_figure(tmp_path):
    runs = [
        make_run(tmp_path, "rlsd-s0", "rlsd", 0, [0, 0.5, 1.0], 10, 100),
        make_run(tmp_path, "rlsd-s1", "rlsd", 1, [0, 0.5, 0.5], 10, 100),
        make_run(tmp_path, "grpo", "grpo", 0, [0, 0.5, 0.5], 10, 100),
        make_run(tmp_path, "big", "rlsd", 0, [0, 0.25, 0.5], 10, 100, **THREE_FIELDS),
        make_run(tmp_path, "big-grpo", "grpo", 0, [0, 0, 0.5], 10, 100, **THREE_FIELDS),
    ]
    groups = group_runs([load_run(p) for p in runs])
    _, target, rule = summary(groups, None)
    fig = compare_figure(groups, target, rule)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside = fig.bbox
    (legend,) = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[:4] == [  # two groups of each: no common value, every group names all three
        "rlsd · T=64 · G=4 · B=8 (n=2)",
        "grpo · T=64 · G=4 · B=8 (n=1)",
        "rlsd · T=128 · G=8 · B=16 (n=1)",
        "grpo · T=128 · G=8 · B=16 (n=1)",
    ]
    boxes = [legend.get_window_extent(renderer)]
    boxes += [t.get_window_extent(renderer) for t in fig.texts]
    boxes += [ax.get_tightbbox(renderer) for ax in fig.axes if ax.axison]
    for box in boxes:  # everything lies inside the figure
        assert box.x0 >= inside.x0 and box.y0 >= inside.y0, box
        assert box.x1 <= inside.x1 and box.y1 <= inside.y1, box
    for ax in fig.axes:  # the one legend is below the panels: it covers no curve
        assert ax.get_legend() is None
        assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    note = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
    assert "G: rollout.num_generations" in note and "B: train.prompts_per_step" in note
    assert f"Target {target:.3f} = 0.9 × 0.417" in note  # rlsd: seeds at 0.5 and 0.333
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_band_spans_the_runs_that_reached_each_step(runs):
    rlsd = group_runs([load_run(p) for p in runs])["rlsd"].runs
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


def test_default_target_is_nine_tenths_of_the_best_final_accuracy(runs):
    table, target, rule = summary(group_runs([load_run(p) for p in runs]), None)
    # final accuracies: rlsd 0.5 (both seeds average 0.5 over their steps), grpo 0.25
    assert target == pytest.approx(0.9 * 0.5) and target > 0
    assert rule == "0.9 × 0.500, the best group's final training accuracy (rlsd)"
    rlsd, grpo = table
    assert rlsd["runs"] == 2 and rlsd["steps"] == 4
    assert rlsd["final_accuracy"] == (0.5, 0.0)
    assert rlsd["reached"] == "2/2"  # moving averages: s0 .5 at step 4, s1 .5 at step 2
    assert rlsd["steps_to_target"] == (3.0, pytest.approx(math.sqrt(2)))
    assert rlsd["seconds_to_target"] == (40.0, 0.0)
    assert grpo["reached"] == "0/1" and grpo["steps_to_target"] is None
    assert rlsd["peak_mem_mb"] == 202 and grpo["peak_mem_mb"] is None
    assert rlsd["final_eval"] is None and rlsd["eval_source"] == "-"


def test_a_given_target_and_no_target(runs, tmp_path):
    table, target, rule = summary(group_runs([load_run(p) for p in runs]), 0.25)
    assert target == 0.25 and rule == "the given target"
    assert [row["reached"] for row in table] == ["2/2", "1/1"]
    assert table[0]["seconds_to_target"][0] == 30.0
    assert table[0]["seconds_to_target"][1] == pytest.approx(math.sqrt(200))  # 20 and 40
    flat = [make_run(tmp_path, f"zero{s}", "rlsd", s, [0, 0], 1, None) for s in range(2)]
    table, target, rule = summary(group_runs([load_run(p) for p in flat]), None)
    assert target is None and "no group's final training accuracy is above 0" in rule
    assert table[0]["reached"] == "-" and table[0]["steps_to_target"] is None


def test_held_out_results_come_from_the_run_directory(runs, tmp_path):
    s0, _, grpo = runs
    write_eval(s0, "eval-20260101-000000.json", 0.25, step=2)
    write_eval(s0, "eval-20260102-000000.json", 0.5, step=4)  # the latest checkpoint: shown
    with (grpo / "evals.jsonl").open("w") as f:  # training's own evaluation, per item
        f.write(json.dumps({"step": 2, "correct": [True, False, False, False]}) + "\n")
        f.write(json.dumps({"step": 4, "correct": [True, True, False, False]}) + "\n")
    write_eval(grpo, "eval-20260101-000000.json", 0.125, step=2)  # older than training's
    table, _, _ = summary(group_runs([load_run(p) for p in runs]), None)
    rlsd, grpo_row = table
    assert rlsd["final_eval"] == (0.5, 0.0)  # only s0 has a held-out result
    assert rlsd["eval_source"] == "rlsd eval of checkpoint-4, 8 items"
    assert grpo_row["final_eval"] == (0.5, 0.0)
    assert grpo_row["eval_source"] == "training eval at step 4, 4 items"
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, runs), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert "| rlsd | 2 | 4 | 0.500 | 0.500 | rlsd eval of checkpoint-4, 8 items |" in md
    assert "| grpo | 1 | 4 | 0.250 | 0.500 | training eval at step 4, 4 items |" in md
    assert "rlsd eval of checkpoint-4" in (out / "compare.html").read_text()
    groups = group_runs([load_run(p) for p in runs])
    fig = compare_figure(groups, 0.45, "rule")
    (held,) = [ax for ax in fig.axes if ax.get_title() == "held-out accuracy"]
    stars = [line for line in held.get_lines() if line.get_marker() == "*"]
    assert [list(line.get_ydata()) for line in stars] == [[0.25, 0.5], [0.125]]


def test_compare_cli_writes_png_markdown_html(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| reached 0.450 |" in printed
    assert "| rlsd | 2 | 4 | 0.500 |" in printed
    assert "| grpo | 1 | 4 | 0.250 | - | - | 0/1 | - | - | - |" in printed
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "compare.md").read_text()
    assert "![curves](compare.png)" in md
    assert "Target accuracy 0.450 = 0.9 × 0.500, the best group's final training accuracy" in md
    page = (out / "compare.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page
    assert "Target accuracy 0.450" in page


def test_compare_step_ticks_are_integers(runs):
    groups = group_runs([load_run(p) for p in runs])
    fig = compare_figure(groups, 0.45, "rule")
    fig.canvas.draw()
    for ax in (ax for ax in fig.axes if ax.axison):
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)


def test_compare_refuses_a_non_run(runs, tmp_path, capsys):
    assert main(["compare", str(runs[0]), str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text((runs[0] / "config.yaml").read_text())
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert main(["compare", str(tmp_path / "empty")]) == 2
    assert "no steps logged yet" in capsys.readouterr().err


def test_flops_to_a_step_sum_the_logged_compute_or_say_none():
    from rlsd.engine.compute import flops_to_step

    rows = [
        {"step": 1, "compute/flops": 2e12},
        {"step": 2, "compute/flops": 3e12},
        {"step": 3, "compute/flops": 4e12},
    ]
    assert flops_to_step(rows, 2) == 5e12
    assert flops_to_step(rows, 3) == 9e12
    older = [{"step": 1}, {"step": 2, "compute/flops": 3e12}]  # a run from before the count
    assert flops_to_step(older, 2) is None
