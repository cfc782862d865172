"""Learning curves of a run as PNG images (matplotlib, no display needed).

Noisy per-step metrics are drawn raw (faint) with a 5-step moving average; the metrics in RAW
(peak memory, a running maximum, and the held-out evaluations, a few points far apart) are
drawn as logged. Steps are whole numbers, so the step axis only has integer ticks.
"""

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
HELD_OUT_PANEL = "held-out accuracy (greedy)"
RAW = ("perf/peak_mem_mb", "eval/")  # drawn as logged, never smoothed (prefixes)


def moving_average(values: list[float], window: int = 5) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def is_raw(metric: str) -> bool:
    return metric.startswith(RAW)


def panel_grid(
    count: int, cols: int, width: float, height: float, bottom: float = 0.0
) -> tuple[Any, list]:
    """A figure of `count` panels, `cols` per row (the unused cells blank), `bottom` inches
    below them left free (for a legend block); (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(math.ceil(count / cols), 1)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width * cols, height * rows + bottom), squeeze=False
    )
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, list(axes.flat)[:count]


def label_panel(ax: Any, title: str, legend: bool = True) -> None:
    """The shared look of a panel: its title, an integer step axis and, when asked, a small
    legend below the axes (outside them, so it never covers a curve)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    low, high = ax.get_xlim()
    if high - low < 2:  # one or two steps: widen to whole steps, or the ticks would be fractions
        ax.set_xlim(math.floor(low), max(math.ceil(high), math.floor(low) + 2))
    ax.tick_params(labelsize=7)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(
            fontsize=7,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.2),
            ncol=2,
            frameon=False,
            borderaxespad=0.0,
        )


def curves_figure(rows: list[dict], checkpoint_evals: list[dict] | None = None) -> Any:
    """All panels that have data in one figure. checkpoint_evals: `rlsd eval` results
    ({"step", "pass@1"}), marked on the held-out panel."""
    checkpoint_evals = [e for e in checkpoint_evals or [] if e.get("step") is not None]
    panels = [
        (t, [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)])
        for t, keys in PANELS
    ]
    panels = [(t, ks) for t, ks in panels if ks or (t == HELD_OUT_PANEL and checkpoint_evals)]
    fig, axes = panel_grid(len(panels), 3, 4.2, 3.2)
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            steps, values = zip(*points)
            if is_raw(key):
                ax.plot(steps, values, marker="." if len(steps) < 40 else None, label=key)
                continue
            (line,) = ax.plot(steps, values, alpha=0.35, linewidth=1)
            ax.plot(steps, moving_average(list(values)), color=line.get_color(), label=key)
        if title == HELD_OUT_PANEL and checkpoint_evals:
            ax.plot(
                [e["step"] for e in checkpoint_evals],
                [e["pass@1"] for e in checkpoint_evals],
                "k*",
                markersize=9,
                label="rlsd eval pass@1",
            )
        label_panel(ax, title)
    fig.tight_layout()
    return fig


def curves_png(rows: list[dict], checkpoint_evals: list[dict] | None = None) -> str:
    """All panels that have data, in one PNG, as a base64 data URI."""
    import matplotlib.pyplot as plt

    fig = curves_figure(rows, checkpoint_evals)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
