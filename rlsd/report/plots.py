"""Learning curves of a run as PNG images (matplotlib, no display needed)."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

PANELS = [  # (title, metric keys)
    ("reward", ["reward/mean", "reward/accuracy"]),
    ("held-out accuracy (greedy)", ["eval/pass@1", "eval/lenient@1"]),
    ("completion length (tokens)", ["completion/length_mean"]),
    ("RLSD credit", ["rlsd/weight_mean", "rlsd/lambda"]),
    ("clipped teacher weights", ["rlsd/clip_low_frac", "rlsd/clip_high_frac"]),
    ("teacher vs student", ["teacher/kl", "rlsd/delta_mean_correct", "rlsd/delta_mean_incorrect"]),
    ("distillation", ["opsd/reverse_kl", "opsd/kl_exact"]),
    ("policy", ["policy/entropy", "policy/grad_norm"]),
    ("seconds per step", ["perf/step_seconds", "perf/generate_seconds", "perf/train_seconds"]),
    ("peak memory (MB)", ["perf/peak_mem_mb"]),
]


def moving_average(values: list[float], window: int = 5) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def panel_grid(count: int, cols: int, width: float, height: float) -> tuple[Any, list]:
    """A figure of `count` panels, `cols` per row (the unused cells blank); (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(math.ceil(count / cols), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, list(axes.flat)[:count]


def label_panel(ax: Any, title: str) -> None:
    """The shared look of a panel: its title, a step axis, a small legend."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)


def curves_png(rows: list[dict]) -> str:
    """All panels that have data, in one PNG, as a base64 data URI."""
    import matplotlib.pyplot as plt

    panels = [
        (t, [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)])
        for t, keys in PANELS
    ]
    panels = [(t, keys) for t, keys in panels if keys]
    fig, axes = panel_grid(len(panels), 3, 4.2, 2.8)
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            steps, values = zip(*points)
            (line,) = ax.plot(steps, values, alpha=0.35, linewidth=1)
            ax.plot(steps, moving_average(list(values)), color=line.get_color(), label=key)
        label_panel(ax, title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
