"""`rlsd study`: the grid, resumability, the summary, the bootstrap by hand, the leakage check."""

import itertools
import json
import shutil
from pathlib import Path

import pytest
import yaml

from rlsd.commands.cli import main
from rlsd.commands.study import describe, grid, load_study, run_study, seconds_left
from rlsd.engine.runfiles import read_jsonl
from rlsd.report.study import (
    ablation_summary,
    arm_evals,
    bootstrap,
    bootstrap_difference,
    diagnostics,
    leakage,
    learning_groups,
    run_peak_mb,
    steps_to_stay,
    summarize,
)
from rlsd.report.study_markdown import _changes, ablation_rows
from rlsd.schema.config import ConfigError

from .conftest import TESTS_DIR


def write_study(tmp: Path, model_dir: Path, **extra) -> Path:
    spec = {
        "base": None,
        "out": str(tmp / "study"),
        "steps": 2,
        "eval_every": 1,
        "eval_items": 4,
        "seeds": [0, 1],
        "pass_k": 2,
        "pass_k_items": 3,
        "tasks": {"arith": {"data.size": 48, "data.heldout_size": 4}},
        "arms": {"grpo": {"algorithm.name": "grpo"}, "rlsd": {"algorithm.name": "rlsd"}},
        **extra,
    }
    recipe = tmp / "tiny.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(model_dir), "lora_r": 4, "threads": 1},
                "rollout": {"max_new_tokens": 8, "num_generations": 4},
                "train": {"prompts_per_step": 2, "micro_batch_size": 4, "lr": 0.01},
                "reward": {"verifiers": [f"{TESTS_DIR / 'rewards_for_tests.py'}:length_reward"]},
                "output": {"progress": False, "log_samples": 0},
            }
        )
    )
    spec["base"] = str(recipe)
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_2x2_study_runs_summarises_and_resumes(tiny_model_dir, tmp_path, capsys):
    path = write_study(tmp_path, tiny_model_dir)
    study = load_study(path)
    assert [(c.arm, c.seed) for c in grid(study)] == [
        ("grpo", 0),
        ("rlsd", 0),
        ("grpo", 1),
        ("rlsd", 1),
    ]
    assert main(["study", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs (0 finished)" in out
    assert "base recipe: " in out and "read from the current directory" in out
    assert main(["study", str(path)]) == 0
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    arms = summary["tasks"]["arith"]["arms"]
    assert set(arms) == {"grpo", "rlsd"} and all(a["runs"] == 2 for a in arms.values())
    assert [int(s) for s in arms["rlsd"]["curve"]] == [0, 1, 2]  # the base model is step 0
    for arm in arms.values():
        mean, low, high = arm["final"]
        assert 0 <= low <= mean <= high <= 1 and arm["eval_items"] == 4
    assert (tmp_path / "study" / "accuracy-arith.png").read_bytes()[:4] == b"\x89PNG"
    assert "| rlsd | 2/2 |" in (tmp_path / "study" / "summary.md").read_text()
    assert arms["grpo"]["vs_reference"] is None  # the reference is not compared with itself
    md = (tmp_path / "study" / "summary.md").read_text()
    assert "| (reference) |" in next(x for x in md.splitlines() if x.startswith("| grpo | 2/2 |"))
    assert all(a["peak_mem_mb"] > 0 for a in arms.values())  # each run's own peak (Linux)
    for arm in ("grpo", "rlsd"):  # the share of groups with a gradient, from the runs' own logs
        zero = [
            r["adv/zero_group_frac"]
            for seed in (0, 1)
            for r in read_jsonl(
                tmp_path / "study" / "arith" / f"{arm}-seed{seed}" / "metrics.jsonl"
            )
        ]
        assert arms[arm]["learning_groups"] == pytest.approx(1 - sum(zero) / len(zero))
    # pass@2 of each final checkpoint on 3 items: whether any of the 2 samples was correct
    for arm in ("grpo", "rlsd"):
        counts = [
            json.loads(
                (tmp_path / "study" / "arith" / f"{arm}-seed{seed}" / "passk.json").read_text()
            )["correct"]
            for seed in (0, 1)
        ]
        assert all(len(c) == 3 and all(0 <= x <= 2 for x in c) for c in counts)
        assert arms[arm]["pass_k"][0] == pytest.approx(sum(x > 0 for c in counts for x in c) / 6)
        assert arms[arm]["sampled_pass1"][0] == pytest.approx(sum(map(sum, counts)) / 12)
        assert arms[arm]["pass_k_runs"] == 2
    assert summary["tasks"]["arith"]["base"]["pass_k"] is not None
    answers = next(
        json.loads(x)["answers"]
        for x in (tmp_path / "study" / "arith" / "grpo-seed0" / "evals.jsonl").open()
    )
    top, share = summary["tasks"]["arith"]["base"]["constant_answer"]
    assert share == max(answers.count(a) for a in answers) / len(answers) == answers.count(top) / 4
    assert top == next(a for a in answers if answers.count(a) == share * len(answers))  # first seen
    text = (tmp_path / "study" / "summary.md").read_text()
    assert "pass@2 [95 % CI]" in text and "Base model: greedy pass@1" in text
    # the credit diagnostics: a row for the arm with a teacher, none for grpo, and their plot
    assert (
        "| rlsd | " in text.split("teacher KL")[1]
        and "| grpo | " not in text.split("teacher KL")[1]
    )
    assert (
        "rlsd/delta_std_incorrect" in arms["rlsd"]["diagnostics"]
        and not arms["grpo"]["diagnostics"]
    )
    assert (tmp_path / "study" / "diagnostics-arith.png").read_bytes()[:4] == b"\x89PNG"
    assert "| rlsd | 2 |" in (tmp_path / "study" / "compare-arith" / "compare.md").read_text()
    diff, low, high = arms["rlsd"]["vs_reference"]
    assert diff == pytest.approx(arms["rlsd"]["final"][0] - arms["grpo"]["final"][0])
    assert low <= diff <= high
    # a killed study: one run died after logging step 1, before its first (and only, final)
    # checkpoint: no checkpoint and no `latest`; the rerun redoes only that run
    victim = tmp_path / "study" / "arith" / "rlsd-seed1"
    metrics = victim / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])
    for ckpt in victim.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    (victim / "latest").unlink()
    (victim / "passk.json").unlink()  # written only once a run has finished
    untouched = (tmp_path / "study" / "arith" / "grpo-seed0" / "metrics.jsonl").stat().st_mtime_ns
    assert main(["study", str(path), "--dry-run"]) == 0
    assert "4 runs (3 finished)" in capsys.readouterr().out
    assert main(["study", str(path), "--summarize"]) == 0  # the unfinished run is left out
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert summary["tasks"]["arith"]["arms"]["rlsd"]["runs"] == 1
    assert main(["study", str(path)]) == 0
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2]
    assert (
        tmp_path / "study" / "arith" / "grpo-seed0" / "metrics.jsonl"
    ).stat().st_mtime_ns == untouched
    assert (victim / "passk.json").is_file()
    # a finished run without its checkpoints (a fresh clone): no pass@k, said, nothing lost
    other = tmp_path / "study" / "arith" / "grpo-seed1"
    for ckpt in other.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    (other / "passk.json").unlink()
    capsys.readouterr()
    assert main(["study", str(path)]) == 0
    assert "grpo-seed1: no checkpoint here, so no pass@2" in capsys.readouterr().out
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert summary["tasks"]["arith"]["arms"]["grpo"]["pass_k_runs"] == 1
    assert summary["tasks"]["arith"]["arms"]["grpo"]["runs"] == 2


