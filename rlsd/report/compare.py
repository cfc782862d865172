"""`rlsd compare RUN_DIR...`: several runs side by side (curves, a table): PNG, Markdown, HTML.

Runs whose configs differ only in seeds (and output paths) form one group, drawn as the mean
across its runs with a min-max band. Runs may have different lengths, and a metric that some runs
never logged is simply absent from their group (its table cell reads "-").

A group's label is short: its method, then only the config keys in which it differs from the
value most groups share, abbreviated (`rlsd · G=4 · B=8`); the full keys and values are listed
under the table, the abbreviations under the figure. One legend below the panels, never over a
curve. The default target accuracy is 0.9 x the best group's final training accuracy, stated in
the table and drawn on the training-accuracy panel. Held-out pass@1 comes from the run
directory: `rlsd eval RUN_DIR` results (eval-*.json) and training's evaluations (evals.jsonl,
else metrics.jsonl), whichever is later; the table says which.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.compute import flops_to_step
from ..engine.runfiles import read_jsonl
from ..schema.config import ConfigError, load_config, to_dict
from ..step.tracking import flat_config
from .evals import checkpoint_evals, latest_held_out, training_evals
from .plots import is_raw, label_panel, moving_average, panel_grid

PANELS = [  # (title, metric)
    ("training accuracy", "reward/accuracy"),
    ("held-out accuracy", "eval/pass@1"),
    ("mean reward", "reward/mean"),
    ("completion length (tokens)", "completion/length_mean"),
    ("seconds per step", "perf/step_seconds"),
    ("peak memory (MB)", "perf/peak_mem_mb"),
]
IGNORED = ("train.seed", "data.seed", "output.")  # keys that do not make a run a different method
FINAL_WINDOW = 5  # steps averaged for "final accuracy"
TARGET_SHARE = 0.9  # default target: this share of the best group's final training accuracy
MAX_LABEL = 44  # characters of a group label before it is cut (the full key is listed)
ABBREVIATIONS = {  # config key -> its name in a group label
    "rollout.num_generations": "G",
    "train.prompts_per_step": "B",
    "rollout.max_new_tokens": "T",
    "rollout.temperature": "temp",
    "train.lr": "lr",
    "train.steps": "steps",
    "rlsd.lambda": "λ",
    "rlsd.lambda_decay_steps": "λ decay",
    "rlsd.eps_w": "ε_w",
    "teacher.mode": "teacher",
    "teacher.sync_every": "sync",
    "data.teacher_template": "template",
    "algorithm.kl_coef": "KL",
    "model.lora_r": "LoRA r",
}


@dataclass
class RunData:
    path: Path
    config: dict[str, str]  # dotted key -> value, flattened from the saved config
    rows: list[dict]
    evals: list[dict] = field(default_factory=list)  # `rlsd eval` results, oldest first

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        points = [
            (r["step"], float(r[metric]))
            for r in self.rows
            if isinstance(r.get(metric), (int, float)) and not isinstance(r[metric], bool)
        ]
        return ([s for s, _ in points], [v for _, v in points]) if points else ([], [])


@dataclass
class Group:
    label: str  # short: the method and what differs from most groups, abbreviated
    runs: list[RunData]
    key: dict[str, str]  # every config key that differs between groups -> this group's value
    common: dict[str, str]  # those keys' values shared by most groups (not in the label)


def load_run(path: Path) -> RunData:
    if not (path / "config.yaml").is_file() or not (path / "metrics.jsonl").is_file():
        raise ConfigError(f"{path}: not a run directory (no config.yaml and metrics.jsonl)")
    rows = read_jsonl(path / "metrics.jsonl")
    if not rows:
        raise ConfigError(f"{path}/metrics.jsonl: no steps logged yet")
    config = flat_config(to_dict(load_config(path / "config.yaml", saved=True)))
    config = {key: str(value) for key, value in config.items()}
    return RunData(path, config, rows, checkpoint_evals(path))


def held_out(run: RunData) -> tuple[float, str] | None:
    """(pass@1, where it comes from) of the run's latest held-out evaluation."""
    return latest_held_out(run.evals, training_evals(run.path, run.rows))


