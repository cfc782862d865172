"""The summary of `rlsd study`: per task and arm, held-out accuracy over its finished runs with
95 % percentile bootstrap intervals (seeds and items resampled together; the difference to the
reference arm pairs the items), steps and seconds to the reference arm's final accuracy, area
under the curve, speed, memory, the leakage check and the teacher's credit diagnostics; written as
JSON, a markdown page (`study_markdown.py`) and PNG plots."""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from collections import Counter
from typing import Any

from ..commands.study import Cell, Study, eval_path, finished, grid, run_dir
from ..engine.compute import flops_to_step
from ..engine.runfiles import read_jsonl, write_atomic
from .compare import FINAL_WINDOW, final_value, load_run, write_compare
from .study_markdown import GROUPS, summary_markdown
from .study_plots import ablations_png, accuracy_png, diagnostics_png

OPENER = re.compile(r"^(the\s+)?(final\s+)?answer(\s+is)?\s*[:=]?\s*", re.IGNORECASE)
DIAGNOSTICS = (
    "teacher/kl",
    "rlsd/clip_low_frac",
    "rlsd/clip_high_frac",
    *(
        f"rlsd/{stat}_{group}"
        for group in GROUPS
        for stat in ("delta_mean", "delta_std", "clip_low_frac", "clip_high_frac")
    ),
)
# the teacher template's own words, absent from the student's prompt: a completion using them
# (down to OPSD's collapse into "solution solution ...") behaves as if it had seen that prompt
ECHO = re.compile(r"\b(reference|solution)s?\b|\bin (your|my) own way", re.IGNORECASE)


def resampled_mean(matrix: list[list[float]], rows: list[int], cols: list[int]) -> float:
    """The mean of matrix[r][c] over the (possibly repeated) rows and columns."""
    return sum(matrix[r][c] for r in rows for c in cols) / (len(rows) * len(cols))


def matrix_mean(matrix: list[list[float]]) -> float:
    return resampled_mean(matrix, list(range(len(matrix))), list(range(len(matrix[0]))))


def final_mean(evals: dict[int, list[list[float]]]) -> float | None:
    """The mean accuracy at the last evaluation step (None before any)."""
    return matrix_mean(evals[max(evals)]) if evals else None


def _interval(center: float, stats: list[float]) -> tuple[float, float, float]:
    stats = sorted(stats)
    count = len(stats)
    return center, stats[int(0.025 * (count - 1))], stats[math.ceil(0.975 * (count - 1))]


def bootstrap(
    matrix: list[list[float]], samples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile) of the mean of a seeds x items 0/1 matrix, resampling
    seeds and items with replacement."""
    rng = random.Random(seed)
    seeds, items = len(matrix), len(matrix[0])
    stats = []
    for _ in range(samples):
        rows = [rng.randrange(seeds) for _ in range(seeds)]
        cols = [rng.randrange(items) for _ in range(items)]
        stats.append(resampled_mean(matrix, rows, cols))
    return _interval(matrix_mean(matrix), stats)


def bootstrap_difference(
    a: list[list[float]], b: list[list[float]], samples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean(a) - mean(b), 2.5th, 97.5th percentile) for two arms' seeds x items 0/1 matrices on
    the same held-out items: the items are resampled together (paired), each arm's seeds on
    their own (different runs)."""
    if len(a[0]) != len(b[0]):
        raise ValueError(f"the arms were evaluated on {len(a[0])} and {len(b[0])} items")
    rng = random.Random(seed)
    items = len(a[0])
    stats = []
    for _ in range(samples):
        cols = [rng.randrange(items) for _ in range(items)]
        rows_a = [rng.randrange(len(a)) for _ in a]
        rows_b = [rng.randrange(len(b)) for _ in b]
        stats.append(resampled_mean(a, rows_a, cols) - resampled_mean(b, rows_b, cols))
    return _interval(matrix_mean(a) - matrix_mean(b), stats)


def leakage(completion: str, answer: str) -> dict[str, bool]:
    """Does a completion behave as if it had seen the reference? `echo`: it uses the teacher
    template's own words ("reference", "solution", "in your/my own way"); `answer_first`: it
    opens with the reference answer (optionally after "the answer is") and only then works it out: a
    later line does more than restate the answer ("Final answer: 7.", or one cut short by the
    token cap, "The answer is 1" for 17)."""
    lines = [x.strip() for x in completion.strip().splitlines() if x.strip()]
    first = OPENER.sub("", lines[0]) if lines else ""
    opens = bool(answer) and re.match(rf"{re.escape(answer)}(?![\w]|\.\d)", first) is not None
    works = any(not answer.startswith(OPENER.sub("", x).rstrip(" .")) for x in lines[1:])
    return {"echo": bool(ECHO.search(completion)), "answer_first": opens and works}