def exact_bootstrap(matrix):
    """Every equally likely resample of seeds and items, enumerated: the exact distribution."""
    seeds, items = len(matrix), len(matrix[0])
    means = []
    for rows in itertools.product(range(seeds), repeat=seeds):
        for cols in itertools.product(range(items), repeat=items):
            means.append(sum(matrix[r][c] for r in rows for c in cols) / (seeds * items))
    return sorted(means)


def test_bootstrap_against_the_exact_distribution():
    assert bootstrap([[1, 1, 1]]) == (1.0, 1.0, 1.0)  # no spread, no interval
    matrix = [[1, 0, 1], [0, 0, 1]]  # 2 seeds x 3 items, mean 0.5
    mean, low, high = bootstrap(matrix, samples=20000, seed=3)
    exact = exact_bootstrap(matrix)  # 4 x 27 = 108 resamples
    assert mean == 0.5
    assert low == pytest.approx(exact[int(0.025 * 107)], abs=1 / 6 + 1e-9)
    assert high == pytest.approx(exact[107 - int(0.025 * 107)], abs=1 / 6 + 1e-9)
    assert exact[0] == 0.0 and exact[-1] == 1.0 and low < mean < high


def test_paired_bootstrap_difference_against_the_exact_distribution():
    one = [[1, 0, 1, 1]]
    assert bootstrap_difference(one, one) == (0.0, 0.0, 0.0)  # paired items: no spread
    same = [[1, 0, 1, 1], [0, 1, 1, 0]]  # two seeds: each arm's seeds resample on their own
    diff, low, high = bootstrap_difference(same, same)
    assert diff == 0.0 and low < 0 < high
    a, b = [[1, 0, 1]], [[0, 0, 1]]  # one seed each: per-item differences 1, 0, 0
    diff, low, high = bootstrap_difference(a, b, samples=20000, seed=1)
    exact = sorted(sum(d) / 3 for d in itertools.product([1, 0, 0], repeat=3))  # 27 resamples
    assert diff == pytest.approx(1 / 3)
    assert low == pytest.approx(exact[int(0.025 * 26)], abs=1 / 3 + 1e-9)
    assert high == pytest.approx(exact[26 - int(0.025 * 26)], abs=1 / 3 + 1e-9)
    assert low == 0.0 and high == 1.0  # 1/27 of resamples are all-1 or all-0 diffs: > 2.5 %
    with pytest.raises(ValueError, match="3 and 4 items"):
        bootstrap_difference(a, same)