def short_name(key: str, keys: list[str]) -> str:
    if key in ABBREVIATIONS:
        return ABBREVIATIONS[key]
    last = key.split(".")[-1]
    return last if sum(k.split(".")[-1] == last for k in keys) == 1 else key


def common_values(keys: list[dict[str, str]]) -> dict[str, str]:
    """Per differing key, the value that more configs share than any other (and at least two);
    keys without one are left out."""
    common = {}
    for name in sorted({k for key in keys for k in key}):
        counts = Counter(key.get(name) for key in keys).most_common()
        (value, count), *others = counts
        if value is not None and count >= 2 and (not others or count > others[0][1]):
            common[name] = value
    return common


def group_labels(keys: list[dict[str, str]], common: dict[str, str]) -> list[str]:
    """Short, distinct labels for configs (dotted key -> value, only the keys that differ): the
    method, then each key whose value is not the common one, abbreviated (`G=4`); a long value
    is named by its number among the key's values (`template #2`)."""
    names = sorted({k for key in keys for k in key})
    numbered = {name: list(dict.fromkeys(key.get(name) for key in keys)) for name in names}
    labels: list[str] = []
    for key in keys:
        parts = [key["algorithm.name"]] if "algorithm.name" in key else []
        for name in names:
            value = key.get(name)
            if name == "algorithm.name" or (name in common and value == common[name]):
                continue
            if value is None or len(value) > 12 or "\n" in value:
                value = f" #{numbered[name].index(value) + 1}"
            else:
                value = f"={value}"
            parts.append(f"{short_name(name, names)}{value}".replace("|", "/"))
        label = " · ".join(parts) or "run"
        if len(label) > MAX_LABEL:
            label = label[: MAX_LABEL - 1].rstrip(" ·") + "…"
        while label in labels:  # only after a cut: make it distinct
            label += "'"
        labels.append(label)
    return labels


def group_runs(runs: list[RunData]) -> dict[str, Group]:
    """Runs grouped by their config minus seeds and outputs, each group under its short label
    (in the order of each group's first run)."""
    grouped: dict[tuple, list[RunData]] = {}
    for run in runs:
        key = tuple(sorted((k, v) for k, v in run.config.items() if not k.startswith(IGNORED)))
        grouped.setdefault(key, []).append(run)
    configs = [dict(key) for key in grouped]
    differing = {k for c in configs for k, v in c.items() if any(o.get(k) != v for o in configs)}
    differing = sorted(differing | {"algorithm.name"})  # a label always names the method
    keys = [{k: c[k] for k in differing if k in c} for c in configs]
    common = common_values(keys)
    return {
        label: Group(label, members, key, common)
        for label, members, key in zip(group_labels(keys, common), grouped.values(), keys)
    }


def band(
    runs: list[RunData], metric: str, smooth: int = FINAL_WINDOW
) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, low, high) across runs of the (moving-averaged) metric; a step counts the
    runs that reached it, so runs of different lengths are fine."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        steps, values = run.series(metric)
        for step, value in zip(steps, moving_average(values, smooth) if smooth > 1 else values):
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return (
        steps,
        [sum(by_step[s]) / len(by_step[s]) for s in steps],
        [min(by_step[s]) for s in steps],
        [max(by_step[s]) for s in steps],
    )


def final_value(run: RunData, metric: str, window: int) -> float | None:
    _, values = run.series(metric)
    tail = values[-window:]
    return sum(tail) / len(tail) if tail else None


