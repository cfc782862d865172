"""The plots of `rlsd study`'s summary: held-out accuracy per arm with bootstrap bands, the
ablations against their reference run, and the teacher's credit diagnostics over training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .plots import moving_average


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_png(arms: dict[str, dict], out: Path, task: str) -> None:
    """Held-out greedy pass@1 over training, one line per arm (mean over its finished runs) with
    its 95 % bootstrap band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for arm, a in arms.items():
        steps = [int(s) for s in a["curve"]]
        if not steps:
            continue
        mean, low, high = zip(*(a["curve"][s] for s in a["curve"]))
        (line,) = ax.plot(steps, mean, marker="o", label=f"{arm} (n={a['runs']})")
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
    ax.set(title=f"{task}: held-out greedy pass@1 (95 % bootstrap)", xlabel="step", ylabel="pass@1")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def ablations_png(arms: dict[str, dict], out: Path, task: str) -> None:
    """Each finished ablation's held-out pass@1 (one seed: no band) beside the run it is compared
    with (`ablation_reference` at the same seed, dashed black); nothing is written without one."""
    shown = {arm: a for arm, a in arms.items() if a.get("vs_ablation_reference")}
    if not shown:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    reference = next(iter(shown.values()))["vs_ablation_reference"]
    ax.plot(
        [int(s) for s in reference["curve"]],
        list(reference["curve"].values()),
        "k--",
        marker="o",
        label=reference["against"],
    )
    for arm, a in shown.items():
        ax.plot(
            [int(s) for s in a["curve"]], [v[0] for v in a["curve"].values()], marker=".", label=arm
        )
    ax.set(title=f"{task}: ablations, held-out greedy pass@1", xlabel="step", ylabel="pass@1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


PANELS = [
    ("Delta: correct (solid) vs incorrect", "rlsd/delta_mean_correct", "rlsd/delta_mean_incorrect"),
    (
        "Delta: answer tokens (solid) vs other",
        "rlsd/delta_mean_answer_tokens",
        "rlsd/delta_mean_other_tokens",
    ),
    (
        "RLSD weights clipped low: correct vs incorrect",
        "rlsd/clip_low_frac_correct",
        "rlsd/clip_low_frac_incorrect",
    ),
    (
        "RLSD weights clipped high: correct vs incorrect",
        "rlsd/clip_high_frac_correct",
        "rlsd/clip_high_frac_incorrect",
    ),
]


def diagnostics_png(arms: dict[str, dict], out: Path, task: str) -> None:
    """The credit diagnostics over training, one colour per arm with a teacher (mean over its
    runs, 5-step moving average); nothing is written when no arm has them."""
    shown = {arm: a["diagnostics_curves"] for arm, a in arms.items() if a["diagnostics_curves"]}
    if not shown:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, solid, dashed) in zip(axes.flat, PANELS):
        for i, (arm, curves) in enumerate(shown.items()):
            drawn = [(key, style) for key, style in ((solid, "-"), (dashed, "--")) if key in curves]
            for j, (key, style) in enumerate(drawn):  # the arm's name on its first line
                ax.plot(
                    [int(s) for s in curves[key]],
                    moving_average(list(curves[key].values())),
                    style,
                    color=colours[i % len(colours)],
                    label=None if j else arm,
                )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if ax.lines:
            ax.legend(fontsize=6)
    fig.suptitle(f"{task}: what the teacher did (5-step moving average)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