def test_leakage_on_hand_written_completions():
    assert leakage("Using the reference solution, 4 + 3 = 7.\nAnswer: 7", "7")["echo"]
    assert leakage("As the reference answer says: 12", "12")["echo"]
    assert not leakage("4 + 3 = 7\nAnswer: 7", "7")["echo"]
    assert leakage("Solution solution solution solution", "7")["echo"]  # OPSD's collapse
    assert leakage("I solved the problem in my own way.", "7")["echo"]  # GRPO+OPSD's collapse
    assert not leakage("Resolutions aside, 4 + 3 = 7\nAnswer: 7", "7")["echo"]  # whole words
    assert leakage("7\nBecause 4 + 3 = 7.\nAnswer: 7", "7")["answer_first"]
    assert not leakage("4 + 3 = 7\nAnswer: 7", "7")["answer_first"]
    assert not leakage("Answer: 7", "7")["answer_first"]  # a bare answer is not working after it
    assert not leakage("17 is close\nso 4 + 3 = 7", "7")["answer_first"]  # 17 is not 7
    assert leakage("The answer is 7.\nCheck: 4 + 3 = 7", "7")["answer_first"]
    # repeating the answer up to the token cap is not working it out (RLSD arith seed 2)
    assert not leakage(
        "Answer: 138.\n\nFinal answer: 138.\n\nThe answer is 138.\n\nThe answer is 1", "138"
    )["answer_first"]
    assert leakage("Answer: 138.\nThe answer is 138.\n100 + 38 = 138", "138")["answer_first"]


def test_study_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "base": "x",
                "out": "o",
                "steps": 1,
                "eval_every": 1,
                "eval_items": 1,
                "seeds": [0],
                "tasks": {},
                "arms": {},
                "typo": 1,
            }
        )
    )
    with pytest.raises(ConfigError, match="unknown study key 'typo'"):
        load_study(bad)
    bad.write_text(yaml.safe_dump({"base": "x"}))
    with pytest.raises(ConfigError, match="out: required"):
        load_study(bad)
    bad.write_text(
        yaml.safe_dump(
            {
                "base": "x",
                "out": "o",
                "steps": 1,
                "eval_every": 1,
                "eval_items": 1,
                "seeds": [0],
                "tasks": {},
                "arms": {},
                "pass_k": 1,
            }
        )
    )
    with pytest.raises(ConfigError, match="pass_k: 1 .0 for none, or k >= 2 samples"):
        load_study(bad)
    for change, wanted in (
        ({"eval_every": 0}, "eval_every: 0 .a whole number >= 1"),
        ({"steps": "40"}, "steps: '40' .a whole number"),
        ({"eval_every": 2}, "eval_every: 2 is more than steps .1."),
    ):
        bad.write_text(
            yaml.safe_dump(
                {
                    "base": "x",
                    "out": "o",
                    "steps": 1,
                    "eval_every": 1,
                    "eval_items": 1,
                    "seeds": [0],
                    "tasks": {},
                    "arms": {},
                    **change,
                }
            )
        )
        with pytest.raises(ConfigError, match=wanted):
            load_study(bad)