def time_to_target(
    run: RunData, target: float, metric: str = "reward/accuracy"
) -> tuple[int, float] | None:
    """(first step whose moving average reaches target, seconds of steps up to it), or None."""
    steps, values = run.series(metric)
    seconds = dict(zip(*run.series("perf/step_seconds")))
    for step, value in zip(steps, moving_average(values, FINAL_WINDOW)):
        if value >= target - 1e-12:
            return step, sum(v for s, v in seconds.items() if s <= step)
    return None


def mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def final_accuracies(groups: dict[str, Group]) -> dict[str, tuple[float, float] | None]:
    """Each group's final training accuracy (last FINAL_WINDOW steps), mean and std over runs."""
    return {
        label: mean_std(
            [
                v
                for r in g.runs
                if (v := final_value(r, "reward/accuracy", FINAL_WINDOW)) is not None
            ]
        )
        for label, g in groups.items()
    }


def default_target(groups: dict[str, Group]) -> tuple[float | None, str]:
    """(TARGET_SHARE x the best group's final training accuracy, the rule in words); None when no
    group's final accuracy is above 0 (nothing to time)."""
    finals = {label: f[0] for label, f in final_accuracies(groups).items() if f}
    if not finals or max(finals.values()) <= 0:
        return None, "no group's final training accuracy is above 0"
    best = max(finals, key=finals.get)
    return (
        TARGET_SHARE * finals[best],
        f"{TARGET_SHARE:g} × {finals[best]:.3f}, the best group's final training accuracy ({best})",
    )


def summary(groups: dict[str, Group], target: float | None) -> tuple[list[dict], float | None, str]:
    """One row per group, the target accuracy and its rule in words. target None = the default
    (`default_target`)."""
    rule = "the given target"
    if target is None:
        target, rule = default_target(groups)
    finals = final_accuracies(groups)
    table = []
    for label, group in groups.items():
        runs = group.runs
        reached = [(r, h) for r in runs if target is not None and (h := time_to_target(r, target))]
        done = [h for _, h in reached]
        flops = [f for r, h in reached if (f := flops_to_step(r.rows, h[0])) is not None]
        evals = [h for r in runs if (h := held_out(r)) is not None]
        mems = [max(vals) for r in runs if (vals := r.series("perf/peak_mem_mb")[1])]
        table.append(
            {
                "group": label,
                "runs": len(runs),
                "steps": max(r.rows[-1]["step"] for r in runs),
                "final_accuracy": finals[label],
                "final_eval": mean_std([v for v, _ in evals]),
                "eval_source": "; ".join(dict.fromkeys(s for _, s in evals)) or "-",
                "reached": f"{len(done)}/{len(runs)}" if target is not None else "-",
                "steps_to_target": mean_std([float(s) for s, _ in done]) if done else None,
                "seconds_to_target": mean_std([t for _, t in done]) if done else None,
                "tflop_to_target": mean_std([f / 1e12 for f in flops]) if flops else None,
                "peak_mem_mb": max(mems) if mems else None,
            }
        )
    return table, target, rule


def fmt(value: tuple[float, float] | float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        mean, std = value
        return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f}"
    return f"{value:.{digits}f}"


