"""`rlsd study STUDY.yaml`: a grid of ordinary training runs (tasks x arms x seeds, plus
ablations) with held-out evaluation, run resumably, and a summary with bootstrap intervals.

A study file names a base recipe and what varies:

    base: configs/quickstart.yaml     # every run starts from this recipe
    out: runs/study                   # run directories: <out>/<task>/<arm>-seed<seed>
    steps: 40                         # train.steps of every run
    eval_every: 10                    # train.eval_every (greedy held-out pass@1, per item)
    eval_items: 512                   # train.eval_items
    seeds: [0, 1, 2]
    tasks: {arith: {data.task: basic_arithmetic}}
    arms: {grpo: {algorithm.name: grpo}, rlsd: {algorithm.name: rlsd}}
    ablations: {rlsd-lambda1: {algorithm.name: rlsd, rlsd.lambda: 1.0}}   # first seed only
    ablation_tasks: [arith]           # the tasks ablations run on (default: all)
    reference_arm: grpo               # "steps to reach the reference arm's final accuracy"

Each run is an `rlsd train` run directory, so a finished run is skipped and an interrupted one
resumes from its checkpoint: a long study can be run in pieces. Intervals are 95 % percentile
bootstraps that resample seeds and held-out items together.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError
from .tracking import read_jsonl

OPENER = re.compile(r"^(the\s+)?(final\s+)?answer(\s+is)?\s*[:=]?\s*", re.IGNORECASE)
# the teacher template's own words, absent from the student's prompt: a completion using them
# (down to OPSD's collapse into "solution solution ...") behaves as if it had seen that prompt
ECHO = re.compile(r"\b(reference|solution)s?\b|in your own way", re.IGNORECASE)


@dataclass
class Study:
    path: Path
    base: str
    out: Path
    steps: int
    eval_every: int
    eval_items: int
    seeds: list[int]
    tasks: dict[str, dict[str, Any]]
    arms: dict[str, dict[str, Any]]
    ablations: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference_arm: str = "grpo"
    ablation_tasks: list[str] | None = None  # tasks the ablations run on (None: all)


def load_study(path: Path) -> Study:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the study file: {exc}") from None
    known = set(Study.__dataclass_fields__) - {"path"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown study key {unknown[0]!r} (known: {sorted(known)})")
    for key in ("base", "out", "steps", "eval_every", "eval_items", "seeds", "tasks", "arms"):
        if key not in raw:
            raise ConfigError(f"{path}: {key}: required")
    study = Study(path=Path(path), **{**raw, "out": Path(raw["out"])})
    unknown = sorted(set(study.ablation_tasks or []) - set(study.tasks))
    if unknown:
        raise ConfigError(f"{path}: ablation_tasks: {unknown[0]!r} is not in tasks")
    if study.reference_arm not in study.arms:
        raise ConfigError(f"{path}: reference_arm: {study.reference_arm!r} is not in arms")
    return study


@dataclass
class Cell:
    task: str
    arm: str
    seed: int
    overrides: dict[str, str]

    @property
    def name(self) -> str:
        return f"{self.arm}-seed{self.seed}"


def grid(study: Study) -> list[Cell]:
    """Every run of the study: tasks x (arms x seeds + ablations x first seed), in the order
    they run: seed by seed (every task and arm at the first seed, then the next seed), the
    ablations last, so a study stopped early still compares every arm on every task."""
    cells = []
    for task, task_over in study.tasks.items():
        arms = [(a, o, study.seeds) for a, o in study.arms.items()]
        if study.ablation_tasks is None or task in study.ablation_tasks:
            arms += [(a, o, study.seeds[:1]) for a, o in study.ablations.items()]
        for arm, arm_over, seeds in arms:
            for seed in seeds:
                over = {**task_over, **arm_over, "train.seed": seed,
                        "train.steps": study.steps, "train.eval_every": study.eval_every,
                        "train.eval_items": study.eval_items,
                        "output.dir": str(study.out / task), "output.run_name": f"{arm}-seed{seed}",
                        "output.report": False}
                cells.append(Cell(task, arm, seed, {k: _text(v) for k, v in over.items()}))
    order = {name: i for i, name in enumerate([*study.tasks, *study.arms, *study.ablations])}
    return sorted(cells, key=lambda c: (c.arm not in study.arms, c.seed, order[c.task],
                                        order[c.arm]))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def run_dir(study: Study, cell: Cell) -> Path:
    return study.out / cell.task / cell.name


def finished(study: Study, cell: Cell) -> bool:
    path = run_dir(study, cell) / "metrics.jsonl"
    return path.is_file() and any(r["step"] >= study.steps for r in read_jsonl(path))


def seconds_per_step(study: Study, default: float = 15.0) -> float:
    """The median step time of the study's runs so far (the default before any)."""
    times = [r["perf/step_seconds"] for p in study.out.glob("*/*/metrics.jsonl")
             for r in read_jsonl(p) if "perf/step_seconds" in r]
    return statistics.median(times) if times else default


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