def test_ablations_run_on_their_tasks_with_the_first_seed(tiny_model_dir, tmp_path):
    path = write_study(
        tmp_path,
        tiny_model_dir,
        ablations={"rlsd-l1": {"rlsd.lambda": 1.0}},
        ablation_tasks=["arith"],
        tasks={"arith": {}, "other": {"data.task": "gcd"}},
    )
    cells = [(c.task, c.arm, c.seed) for c in grid(load_study(path))]
    assert ("arith", "rlsd-l1", 0) in cells and ("arith", "rlsd-l1", 1) not in cells
    assert not any(task == "other" and arm == "rlsd-l1" for task, arm, _ in cells)
    assert len(cells) == 2 * 4 + 1
    assert cells[:2] == [("arith", "grpo", 0), ("arith", "rlsd", 0)]  # seed by seed, tasks
    assert cells[2:4] == [("other", "grpo", 0), ("other", "rlsd", 0)]  # in turn, ablations last
    assert cells[-1] == ("arith", "rlsd-l1", 0)
    bad = write_study(tmp_path, tiny_model_dir, ablation_tasks=["nope"])
    with pytest.raises(ConfigError, match="ablation_tasks: 'nope' is not in tasks"):
        load_study(bad)
    bad = write_study(tmp_path, tiny_model_dir, headline_arms=["nope"])
    with pytest.raises(ConfigError, match="headline_arms: 'nope' is not in arms"):
        load_study(bad)


def test_headline_arms_run_all_their_seeds_before_ablations_and_other_seeds(
    tiny_model_dir, tmp_path
):
    path = write_study(
        tmp_path,
        tiny_model_dir,
        seeds=[0, 1, 2],
        headline_arms=["rlsd"],
        ablations={"rlsd-l1": {"rlsd.lambda": 1.0}},
        tasks={"arith": {}, "other": {}},
    )
    cells = [f"{c.task}/{c.name}" for c in grid(load_study(path))]
    assert cells == [
        "arith/grpo-seed0",
        "arith/rlsd-seed0",
        "other/grpo-seed0",
        "other/rlsd-seed0",  # every arm's first seed
        "arith/rlsd-seed1",
        "other/rlsd-seed1",
        "arith/rlsd-seed2",
        "other/rlsd-seed2",  # the headline arm's other seeds
        "arith/rlsd-l1-seed0",
        "other/rlsd-l1-seed0",  # the ablations
        "arith/grpo-seed1",
        "other/grpo-seed1",
        "arith/grpo-seed2",
        "other/grpo-seed2",
    ]  # the other arms' later seeds