def table_cells(table: list[dict], target: float | None) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the summary table as text cells."""
    head = [
        "group",
        "runs",
        "steps",
        f"final train acc (last {FINAL_WINDOW})",
        "final held-out pass@1",
        "held-out from",
        f"reached {fmt(target)}" if target is not None else "reached (no target)",
        "steps to it",
        "seconds to it",
        "TFLOP to it",
        "peak MB",
    ]
    rows = [
        [
            row["group"],
            str(row["runs"]),
            str(row["steps"]),
            fmt(row["final_accuracy"]),
            fmt(row["final_eval"]),
            row["eval_source"],
            row["reached"],
            fmt(row["steps_to_target"], 1),
            fmt(row["seconds_to_target"], 0),
            fmt(row["tflop_to_target"], 1),
            fmt(row["peak_mem_mb"], 0),
        ]
        for row in table
    ]
    return head, rows


def markdown_table(table: list[dict], target: float | None) -> str:
    head, rows = table_cells(table, target)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def abbreviations(groups: dict[str, Group]) -> str:
    """What the abbreviated names in the labels stand for, as one line."""
    names = sorted({k for g in groups.values() for k in g.key})
    used = {
        short_name(k, names): k
        for k in names
        if k != "algorithm.name" and any(short_name(k, names) in label for label in groups)
    }
    return " · ".join(f"{short}: {key}" for short, key in used.items() if short != key)


def shown(value: str) -> str:
    """A config value as written in the notes: plain when it is one word, else quoted."""
    return value if re.fullmatch(r"[\w.+\-/:@]+", value) else json.dumps(value)


def group_notes(groups: dict[str, Group]) -> list[str]:
    """The full key: the values most groups share, then per group its label, the full value of
    each key in which it differs from them, and its runs."""
    common = next(iter(groups.values())).common if groups else {}
    shared = ", ".join(f"{k}={shown(v)}" for k, v in common.items() if k != "algorithm.name")
    notes = [f"most groups: {shared}"] if shared else []
    for label, group in groups.items():
        values = ", ".join(
            f"{k}={shown(v)}"
            for k, v in group.key.items()
            if k == "algorithm.name" or common.get(k) != v
        )
        runs = ", ".join(str(r.path) for r in group.runs)
        count = f"{len(group.runs)} run{'s' if len(group.runs) > 1 else ''}"
        notes.append(f"{label} ({count}): {values or 'the common values'}; runs: {runs}")
    return notes


def draw_groups(ax: Any, groups: dict[str, Group], metric: str) -> None:
    """Each group's mean and band of metric, in colour C<i>; `rlsd eval` results as stars."""
    for i, group in enumerate(groups.values()):
        steps, mean, low, high = band(group.runs, metric, 1 if is_raw(metric) else FINAL_WINDOW)
        color = f"C{i}"
        if steps:
            few = is_raw(metric) and len(steps) <= 12
            ax.plot(steps, mean, color=color, marker="." if few else None)
            if len(group.runs) > 1:
                ax.fill_between(steps, low, high, color=color, alpha=0.2)
        if metric == "eval/pass@1":
            points = [
                (r.rows[-1]["step"] if e["step"] is None else e["step"], e["pass@1"])
                for r in group.runs
                for e in r.evals
            ]
            if points:
                ax.plot(*zip(*points), "*", color=color, markersize=10, markeredgecolor="k")