def finished_cells(study: Study, task: str, arm: str | None = None) -> list[Cell]:
    """The finished runs of a task (of one arm when given), in grid order."""
    return [
        c
        for c in grid(study)
        if c.task == task and (arm is None or c.arm == arm) and finished(study, c)
    ]


def arm_evals(
    study: Study, task: str, arm: str, seeds: list[int] | None = None
) -> dict[int, list[list[float]]]:
    """eval step -> seeds x items matrix of greedy correctness over the arm's finished runs (of
    `seeds` only, when given; a run still in progress is left out; step 0: the base model, the
    same for every seed)."""
    out: dict[int, list[list[float]]] = {}
    for cell in finished_cells(study, task, arm):
        if seeds is not None and cell.seed not in seeds:
            continue
        for row in read_jsonl(run_dir(study, cell) / "evals.jsonl"):
            out.setdefault(row["step"], []).append([float(c) for c in row["correct"]])
    base = study.out / task / "base-evals.json"
    if out and base.is_file():
        correct = [float(c) for c in json.loads(base.read_text())["correct"]]
        out[0] = [correct] * len(next(iter(out.values())))
    return out


def arm_pass_k(study: Study, task: str, arm: str) -> tuple[list[list[float]], list[list[float]]]:
    """(pass@k, sampled pass@1) seeds x items matrices over the arm's finished runs that have a
    pass@k evaluation (k samples per item, so pass@k is whether any was correct)."""
    found, single = [], []
    for cell in finished_cells(study, task, arm):
        path = eval_path(study, task, cell, sampled=True)
        if path.is_file():
            record = json.loads(path.read_text())
            found.append([float(c > 0) for c in record["correct"]])
            single.append([c / record["k"] for c in record["correct"]])
    return found, single


def diagnostics(rows: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, dict]]:
    """The credit diagnostics of an arm's metric rows (all its finished runs): each key's mean
    over steps and runs, and its mean over runs at every step (for the plot). Runs that did
    not log a key are left out of its means, and so are a step's correct (incorrect) group
    values when none of its completions was correct (incorrect): older runs logged 0.0 there."""

    def empty(row: dict[str, Any], key: str) -> bool:
        accuracy = row.get("reward/accuracy")
        return (key.endswith("_correct") and accuracy == 0) or (
            key.endswith("_incorrect") and accuracy == 1
        )

    means, curves = {}, {}
    for key in DIAGNOSTICS:
        values = [
            (r["step"], r[key])
            for r in rows
            if isinstance(r.get(key), (int, float)) and not empty(r, key)
        ]
        if values:
            means[key] = statistics.mean(v for _, v in values)
            by_step: dict[int, list[float]] = {}
            for step, v in values:
                by_step.setdefault(step, []).append(v)
            curves[key] = {step: statistics.mean(v) for step, v in sorted(by_step.items())}
    return means, curves


def run_peak_mb(rows: list[dict[str, Any]]) -> float | None:
    """The largest peak memory that runs measured for themselves. A study trains many runs in
    one process: rows scoped to the "process" (CPU outside Linux), or without a scope (logged
    before rlsd reset the peak at each run's start), may hold an earlier run's peak."""
    return max(
        (r["perf/peak_mem_mb"] for r in rows if r.get("perf/peak_mem_scope") == "run"), default=None
    )


def learning_groups(rows: list[dict[str, Any]]) -> float | None:
    """The share of prompt groups that carried a gradient, over every step of every run: a group
    whose rewards are all equal has zero advantages, so no method (GRPO or any teacher's
    per-token credit) learns from it. Rows without the key (evaluations, runs that did not log
    it) are left out."""
    shares = [1 - r["adv/zero_group_frac"] for r in rows if "adv/zero_group_frac" in r]
    return statistics.mean(shares) if shares else None


def steps_to_stay(steps: list[int], mean: list[float], target: float | None) -> int | None:
    """The first evaluation step from which the mean curve stays at or above `target` through
    the last evaluation (None when the last evaluation is below it, or there is no target).
    A curve that touches the target and falls back has not reached it: the first crossing
    would credit a lucky evaluation with a speed-up that the run does not keep."""
    if target is None:
        return None
    reach = None
    for step, m in zip(steps, mean):
        reach = (step if reach is None else reach) if m >= target else None
    return reach