def test_an_ablation_against_its_reference_arm_at_the_same_seed_by_hand(tiny_model_dir, tmp_path):
    path = write_study(
        tmp_path,
        tiny_model_dir,
        ablation_reference="rlsd",
        ablations={"rlsd-l1": {"algorithm.name": "rlsd", "rlsd.lambda": 1.0}},
    )
    study = load_study(path)
    runs = tmp_path / "study" / "arith"
    for name, evals in (
        ("rlsd-seed0", {1: [1, 0, 0, 0], 2: [1, 1, 0, 0]}),
        ("rlsd-seed1", {1: [1, 1, 1, 1], 2: [1, 1, 1, 1]}),  # another seed
        ("rlsd-l1-seed0", {1: [0, 0, 0, 0], 2: [1, 1, 1, 0]}),
    ):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.jsonl").write_text('{"step": 2}\n')
        (runs / name / "config.yaml").write_text(yaml.safe_dump({"algorithm": {"name": "rlsd"}}))
        (runs / name / "evals.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "step": s,
                        "correct": c,
                        "completions": ["Answer: 1"] * 4,
                        "answers": ["1"] * 4,
                    }
                )
                + "\n"
                for s, c in evals.items()
            )
        )

    def against_seed0():
        return ablation_summary(
            arm_evals(study, "arith", "rlsd-l1"),
            arm_evals(study, "arith", "rlsd"),
            arm_evals(study, "arith", "rlsd", [0]),
            "rlsd-seed0",
        )

    vs = against_seed0()
    assert vs["against"] == "rlsd-seed0"  # seed 1 is left out: it would make the final 0.75
    assert vs["final"] == 0.5 and vs["auc"] == pytest.approx((0.25 + 0.5) / 2)
    # paired item differences [0, 0, 1, 0]: the mean of 4 resampled ones is k/4, k ~ Bin(4, 1/4);
    # P(k = 0) = 32 % > 2.5 %, P(k >= 3) = 5.1 % > 2.5 % > P(k = 4) = 0.4 %
    assert vs["difference"] == [0.25, 0.0, 0.75]
    assert vs["seeds"] == 2 and vs["seed_spread"] == 0.5  # rlsd's seeds end at 0.5 and 1.0
    arms = {
        "rlsd": {"final": [0.75, 0.5, 1.0], "auc": 0.6},
        "rlsd-l1": {"final": [0.75, 0.5, 1.0], "auc": 0.4, "vs_ablation_reference": vs},
    }
    rows = ablation_rows(study, arms, "arith")
    assert rows[-1] == (
        "| rlsd-l1 | rlsd.lambda=1.0 | 75.0 [50.0, 100.0] | 50.0 | "
        "+25.0 [+0.0, +75.0] | 40.0 | 37.5 |"
    )
    summary = summarize(study)["tasks"]["arith"]["arms"]  # the summary carries it to its page
    assert summary["rlsd-l1"]["vs_ablation_reference"] == vs
    assert "vs_ablation_reference" not in summary["rlsd"]
    line = next(
        x
        for x in (tmp_path / "study" / "summary.md").read_text().splitlines()
        if x.startswith("| rlsd-l1 | rlsd.lambda=1.0 | 75.0 [")
    )  # its own bootstrap
    assert line.endswith("| 50.0 | +25.0 [+0.0, +75.0] | 37.5 | 37.5 |")
    assert vs["curve"] == {1: 0.25, 2: 0.5}  # the reference run's curve, plotted beside it
    assert (tmp_path / "study" / "ablations-arith.png").read_bytes()[:4] == b"\x89PNG"
    (runs / "rlsd-seed0" / "metrics.jsonl").write_text('{"step": 1}\n')  # not finished
    assert against_seed0() is None
    assert "the 2 seeds of rlsd end 50.0 points apart" in rows[0]
    assert ablation_rows(study, {"rlsd": arms["rlsd"]}, "arith") == []
    bad = write_study(tmp_path, tiny_model_dir, ablation_reference="nope")
    with pytest.raises(ConfigError, match="ablation_reference: 'nope' is not in arms"):
        load_study(bad)


def test_an_ablations_changes_fit_one_table_cell():
    template = {
        "algorithm.name": "rlsd",
        "teacher.privileged": False,
        "data.teacher_template": "{{ prompt }}\n\nSolve it | your way.\nEnd your reply.",
    }
    assert _changes(template) == (
        "teacher.privileged=False, data.teacher_template={{ prompt }} Solve it / your way. End..."
    )  # newlines folded, cut at 40
    assert _changes({"algorithm.name": "rlsd"}) == "-"


def test_diagnostics_means_and_curves_by_hand():
    rows = [
        {
            "step": 1,
            "reward/accuracy": 0.0,
            "teacher/kl": 0.2,
            "rlsd/delta_mean_correct": 0.0,
            "rlsd/delta_mean_incorrect": -0.4,
        },  # no correct completion: its 0.0 is no value
        {
            "step": 2,
            "reward/accuracy": 0.5,
            "teacher/kl": 0.4,
            "rlsd/delta_mean_correct": -0.1,
            "rlsd/delta_mean_incorrect": -0.2,
        },
        {
            "step": 2,
            "reward/accuracy": 1.0,
            "teacher/kl": 0.0,
            "rlsd/delta_mean_correct": -0.3,
            "rlsd/delta_mean_incorrect": 0.0,
        },
    ]  # a second run; no incorrect completion
    means, curves = diagnostics(rows)
    assert means["teacher/kl"] == pytest.approx(0.2)
    assert means["rlsd/delta_mean_correct"] == pytest.approx(-0.2)
    assert means["rlsd/delta_mean_incorrect"] == pytest.approx(-0.3)
    assert curves["teacher/kl"] == pytest.approx({1: 0.2, 2: 0.2})
    assert curves["rlsd/delta_mean_correct"] == pytest.approx({2: -0.2})
    assert "rlsd/clip_low_frac" not in means and diagnostics([]) == ({}, {})