def bootstrap(matrix: list[list[float]], samples: int = 2000, seed: int = 0
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


def bootstrap_difference(a: list[list[float]], b: list[list[float]], samples: int = 2000,
                         seed: int = 0) -> tuple[float, float, float]:
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
    template's own words ("reference", "solution", "in your own way"); `answer_first`: it opens with
    the reference answer (optionally after "the answer is") and only then works it out."""
    lines = [x.strip() for x in completion.strip().splitlines() if x.strip()]
    first = OPENER.sub("", lines[0]) if lines else ""
    opens = bool(answer) and re.match(rf"{re.escape(answer)}(?![\w]|\.\d)", first) is not None
    return {"echo": bool(ECHO.search(completion)), "answer_first": opens and len(lines) > 1}


def describe(study: Study) -> str:
    """The grid, what is done, and the estimated time of the rest (`--dry-run`)."""
    cells = grid(study)
    todo = [c for c in cells if not finished(study, c)]
    per_step = seconds_per_step(study)
    evals = study.steps // study.eval_every if study.eval_every else 0
    per_run = study.steps * per_step + evals * study.eval_items * 0.25  # ~0.25 s per greedy item
    lines = [f"{len(cells)} runs ({len(cells) - len(todo)} finished), {study.steps} steps each, "
             f"held-out eval of {study.eval_items} items every {study.eval_every} steps"]
    lines += [f"  {'done' if c not in todo else 'todo'}  {c.task}/{c.name}" for c in cells]
    lines.append(f"estimated time left: {len(todo) * per_run / 3600:.1f} h at {per_step:.1f} s/step")
    return "\n".join(lines)


def run_study(study: Study) -> list[Path]:
    """Train every run not finished yet (resuming interrupted ones); returns the run dirs."""
    from .config import load_config
    from .trainer import train

    done = []
    for task in study.tasks:
        evaluate_base(study, task)
    for cell in grid(study):
        if not finished(study, cell):
            train(load_config(study.base, cell.overrides))
        done.append(run_dir(study, cell))
    return done


def evaluate_base(study: Study, task: str) -> Path:
    """The untrained model's greedy accuracy on the task's held-out items (step 0), once."""
    out = study.out / task / "base-evals.json"
    if out.is_file():
        return out
    import torch

    from .config import load_config
    from .evaluate import eval_items, evaluate, load_for_eval
    from .models import pick_device, stop_token_ids

    cell = next(c for c in grid(study) if c.task == task)
    cfg = load_config(study.base, cell.overrides)
    device = pick_device(cfg.model)
    lm, tokenizer, _ = load_for_eval(cfg.model.name, cfg, device)
    items = eval_items(cfg, study.eval_items)[0]
    with torch.no_grad():
        result = evaluate(cfg, lm, tokenizer, items, stop_token_ids(lm, tokenizer), device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"step": 0, "correct": [i["correct"][0] for i in result["items"]]}))
    return out


def arm_evals(study: Study, task: str, arm: str) -> dict[int, list[list[float]]]:
    """eval step -> seeds x items matrix of greedy correctness over the arm's finished runs
    (a run still in progress is left out; step 0: the base model, the same for every seed)."""
    out: dict[int, list[list[float]]] = {}
    for cell in grid(study):
        path = run_dir(study, cell) / "evals.jsonl"
        if cell.task == task and cell.arm == arm and finished(study, cell):
            for row in read_jsonl(path):
                out.setdefault(row["step"], []).append([float(c) for c in row["correct"]])
    base = study.out / task / "base-evals.json"
    if out and base.is_file():
        correct = [float(c) for c in json.loads(base.read_text())["correct"]]
        out[0] = [correct] * len(next(iter(out.values())))
    return out


def arm_summary(study: Study, task: str, arm: str, reference: dict[int, list[list[float]]]
                ) -> dict[str, Any]:
    """One arm of one task, over its finished runs: bootstrap curve, final and best accuracy,
    the final difference to the reference arm (paired over items), area under the curve, steps
    and seconds to the reference arm's final accuracy, speed, memory, leakage of its last
    evaluation, RLSD diagnostics."""
    evals = arm_evals(study, task, arm)
    curve = {step: bootstrap(m) for step, m in sorted(evals.items())}
    cells = [c for c in grid(study) if c.task == task and c.arm == arm]
    runs = [run_dir(study, c) for c in cells if finished(study, c)]
    last = max(reference, default=None)
    target = final_mean(reference)
    per_run = [read_jsonl(p / "metrics.jsonl") for p in runs if (p / "metrics.jsonl").is_file()]
    rows = [r for run_rows in per_run for r in run_rows]
    steps = sorted(curve)
    mean = [curve[s][0] for s in steps]
    reach = next((s for s, m in zip(steps, mean) if target is not None and m >= target), None)
    step_s = [r["perf/step_seconds"] for r in rows if "perf/step_seconds" in r]
    leaks = [leakage(c, a) for p in runs if (p / "evals.jsonl").is_file()
             for e in read_jsonl(p / "evals.jsonl")[-1:]
             for c, a in zip(e["completions"], e["answers"])]

    def mean_of(key: str) -> float | None:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return statistics.mean(values) if values else None

    best = max(steps[1:], key=lambda s: curve[s][0], default=None)  # after step 0
    return {
        "runs": len(runs), "planned": len(cells), "curve": {s: list(curve[s]) for s in steps},
        "final": list(curve[steps[-1]]) if steps else None,
        "best": [best, curve[best][0]] if best is not None else None,
        "vs_reference": list(bootstrap_difference(evals[steps[-1]], reference[last]))
        if steps and last is not None and steps[-1] == last else None,
        "auc": (sum((a + b) / 2 * (t - s) for s, t, a, b in zip(steps, steps[1:], mean, mean[1:]))
                / (steps[-1] - steps[0])) if len(steps) > 1 else None,
        "steps_to_target": reach,
        "seconds_to_target": statistics.mean(
            sum(r["perf/step_seconds"] for r in run_rows if r["step"] <= reach)
            for run_rows in per_run) if reach and per_run else None,
        "seconds_per_step": statistics.median(step_s) if step_s else None,
        "peak_mem_mb": max((r.get("perf/peak_mem_mb", 0) for r in rows), default=None),
        "leak_echo": statistics.mean(x["echo"] for x in leaks) if leaks else None,
        "leak_answer_first": statistics.mean(x["answer_first"] for x in leaks) if leaks else None,
        "diagnostics": {k: mean_of(k) for k in ("rlsd/delta_mean_correct",
                                                "rlsd/delta_mean_incorrect", "rlsd/clip_low_frac",
                                                "rlsd/clip_high_frac", "teacher/kl")},
        "eval_items": len(evals[steps[-1]][0]) if steps else 0,
    }


def summarize(study: Study) -> dict[str, Any]:
    """Per task and arm (ablations included): `arm_summary`, with the target = the reference
    arm's final accuracy. Writes summary.json, summary.md and accuracy-<task>.png under the
    study's out dir."""
    result: dict[str, Any] = {"study": str(study.path), "tasks": {}}
    for task in study.tasks:
        reference = arm_evals(study, task, study.reference_arm)
        names = [*study.arms, *(study.ablations if study.ablation_tasks is None
                                or task in study.ablation_tasks else [])]
        arms = {arm: arm_summary(study, task, arm, reference) for arm in names}
        result["tasks"][task] = {"target": final_mean(reference), "arms": arms}
        accuracy_png(arms, study.out / f"accuracy-{task}.png", task)
    (study.out / "summary.json").write_text(json.dumps(result, indent=1))
    (study.out / "summary.md").write_text(summary_markdown(study, result))
    return result


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _diff(value: list[float] | None) -> str:
    return "-" if value is None else (f"{100 * value[0]:+.1f} [{100 * value[1]:+.1f}, "
                                      f"{100 * value[2]:+.1f}]")


def summary_row(arm: str, a: dict[str, Any]) -> str:
    final = (f"{_pct(a['final'][0])} [{_pct(a['final'][1])}, {_pct(a['final'][2])}]"
             if a["final"] else "-")
    best = f"{_pct(a['best'][1])} ({a['best'][0]})" if a["best"] else "-"
    cells = [arm, f"{a['runs']}/{a['planned']}", final, _diff(a["vs_reference"]), best,
             _pct(a["auc"]), "-" if a["steps_to_target"] is None else str(a["steps_to_target"]),
             "-" if a["seconds_to_target"] is None else str(round(a["seconds_to_target"])),
             "-" if a["seconds_per_step"] is None else str(round(a["seconds_per_step"], 1)),
             "-" if not a["peak_mem_mb"] else str(round(a["peak_mem_mb"])),
             _pct(a["leak_echo"]), _pct(a["leak_answer_first"])]
    return "| " + " | ".join(cells) + " |"


def summary_markdown(study: Study, result: dict[str, Any]) -> str:
    lines = [f"# Study `{study.path}`", "",
             "Finished runs only. Held-out greedy pass@1 (%) on the same "
             f"{study.eval_items} items for every arm, with 95 % bootstrap intervals over seeds "
             f"and items; *vs {study.reference_arm}*: the final difference in points, items "
             "resampled in pairs; *best*: the highest evaluation after step 0 and its step (an "
             "optimistic pick); *target*: the "
             f"{study.reference_arm} arm's final accuracy; echo / answer-first: the leakage "
             "check on the last evaluation's completions.", ""]
    for task, part in result["tasks"].items():
        lines += [f"## {task}", "", f"![accuracy](accuracy-{task}.png)", "",
                  f"Target: {_pct(part['target'])} %.", "",
                  f"| arm | runs | final pass@1 [95 % CI] | vs {study.reference_arm} | best (step) "
                  "| AUC | steps to target | s to target | s/step | peak MB | echo % | "
                  "answer-first % |", "|" + "---|" * 12]
        lines += [summary_row(arm, a) for arm, a in part["arms"].items()]
        lines.append("")
    return "\n".join(lines) + "\n"


def accuracy_png(arms: dict[str, dict], out: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for arm, a in arms.items():
        steps = [int(s) for s in a["curve"]]
        if not steps:
            continue
        mean, low, high = zip(*(a["curve"][s] for s in a["curve"]))
        line, = ax.plot(steps, mean, marker="o", label=f"{arm} (n={a['runs']})")
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
    ax.set(title=f"{task}: held-out greedy pass@1 (95 % bootstrap)", xlabel="step",
           ylabel="pass@1")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