def arm_summary(
    study: Study, task: str, arm: str, reference: dict[int, list[list[float]]]
) -> dict[str, Any]:
    """One arm of one task, over its finished runs: bootstrap curve, final and best accuracy,
    the final difference to the reference arm (paired over items), area under the curve, steps
    and seconds until the curve stays at the reference arm's final accuracy (`steps_to_stay`),
    speed, memory, leakage of its last evaluation, RLSD diagnostics."""
    evals = arm_evals(study, task, arm)
    curve = {step: bootstrap(m) for step, m in sorted(evals.items())}
    planned = sum(c.task == task and c.arm == arm for c in grid(study))
    runs = [run_dir(study, c) for c in finished_cells(study, task, arm)]
    last = max(reference, default=None)
    target = final_mean(reference)
    per_run = [read_jsonl(p / "metrics.jsonl") for p in runs if (p / "metrics.jsonl").is_file()]
    rows = [r for run_rows in per_run for r in run_rows]
    steps = sorted(curve)
    mean = [curve[s][0] for s in steps]
    reach = steps_to_stay(steps, mean, target)
    step_s = [r["perf/step_seconds"] for r in rows if "perf/step_seconds" in r]
    leaks = [
        leakage(c, a)
        for p in runs
        if (p / "evals.jsonl").is_file()
        for e in read_jsonl(p / "evals.jsonl")[-1:]
        for c, a in zip(e["completions"], e["answers"])
    ]

    pass_k, sampled = arm_pass_k(study, task, arm)
    diag, diag_curves = diagnostics(rows)
    best = max(steps[1:], key=lambda s: curve[s][0], default=None)  # after step 0
    return {
        "runs": len(runs),
        "planned": planned,
        "curve": {s: list(curve[s]) for s in steps},
        "final": list(curve[steps[-1]]) if steps else None,
        "best": [best, curve[best][0]] if best is not None else None,
        "vs_reference": list(bootstrap_difference(evals[steps[-1]], reference[last]))
        if steps and last is not None and steps[-1] == last and arm != study.reference_arm
        else None,  # the reference against itself is 0 (its seeds resampled twice are not)
        "auc": curve_auc(evals),
        "steps_to_target": reach,
        "seconds_to_target": statistics.mean(
            sum(r["perf/step_seconds"] for r in run_rows if r["step"] <= reach)
            for run_rows in per_run
        )
        if reach and per_run
        else None,
        "tflop_to_target": tflop_to_target(per_run, reach),
        "seconds_per_step": statistics.median(step_s) if step_s else None,
        "peak_mem_mb": run_peak_mb(rows),
        "learning_groups": learning_groups(rows),
        "leak_echo": statistics.mean(x["echo"] for x in leaks) if leaks else None,
        "leak_answer_first": statistics.mean(x["answer_first"] for x in leaks) if leaks else None,
        "pass_k": list(bootstrap(pass_k)) if pass_k else None,
        "pass_k_runs": len(pass_k),
        "sampled_pass1": list(bootstrap(sampled)) if sampled else None,
        "diagnostics": diag,
        "diagnostics_curves": diag_curves,
        "eval_items": len(evals[steps[-1]][0]) if steps else 0,
    }


def tflop_to_target(per_run: list[list[dict[str, Any]]], reach: int | None) -> float | None:
    """The runs' mean estimated training compute (TFLOP, `compute/flops`) up to the step where
    the arm's curve stays at the target; None when it never does or a run did not log it."""
    if not reach or not per_run:
        return None
    spent = [flops_to_step(rows, reach) for rows in per_run]
    return None if None in spent else statistics.mean(spent) / 1e12


def curve_auc(evals: dict[int, list[list[float]]]) -> float | None:
    """The mean accuracy over training: the area under the (trapezoid) curve of the mean
    accuracy at each evaluation step, divided by the steps it spans (None below two points)."""
    steps = sorted(evals)
    mean = [matrix_mean(evals[s]) for s in steps]
    if len(steps) < 2:
        return None
    return sum((a + b) / 2 * (t - s) for s, t, a, b in zip(steps, steps[1:], mean, mean[1:])) / (
        steps[-1] - steps[0]
    )