def test_learning_groups_by_hand():
    rows = [
        {"adv/zero_group_frac": 0.75},  # 6 of 8 groups had equal rewards
        {"adv/zero_group_frac": 1.0},  # no group carried a gradient
        {"step": 3},  # logged no advantages (e.g. an evaluation row)
        {"adv/zero_group_frac": 0.5},
    ]
    assert learning_groups(rows) == pytest.approx((0.25 + 0.0 + 0.5) / 3)
    assert learning_groups([{"step": 1}]) is None and learning_groups([]) is None


def test_steps_to_target_is_where_the_curve_stays_at_the_target():
    steps = [0, 10, 20, 30, 40]
    # touches 0.70 at step 10, dips, then stays from step 30: the first crossing would say 10
    assert steps_to_stay(steps, [0.63, 0.70, 0.68, 0.71, 0.70], 0.70) == 30
    assert steps_to_stay(steps, [0.63, 0.71, 0.72, 0.73, 0.74], 0.70) == 10  # never falls back
    assert steps_to_stay(steps, [0.63, 0.71, 0.72, 0.73, 0.69], 0.70) is None  # ends below
    assert steps_to_stay(steps, [0.75] * 5, 0.70) == 0  # the base model is already there
    assert steps_to_stay(steps, [0.75] * 5, None) is None and steps_to_stay([], [], 0.7) is None


def test_compute_to_target_is_the_runs_mean_flops_up_to_that_step():
    from rlsd.report.study import tflop_to_target

    runs = [
        [{"step": s, "compute/flops": 1e12} for s in range(1, 5)],
        [{"step": s, "compute/flops": 3e12} for s in range(1, 5)],
    ]
    assert tflop_to_target(runs, 2) == pytest.approx((2 + 6) / 2)
    assert tflop_to_target(runs, None) is None and tflop_to_target([], 2) is None
    runs[1][0] = {"step": 1}  # a run that did not log its compute
    assert tflop_to_target(runs, 2) is None


def test_peak_memory_counts_only_what_runs_measured_for_themselves():
    rows = [
        {"perf/peak_mem_mb": 900.0},  # logged before the per-run reset: may be another run's
        {"perf/peak_mem_mb": 800.0, "perf/peak_mem_scope": "process"},
        {"perf/peak_mem_mb": 300.0, "perf/peak_mem_scope": "run"},
        {"perf/peak_mem_mb": 350.0, "perf/peak_mem_scope": "run"},
    ]
    assert run_peak_mb(rows) == 350.0
    assert run_peak_mb(rows[:2]) is None and run_peak_mb([]) is None


def test_a_stopped_study_says_how_to_go_on(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from rlsd.step import trainer

    def stopped(cfg, resume=True):
        raise trainer.TrainingStopped(
            "stopped by signal SIGTERM after step 1; checkpoint written", 143
        )

    monkeypatch.setattr(trainer, "train", stopped)
    path = write_study(tmp_path, tiny_model_dir, pass_k=0)
    assert main(["study", str(path)]) == 143  # no traceback, the signal's exit code
    err = capsys.readouterr().err
    assert "after step 1" in err and f"rerun `rlsd study {path}` to go on" in err
    assert not (tmp_path / "study" / "summary.json").exists()


def test_time_left_by_hand(tiny_model_dir, tmp_path):
    study = load_study(write_study(tmp_path, tiny_model_dir))  # 2 steps, eval every step
    runs = tmp_path / "study" / "arith"
    for name, rows in (
        ("grpo-seed0", [(1, 10.0, 4.0), (2, 20.0, 4.0)]),
        ("rlsd-seed0", [(1, 40.0, 6.0)]),
    ):  # rlsd-seed0 stopped after step 1
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.jsonl").write_text(
            "".join(
                json.dumps({"step": s, "perf/step_seconds": t, "eval/seconds": e}) + "\n"
                for s, t, e in rows
            )
        )
    (runs / "grpo-seed0" / "passk.json").write_text(json.dumps({"k": 2, "seconds": 30.0}))
    # grpo runs at its median 15 s a step, rlsd at 40; evaluations at the median 4 s:
    # rlsd-seed0 1 step + 1 eval = 44, grpo-seed1 2 * 15 + 2 * 4 = 38, rlsd-seed1 2 * 40 + 8 = 88
    assert seconds_left(study, grid(study)) == (170.0, 3 * 30.0, 4.0)
    assert "estimated time left: 0.1 h (0.0 h of training" in describe(study)


