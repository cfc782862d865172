"""`rlsd compare RUN_DIR...`: several runs side by side (curves, a table): PNG, Markdown, HTML.

Runs whose configs differ only in seeds (and output paths) form one group, drawn as the mean
across its runs with a min-max band. Runs may have different lengths, and a metric that some runs
never logged is simply absent from their group (its table cell reads "-").
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, load_config, to_dict
from ..tracking import flat_config, read_jsonl
from .plots import label_panel, moving_average, panel_grid

PANELS = [  # (title, metric)
    ("training accuracy", "reward/accuracy"),
    ("held-out accuracy (greedy)", "eval/pass@1"),
    ("mean reward", "reward/mean"),
    ("completion length (tokens)", "completion/length_mean"),
    ("seconds per step", "perf/step_seconds"),
    ("peak memory (MB)", "perf/peak_mem_mb"),
]
IGNORED = ("train.seed", "data.seed", "output.")  # keys that do not make a run a different method
FINAL_WINDOW = 5  # steps averaged for "final accuracy"


@dataclass
class RunData:
    path: Path
    config: dict[str, str]  # dotted key -> value, flattened from the saved config
    rows: list[dict]

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        points = [
            (r["step"], float(r[metric]))
            for r in self.rows
            if isinstance(r.get(metric), (int, float)) and not isinstance(r[metric], bool)
        ]
        return ([s for s, _ in points], [v for _, v in points]) if points else ([], [])


def load_run(path: Path) -> RunData:
    if not (path / "config.yaml").is_file() or not (path / "metrics.jsonl").is_file():
        raise ConfigError(f"{path}: not a run directory (no config.yaml and metrics.jsonl)")
    rows = read_jsonl(path / "metrics.jsonl")
    if not rows:
        raise ConfigError(f"{path}/metrics.jsonl: no steps logged yet")
    config = flat_config(to_dict(load_config(path / "config.yaml", saved=True)))
    return RunData(path, {key: str(value) for key, value in config.items()}, rows)


def group_runs(runs: list[RunData]) -> dict[str, list[RunData]]:
    """Runs grouped by their config minus seeds and outputs; labelled by the keys that differ."""

    def key_of(run: RunData) -> tuple:
        return tuple(sorted((k, v) for k, v in run.config.items() if not k.startswith(IGNORED)))

    groups: dict[tuple, list[RunData]] = {}
    for run in runs:
        groups.setdefault(key_of(run), []).append(run)
    differing = sorted(
        {k for key in groups for k, v in key if any(dict(other).get(k) != v for other in groups)}
    )
    labels: dict[str, list[RunData]] = {}
    for key, members in groups.items():
        values = dict(key)
        parts = [
            values[k] if k == "algorithm.name" else f"{k.split('.')[-1]}={values.get(k)}"
            for k in differing
        ]
        label = " ".join(parts) or members[0].config.get("algorithm.name", "run")
        while label in labels:  # identical configs in different groups cannot happen; be safe
            label += "'"
        labels[label] = members
    return labels


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


def summary(groups: dict[str, list[RunData]], target: float | None) -> tuple[list[dict], float]:
    """One row per group. target None = the lowest final accuracy of any group (the accuracy
    every group reached), so steps and seconds to it compare every group."""
    finals = {
        label: mean_std(
            [v for r in runs if (v := final_value(r, "reward/accuracy", FINAL_WINDOW)) is not None]
        )
        for label, runs in groups.items()
    }
    if target is None:
        reached = [f[0] for f in finals.values() if f]
        target = min(reached) if reached else 0.0
    table = []
    for label, runs in groups.items():
        hits = [time_to_target(r, target) for r in runs]
        done = [h for h in hits if h]
        evals = [v for r in runs if (v := final_value(r, "eval/pass@1", 1)) is not None]
        mems = [max(vals) for r in runs if (vals := r.series("perf/peak_mem_mb")[1])]
        table.append(
            {
                "group": label,
                "runs": len(runs),
                "steps": max(r.rows[-1]["step"] for r in runs),
                "final_accuracy": finals[label],
                "final_eval": mean_std(evals),
                "reached": f"{len(done)}/{len(runs)}",
                "steps_to_target": mean_std([float(s) for s, _ in done]) if done else None,
                "seconds_to_target": mean_std([t for _, t in done]) if done else None,
                "peak_mem_mb": max(mems) if mems else None,
            }
        )
    return table, target


def fmt(value: tuple[float, float] | float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        mean, std = value
        return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f}"
    return f"{value:.{digits}f}"


def markdown_table(table: list[dict], target: float) -> str:
    head = (
        "| group | runs | steps | final train acc (last 5) | final held-out pass@1 | "
        f"reached {target:.3f} | steps to it | seconds to it | peak MB |"
    )
    lines = [head, "|" + "---|" * 9]
    for row in table:
        lines.append(
            f"| {row['group']} | {row['runs']} | {row['steps']} | "
            f"{fmt(row['final_accuracy'])} | {fmt(row['final_eval'])} | "
            f"{row['reached']} | {fmt(row['steps_to_target'], 1)} | "
            f"{fmt(row['seconds_to_target'], 0)} | {fmt(row['peak_mem_mb'], 0)} |"
        )
    return "\n".join(lines) + "\n"


def compare_png(groups: dict[str, list[RunData]], out: Path) -> Path:
    import matplotlib.pyplot as plt

    panels = [(t, m) for t, m in PANELS if any(r.series(m)[0] for g in groups.values() for r in g)]
    fig, axes = panel_grid(len(panels), min(3, max(len(panels), 1)), 4.4, 3.0)
    for ax, (title, metric) in zip(axes, panels):
        for label, runs in groups.items():
            steps, mean, low, high = band(runs, metric)
            if not steps:
                continue
            (line,) = ax.plot(steps, mean, label=f"{label} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        label_panel(ax, title)
    fig.tight_layout()
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
    table, target = summary(groups, target)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = compare_png(groups, out_dir / "compare.png")
    text = markdown_table(table, target)
    members = "\n".join(
        f"- {label}: " + ", ".join(str(r.path) for r in group) for label, group in groups.items()
    )
    md = (
        f"# rlsd compare\n\n![curves](compare.png)\n\n{text}\n"
        f"Curves: mean across a group's runs (moving average over {FINAL_WINDOW} steps), band = "
        f"min to max. Target accuracy {target:.3f} (moving average of training accuracy).\n\n"
        f"Runs:\n{members}\n"
    )
    (out_dir / "compare.md").write_text(md, encoding="utf-8")
    image = base64.b64encode(png.read_bytes()).decode()
    rows_html = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(cell.strip())}</td>" for cell in line.strip("|").split("|"))
        + "</tr>"
        for line in text.splitlines()[2:]
    )
    header = "".join(
        f"<th>{html.escape(c.strip())}</th>" for c in text.splitlines()[0].strip("|").split("|")
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>rlsd compare</title><style>"
        "body{font:14px system-ui,sans-serif;margin:24px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}</style></head><body><h1>rlsd compare</h1>"
        f"<img alt='curves' src='data:image/png;base64,{image}'><table><tr>{header}</tr>"
        f"{rows_html}</table><pre>{html.escape(members)}</pre></body></html>"
    )
    (out_dir / "compare.html").write_text(page, encoding="utf-8")
    return ({"png": png, "md": out_dir / "compare.md", "html": out_dir / "compare.html"}, text)