def ablation_summary(
    mine: dict[int, list[list[float]]],
    runs: dict[int, list[list[float]]],
    paired: dict[int, list[list[float]]],
    against: str,
) -> dict[str, Any] | None:
    """An ablation's evaluations (`mine`) against the reference arm's run at the same seed
    (`paired`: the same data order and held-out items, so the difference pairs the items): that
    run's final accuracy, AUC and curve, the final difference with its 95 % interval (items
    only), and `seed_spread`: how far apart the reference arm's own runs (`runs`, every seed)
    end, the run-to-run noise that interval leaves out. None until both have finished."""
    if not mine or not paired or max(mine) != max(paired):
        return None
    finals = [statistics.mean(run) for run in runs[max(runs)]]
    return {
        "against": against,
        "final": final_mean(paired),
        "auc": curve_auc(paired),
        "seed_spread": max(finals) - min(finals),
        "seeds": len(finals),
        "curve": {step: matrix_mean(m) for step, m in sorted(paired.items())},
        "difference": list(bootstrap_difference(mine[max(mine)], paired[max(paired)])),
    }


def training_curves(study: Study, task: str) -> None:
    """`rlsd compare` of the task's finished runs (grouped by arm) in compare-<task>/, its
    target the reference arm's final training accuracy (last 5 steps, mean over its runs)."""
    cells = finished_cells(study, task)
    if not cells:
        return
    finals = [
        final_value(load_run(run_dir(study, c)), "reward/accuracy", FINAL_WINDOW)
        for c in cells
        if c.arm == study.reference_arm
    ]
    finals = [f for f in finals if f is not None]
    write_compare(
        [run_dir(study, c) for c in cells],
        study.out / f"compare-{task}",
        statistics.mean(finals) if finals else None,
    )


def constant_answer(study: Study, task: str) -> tuple[str, float] | None:
    """The most frequent reference answer of the held-out items (ties: the first seen) and its
    share: the accuracy of a model that always gives it (the bar a real gain must clear); None
    before any evaluation."""
    for cell in finished_cells(study, task):
        path = run_dir(study, cell) / "evals.jsonl"
        if path.is_file():
            answers = read_jsonl(path)[0]["answers"]
            top, count = Counter(answers).most_common(1)[0]  # ties: the first seen
            return top, count / len(answers)
    return None


def base_accuracy(study: Study, task: str) -> dict[str, Any]:
    """The untrained model's greedy pass@1 and (with pass_k) pass@k on the task, and the
    constant-answer baseline."""
    out: dict[str, Any] = {
        "greedy": None,
        "pass_k": None,
        "constant_answer": constant_answer(study, task),
    }
    greedy, sampled = eval_path(study, task), eval_path(study, task, sampled=True)
    if greedy.is_file():
        out["greedy"] = statistics.mean(map(float, json.loads(greedy.read_text())["correct"]))
    if sampled.is_file():
        out["pass_k"] = statistics.mean(
            float(c > 0) for c in json.loads(sampled.read_text())["correct"]
        )
    return out


def summarize(study: Study) -> dict[str, Any]:
    """Per task and arm (ablations included): `arm_summary`, with the target = the reference
    arm's final accuracy. Writes summary.json, summary.md, accuracy-<task>.png,
    diagnostics-<task>.png and `rlsd compare`'s training curves (compare-<task>/) under the
    study's out dir."""
    result: dict[str, Any] = {"study": str(study.path), "tasks": {}}
    for task in study.tasks:
        reference = arm_evals(study, task, study.reference_arm)
        names = [
            *study.arms,
            *(
                study.ablations
                if study.ablation_tasks is None or task in study.ablation_tasks
                else []
            ),
        ]
        arms = {arm: arm_summary(study, task, arm, reference) for arm in names}
        base = study.ablation_reference
        if base:  # its runs read once per task, not once per ablation
            runs, paired = (
                arm_evals(study, task, base),
                arm_evals(study, task, base, study.seeds[:1]),
            )
            for arm in (a for a in names if a in study.ablations):
                arms[arm]["vs_ablation_reference"] = ablation_summary(
                    arm_evals(study, task, arm), runs, paired, f"{base}-seed{study.seeds[0]}"
                )
        result["tasks"][task] = {
            "target": final_mean(reference),
            "base": base_accuracy(study, task),
            "arms": arms,
        }
        accuracy_png(
            {arm: arms[arm] for arm in study.arms}, study.out / f"accuracy-{task}.png", task
        )
        ablations_png(arms, study.out / f"ablations-{task}.png", task)
        diagnostics_png(arms, study.out / f"diagnostics-{task}.png", task)
        training_curves(study, task)
    write_atomic(study.out / "summary.json", json.dumps(result, indent=1))
    write_atomic(study.out / "summary.md", summary_markdown(study, result))
    return result