def compare_figure(groups: dict[str, Group], target: float | None, rule: str) -> Any:
    """The panels, one legend below them (outside every axes) and, under it, the abbreviations
    and the target rule; everything inside the figure."""
    from matplotlib.lines import Line2D

    def has(metric: str) -> bool:
        data = any(r.series(metric)[0] for g in groups.values() for r in g.runs)
        return data or (metric == "eval/pass@1" and any_evals)

    any_evals = any(r.evals for g in groups.values() for r in g.runs)

    panels = [(t, m) for t, m in PANELS if has(m)]
    cols = min(3, max(len(panels), 1))
    width = 4.4 * cols
    handles = [Line2D([], [], color=f"C{i}") for i in range(len(groups))]
    labels = [f"{label} (n={len(g.runs)})" for label, g in groups.items()]
    if target is not None:
        handles.append(Line2D([], [], color="0.4", linestyle="--"))
        labels.append(f"target {target:.3f}")
    if any_evals:
        handles.append(Line2D([], [], color="0.5", marker="*", linestyle="", markersize=10))
        labels.append("rlsd eval")
    entry = max(len(x) for x in labels) * 8 * 0.62 + 44  # points: text at 8 pt, handle, gap
    ncol = max(1, min(len(labels), int(width * 72 * 0.95 // entry)))
    chars = int(width * 72 * 0.95 / (7 * 0.6))
    notes = [f"Target {fmt(target)} = {rule}." if target is not None else f"No target: {rule}."]
    if text := abbreviations(groups):
        notes.insert(0, text)
    lines = [part for note in notes for part in textwrap.wrap(note, chars)]
    legend_in = math.ceil(len(labels) / ncol) * 8 * 1.5 / 72 + 0.15
    notes_in = len(lines) * 7 * 1.45 / 72 + 0.1
    fig, axes = panel_grid(len(panels), cols, 4.4, 3.0, bottom=legend_in + notes_in)
    height = fig.get_figheight()
    for ax, (title, metric) in zip(axes, panels):
        draw_groups(ax, groups, metric)
        if metric == "reward/accuracy" and target is not None:
            ax.axhline(target, color="0.4", linestyle="--", linewidth=1)
        label_panel(ax, title, legend=False)
    fig.tight_layout(rect=(0, (legend_in + notes_in) / height, 1, 1))
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, (legend_in + notes_in) / height),
        ncol=ncol,
        fontsize=8,
        frameon=False,
        borderaxespad=0.2,
    )
    fig.text(0.01, notes_in / height, "\n".join(lines), fontsize=7, va="top", linespacing=1.3)
    return fig


def compare_png(groups: dict[str, Group], out: Path, target: float | None, rule: str) -> Path:
    import matplotlib.pyplot as plt

    fig = compare_figure(groups, target, rule)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def write_compare(
    paths: list[Path], out_dir: Path, target: float | None = None
) -> tuple[dict[str, Path], str]:
    """Write compare.png, compare.md and compare.html under out_dir; returns their paths and the
    table as Markdown."""
    runs = [load_run(Path(p)) for p in paths]
    groups = group_runs(runs)
    table, target, rule = summary(groups, target)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = compare_png(groups, out_dir / "compare.png", target, rule)
    text = markdown_table(table, target)
    target_note = (
        f"Target accuracy {fmt(target)} = {rule}; a run reaches it at the first step whose "
        f"{FINAL_WINDOW}-step moving average of training accuracy gets to it."
        if target is not None
        else f"No target accuracy: {rule}."
    )
    notes = [
        target_note,
        "Held-out pass@1: each run's latest held-out evaluation, `rlsd eval RUN_DIR` "
        "(eval-*.json) or training's own (evals.jsonl, `train.eval_every`); "
        '"held-out from" says which.',
        f"Curves: mean across a group's runs (moving average over {FINAL_WINDOW} steps; "
        "held-out accuracy and peak memory as logged, ★ = `rlsd eval`), band = min to max.",
    ]
    abbrev = abbreviations(groups)
    groups_md = "\n".join(f"- {note}" for note in group_notes(groups))
    md = (
        f"# rlsd compare\n\n![curves](compare.png)\n\n{text}\n" + "\n\n".join(notes) + "\n\n"
        f"Groups (labels: the method and what differs from most groups"
        f"{'; ' + abbrev if abbrev else ''}):\n{groups_md}\n"
    )
    (out_dir / "compare.md").write_text(md, encoding="utf-8")
    (out_dir / "compare.html").write_text(
        compare_html(png, table, target, notes, groups), encoding="utf-8"
    )
    return ({"png": png, "md": out_dir / "compare.md", "html": out_dir / "compare.html"}, text)


def compare_html(
    png: Path, table: list[dict], target: float | None, notes: list[str], groups: dict[str, Group]
) -> str:
    head, rows = table_cells(table, target)
    image = base64.b64encode(png.read_bytes()).decode()
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    header = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    paragraphs = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    listed = "".join(f"<li>{html.escape(n)}</li>" for n in group_notes(groups))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>rlsd compare</title><style>"
        "body{font:14px system-ui,sans-serif;margin:24px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}</style></head><body>"
        f"<h1>rlsd compare</h1><img alt='curves' src='data:image/png;base64,{image}'>"
        f"<table><tr>{header}</tr>{cells}</table>{paragraphs}<h2>Groups</h2><ul>{listed}</ul>"
        "</body></html>"
    )