@pytest.mark.slow  # ~25 s of subprocesses; CI runs it with -m slow
def test_a_parallel_study_matches_the_sequential_one(tiny_model_dir, tmp_path):
    """--jobs 2: every run in its own process gives exactly the runs of a sequential study
    (one thread each, the same seeds), and a rerun skips them all."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    sequential = write_study(tmp_path / "one", tiny_model_dir, pass_k=0, seeds=[0])
    parallel = write_study(tmp_path / "two", tiny_model_dir, pass_k=0, seeds=[0])
    assert main(["study", str(sequential)]) == 0
    assert main(["study", str(parallel), "--jobs", "2"]) == 0
    for arm in ("grpo", "rlsd"):
        runs = [tmp_path / where / "study" / "arith" / f"{arm}-seed0" for where in ("one", "two")]
        losses = [
            [
                r["loss/policy"]
                for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            ]
            for run in runs
        ]
        assert len(losses[0]) == 2 and losses[0] == losses[1]
        evals = [(run / "evals.jsonl").read_text() for run in runs]
        assert evals[0] == evals[1]
    before = (tmp_path / "two" / "study" / "arith" / "rlsd-seed0" / "metrics.jsonl").stat()
    assert main(["study", str(parallel), "--jobs", "2"]) == 0
    after = (tmp_path / "two" / "study" / "arith" / "rlsd-seed0" / "metrics.jsonl").stat()
    assert after.st_mtime_ns == before.st_mtime_ns


def test_a_bad_run_config_fails_before_any_run_starts(tiny_model_dir, tmp_path, capsys):
    path = write_study(
        tmp_path,
        tiny_model_dir,
        pass_k=0,
        ablations={"rlsd-bad": {"algorithm.name": "rlsd", "rlsd.lambda": -1}},
    )
    assert main(["study", str(path), "--jobs", "2"]) == 2
    assert "rlsd.lambda" in capsys.readouterr().err
    assert not (tmp_path / "study" / "arith").exists()


def test_a_failed_parallel_run_is_named_and_stops_new_runs(tiny_model_dir, tmp_path, capsys):
    path = write_study(tmp_path, tiny_model_dir, pass_k=0)
    blocker = tmp_path / "study" / "arith" / "grpo-seed0"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the run directory goes")  # grpo-seed0 cannot start
    assert main(["study", str(path), "--jobs", "2"]) == 1
    err = capsys.readouterr().err
    assert "arith/grpo-seed0: failed (exit code 1" in err and "did not start" in err
    assert (tmp_path / "study" / "arith" / "rlsd-seed0" / "metrics.jsonl").is_file()  # ran
    assert not (tmp_path / "study" / "arith" / "rlsd-seed1").exists()  # never started


@pytest.mark.slow  # ~40 s of subprocesses; CI runs it with -m slow
def test_sigterm_stops_every_parallel_run_with_a_checkpoint_and_a_rerun_resumes(
    tiny_model_dir, tmp_path
):
    import os
    import signal
    import subprocess
    import sys
    import time

    path = write_study(tmp_path, tiny_model_dir, pass_k=0, seeds=[0], steps=400, eval_every=400)
    runs = [tmp_path / "study" / "arith" / f"{arm}-seed0" for arm in ("grpo", "rlsd")]
    study = subprocess.Popen(
        [sys.executable, "-m", "rlsd.commands.cli", "study", str(path), "--jobs", "2"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )
    deadline = time.monotonic() + 240
    while not all(
        (r / "metrics.jsonl").is_file() and (r / "metrics.jsonl").stat().st_size for r in runs
    ):  # both runs are past their first step
        assert study.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    study.send_signal(signal.SIGTERM)
    _, err = study.communicate(timeout=120)
    assert study.returncode == 143, err
    assert "stopped by signal SIGTERM" in err and "wrote their checkpoints" in err
    steps = []
    for run in runs:
        checkpoints = sorted(run.glob("checkpoint-*"))
        assert checkpoints, f"{run}: no checkpoint"
        steps.append(int(checkpoints[-1].name.split("-")[1]))
        assert 1 <= steps[-1] < 400
    # a rerun resumes each run after its checkpoint (2 more steps to keep the test short)
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "steps": max(steps) + 2, "eval_every": 1}))
    run_study(load_study(path), jobs=2)
    for run, _step in zip(runs, steps):
        logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert logged == list(range(1, max(steps) + 3)), run
