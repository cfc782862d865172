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
    headline_arms: [grpo, rlsd]       # run all their seeds before the ablations (default: all)
    reference_arm: grpo               # "steps to reach the reference arm's final accuracy"
    ablation_reference: rlsd          # each ablation against this arm's run at the same seed
    pass_k: 4                         # also pass@k of each finished run's final checkpoint
    pass_k_items: 256                 # on the first N held-out items (default: eval_items)

Each run is an `rlsd train` run directory, so a finished run is skipped and an interrupted one
resumes from its checkpoint: a long study can be run in pieces. The base model is evaluated
once per task (step 0). With `pass_k`, each finished run's final checkpoint (and the base model)
also gets k samples per item at the recipe's rollout temperature, drawn after
`torch.manual_seed(0)` (the same random stream for every arm): `<run>/passk.json`. The summary
(`rlsd.report.study`) reads only finished runs.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..engine.runfiles import read_jsonl, write_atomic
from ..schema.config import ConfigError
from ..step.tracking import quiet_libraries


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
    ablation_reference: str | None = None  # the arm each ablation is compared with, same seed
    ablation_tasks: list[str] | None = None  # tasks the ablations run on (None: all)
    headline_arms: list[str] | None = None  # arms whose later seeds come first (None: all)
    pass_k: int = 0  # k samples per item for the final pass@k (0: greedy evaluation only)
    pass_k_items: int = 0  # held-out items of the pass@k evaluation (0: eval_items)


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
    for key in ("steps", "eval_every", "eval_items"):  # the summary is held-out accuracy
        if not isinstance(raw[key], int) or raw[key] < 1:
            raise ConfigError(f"{path}: {key}: {raw[key]!r} (a whole number >= 1)")
    if raw["eval_every"] > raw["steps"]:
        raise ConfigError(
            f"{path}: eval_every: {raw['eval_every']} is more than steps "
            f"({raw['steps']}); no run would be evaluated"
        )
    if raw.get("pass_k", 0) == 1 or raw.get("pass_k", 0) < 0:
        raise ConfigError(f"{path}: pass_k: {raw['pass_k']} (0 for none, or k >= 2 samples)")
    study = Study(path=Path(path), **{**raw, "out": Path(raw["out"])})
    for key, known in (("ablation_tasks", study.tasks), ("headline_arms", study.arms)):
        unknown = sorted(set(getattr(study, key) or []) - set(known))
        if unknown:
            raise ConfigError(
                f"{path}: {key}: {unknown[0]!r} is not in "
                f"{'tasks' if key == 'ablation_tasks' else 'arms'}"
            )
    for key, arm in (
        ("reference_arm", study.reference_arm),
        ("ablation_reference", study.ablation_reference or study.reference_arm),
    ):
        if arm not in study.arms:
            raise ConfigError(f"{path}: {key}: {arm!r} is not in arms")
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
    they run, so that a study stopped early has answered the most: the first seed of every
    task and arm, then the headline arms' later seeds, the ablations, the other arms' later
    seeds; seed by seed within each (every task and arm at one seed, then the next)."""
    cells = []
    for task, task_over in study.tasks.items():
        arms = [(a, o, study.seeds) for a, o in study.arms.items()]
        if study.ablation_tasks is None or task in study.ablation_tasks:
            arms += [(a, o, study.seeds[:1]) for a, o in study.ablations.items()]
        for arm, arm_over, seeds in arms:
            for seed in seeds:
                over = {
                    **task_over,
                    **arm_over,
                    "train.seed": seed,
                    "train.steps": study.steps,
                    "train.eval_every": study.eval_every,
                    "train.eval_items": study.eval_items,
                    "output.dir": str(study.out / task),
                    "output.run_name": f"{arm}-seed{seed}",
                    "output.report": False,
                }
                cells.append(Cell(task, arm, seed, {k: _text(v) for k, v in over.items()}))
    order = {name: i for i, name in enumerate([*study.tasks, *study.arms, *study.ablations])}
    headline = study.arms if study.headline_arms is None else study.headline_arms

    def tier(cell: Cell) -> int:
        if cell.arm not in study.arms:
            return 1  # an ablation
        return 0 if cell.seed == study.seeds[0] or cell.arm in headline else 2

    return sorted(cells, key=lambda c: (tier(c), c.seed, order[c.task], order[c.arm]))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def run_dir(study: Study, cell: Cell) -> Path:
    return study.out / cell.task / cell.name


def finished(study: Study, cell: Cell) -> bool:
    path = run_dir(study, cell) / "metrics.jsonl"
    return path.is_file() and any(r["step"] >= study.steps for r in read_jsonl(path))


def measured(study: Study, key: str, default: float, cells: list[Cell] | None = None) -> float:
    """The median of a metric over the study's runs so far, or over the runs of `cells` (the
    default before any)."""
    paths = (
        study.out.glob("*/*/metrics.jsonl")
        if cells is None
        else [run_dir(study, c) / "metrics.jsonl" for c in cells]
    )
    values = [r[key] for p in paths if p.is_file() for r in read_jsonl(p) if key in r]
    return statistics.median(values) if values else default


def seconds_left(study: Study, cells: list[Cell]) -> tuple[float, float, float]:
    """Estimated seconds of training and held-out evaluation left, and of pass@k evaluation
    left: each run at the median step time of the runs of its task and algorithm (of all runs
    before those have run, 15 s before any), evaluations at their median time so far; a pass@k
    evaluation at its measured median, or as many greedy evaluations as it samples sequences."""

    def kind(c: Cell) -> tuple[str, str | None]:
        return c.task, c.overrides.get("algorithm.name")

    overall = measured(study, "perf/step_seconds", 15.0)
    per_eval = measured(study, "eval/seconds", study.eval_items * 0.4)  # ~0.4 s a greedy item
    items = study.pass_k_items or study.eval_items
    timed = [json.loads(p.read_text()).get("seconds") for p in study.out.glob("*/*/passk.json")]
    per_pass_k = statistics.median(
        [t for t in timed if t] or [per_eval * study.pass_k * items / study.eval_items]
    )
    per_step: dict[tuple[str, str | None], float] = {}
    train = pass_k = 0.0
    for cell in cells:
        if kind(cell) not in per_step:
            per_step[kind(cell)] = measured(
                study, "perf/step_seconds", overall, [c for c in cells if kind(c) == kind(cell)]
            )
        path = run_dir(study, cell) / "metrics.jsonl"
        done = max((r["step"] for r in read_jsonl(path)), default=0) if path.is_file() else 0
        evals = (
            study.steps // study.eval_every - done // study.eval_every if study.eval_every else 0
        )
        if done < study.steps:
            train += (study.steps - done) * per_step[kind(cell)] + evals * per_eval
        if study.pass_k and not eval_path(study, cell.task, cell, True).is_file():
            pass_k += per_pass_k
    return train, pass_k, per_eval


def describe(study: Study) -> str:
    """The grid, what is done, and the estimated time of the rest (`--dry-run`), from the
    step, evaluation and pass@k times measured so far."""
    cells = grid(study)
    todo = [c for c in cells if not finished(study, c)]
    lines = [
        f"base recipe: {Path(study.base).resolve()} (paths in the study file are read from the "
        "current directory)",
        f"{len(cells)} runs ({len(cells) - len(todo)} finished), {study.steps} steps each, "
        f"held-out eval of {study.eval_items} items every {study.eval_every} steps",
    ]
    lines += [f"  {'done' if c not in todo else 'todo'}  {c.task}/{c.name}" for c in cells]
    train, pass_k, per_eval = seconds_left(study, cells)
    lines.append(
        f"estimated time left: {(train + pass_k) / 3600:.1f} h ({train / 3600:.1f} h of "
        f"training at each task and algorithm's median s/step and {per_eval:.0f} s an "
        "evaluation" + (f", {pass_k / 3600:.1f} h of pass@{study.pass_k})" if study.pass_k else ")")
    )
    if study.pass_k:
        missing = [c for c in cells if not eval_path(study, c.task, c, True).is_file()]
        lines.append(
            f"pass@{study.pass_k} of the final checkpoints on "
            f"{study.pass_k_items or study.eval_items} items: {len(missing)} to do"
        )
    return "\n".join(lines)


def run_study(study: Study, jobs: int = 1) -> list[Path]:
    """Train every run not finished yet (resuming interrupted ones), then its pass@k when the
    study asks for it; returns the run dirs. Every run's config is checked before the first
    one starts. With `jobs` > 1, that many runs train at once, each in its own process (on one
    GPU, small models leave most of it idle; on a CPU they share the cores)."""
    from ..schema.config import load_config

    cells = grid(study)
    todo = [c for c in cells if not finished(study, c)]
    configs = [load_config(study.base, c.overrides) for c in todo]  # fail before any run
    for task in study.tasks:
        evaluate_model(study, task)
        if study.pass_k:
            evaluate_model(study, task, sampled=True)
    if jobs > 1 and len(todo) > 1:
        run_parallel(study, todo, configs, jobs)
    for cell in cells:
        run_cell(study, cell)  # the runs done in parallel are finished: this only checks them
    return [run_dir(study, c) for c in cells]


def run_cell(study: Study, cell: Cell, extra: dict[str, str] | None = None) -> None:
    """One run of the grid: train it unless finished, then its pass@k (both skip done work)."""
    from ..schema.config import load_config
    from ..step.trainer import train

    if not finished(study, cell):
        train(load_config(study.base, {**cell.overrides, **(extra or {})}))
    if study.pass_k:
        evaluate_model(study, cell.task, cell, sampled=True)


class StudyRunFailed(RuntimeError):
    """A run of a parallel study failed (its own error is printed above this one)."""


def run_parallel(study: Study, cells: list[Cell], configs: list[Any], jobs: int) -> None:
    """Run `cells` `jobs` at a time, each in a fresh process (its own seed, memory peak and
    CUDA context). A run whose recipe leaves model.threads at 0 gets its share of the CPU
    cores; progress bars are off (they would interleave). A failed run stops new ones from
    starting; the running ones finish, then the failure is raised. SIGINT or SIGTERM is
    passed on to every run, which writes its checkpoint (TrainingStopped): rerun to resume."""
    import multiprocessing
    import multiprocessing.connection
    import os
    import signal

    from ..engine.models import resolve_model_path
    from ..step.trainer import TrainingStopped

    for name in {cfg.model.name for cfg in configs}:
        resolve_model_path(name)  # convert and cache the model once, not in racing runs
    share = str(max(1, (os.cpu_count() or 1) // jobs))
    queue = [
        (
            cell,
            {
                "output.progress": "false",
                **({"model.threads": share} if not cfg.model.threads else {}),
            },
        )
        for cell, cfg in zip(cells, configs)
    ]
    context = multiprocessing.get_context("spawn")
    running: dict[int, tuple[Any, Cell]] = {}  # process sentinel -> (process, cell)
    failed: list[tuple[Cell, int]] = []
    signals: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        signals.append(signum)
        for process, _ in running.values():
            os.kill(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while queue or running:
            while queue and len(running) < jobs and not (failed or signals):
                cell, extra = queue.pop(0)
                process = context.Process(
                    target=_child, args=(study, cell, extra), name=f"{cell.task}/{cell.name}"
                )
                process.start()
                running[process.sentinel] = (process, cell)
            if not running:
                break
            for sentinel in multiprocessing.connection.wait(list(running)):
                process, cell = running.pop(sentinel)
                process.join()
                if process.exitcode:
                    failed.append((cell, process.exitcode))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    names = ", ".join(f"{c.task}/{c.name}" for c, _ in failed)
    if signals:
        raise TrainingStopped(
            f"stopped by signal {signal.Signals(signals[0]).name}"
            + (f" ({names} wrote their checkpoints)" if names else ""),
            128 + signals[0],
        )
    if failed:
        raise StudyRunFailed(
            f"{names}: failed (exit code {failed[0][1]}, its error is above); "
            f"the runs already started finished and {len(queue)} did not start"
        )


def _child(study: Study, cell: Cell, extra: dict[str, str]) -> None:
    """One run in its own process: exits with TrainingStopped's code after its message."""
    import sys

    from ..step.trainer import TrainingStopped

    quiet_libraries(False)
    try:
        run_cell(study, cell, extra)
    except TrainingStopped as stop:
        print(f"rlsd: {cell.task}/{cell.name}: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)


def eval_path(study: Study, task: str, cell: Cell | None = None, sampled: bool = False) -> Path:
    """Where an evaluation outside training lives: the base model's greedy one
    (<task>/base-evals.json) and pass@k ones (<task>/base-passk.json, <run>/passk.json)."""
    if cell is None:
        return study.out / task / ("base-passk.json" if sampled else "base-evals.json")
    return run_dir(study, cell) / "passk.json"


def evaluate_model(
    study: Study, task: str, cell: Cell | None = None, sampled: bool = False
) -> Path | None:
    """Once: the base model (cell None) or a finished run's final checkpoint on the task's
    held-out items, greedy (the base model's step 0) or `pass_k` samples per item. Writes each
    item's correct completions; returns the file, or None for a run without a checkpoint here
    (its checkpoints are not committed: rerun it to get its pass@k)."""
    out = eval_path(study, task, cell, sampled)
    if out.is_file():
        return out
    import torch

    from ..engine.checkpoint import latest_checkpoint
    from ..engine.models import pick_device, stop_token_ids
    from ..schema.config import load_config
    from ..step.evaluate import eval_items, evaluate, load_for_eval

    if cell is not None and latest_checkpoint(run_dir(study, cell)) is None:
        print(f"{run_dir(study, cell)}: no checkpoint here, so no pass@{study.pass_k}")
        return None
    first = next(c for c in grid(study) if c.task == task)
    cfg = load_config(study.base, (cell or first).overrides)
    device = pick_device(cfg.model)
    target = cfg.model.name if cell is None else str(run_dir(study, cell))
    lm, tokenizer, _ = load_for_eval(target, cfg, device)
    k = study.pass_k if sampled else 1
    items = eval_items(cfg, study.eval_items)[0]
    if sampled and study.pass_k_items:
        items = items[: study.pass_k_items]
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        result = evaluate(
            cfg,
            lm,
            tokenizer,
            items,
            stop_token_ids(lm, tokenizer),
            device,
            k=k,
            greedy=not sampled,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    record = (
        {"step": 0, "correct": [i["correct"][0] for i in result["items"]]}
        if not sampled
        else {
            "k": k,
            "temperature": cfg.rollout.temperature,
            "correct": [sum(i["correct"]) for i in result["items"]],
            "majority_correct": [i["majority_correct"] for i in result["items"]],
            "seconds": time.perf_counter() - start,
        }
    )
    write_atomic(out, json.dumps(record))  # a study killed here reruns this evaluation
    return out
