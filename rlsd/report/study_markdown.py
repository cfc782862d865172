"""The markdown page of a study's summary (`summary.md`): the results table per task, the credit
diagnostics, the ablations and the notes that say how to read them."""

from __future__ import annotations

from typing import Any

from ..commands.study import Study

GROUPS = ("correct", "incorrect", "answer_tokens", "other_tokens")  # of the credit diagnostics


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _ci(value: list[float] | None) -> str:
    return "-" if not value else f"{_pct(value[0])} [{_pct(value[1])}, {_pct(value[2])}]"


def _diff(value: list[float] | None) -> str:
    return (
        "-"
        if value is None
        else (f"{100 * value[0]:+.1f} [{100 * value[1]:+.1f}, {100 * value[2]:+.1f}]")
    )


def summary_row(arm: str, a: dict[str, Any], pass_k: int) -> str:
    best = f"{_pct(a['best'][1])} ({a['best'][0]})" if a["best"] else "-"
    versus = "(reference)" if a["runs"] and a["vs_reference"] is None else _diff(a["vs_reference"])
    cells = [
        arm,
        f"{a['runs']}/{a['planned']}",
        _ci(a["final"]),
        versus,
        best,
        _pct(a["auc"]),
        _pct(a["learning_groups"]),
        "-" if a["steps_to_target"] is None else str(a["steps_to_target"]),
        "-" if a["seconds_to_target"] is None else str(round(a["seconds_to_target"])),
        "-" if a.get("tflop_to_target") is None else f"{a['tflop_to_target']:.1f}",
        "-" if a["seconds_per_step"] is None else str(round(a["seconds_per_step"], 1)),
        "-" if not a["peak_mem_mb"] else str(round(a["peak_mem_mb"])),
        _pct(a["leak_echo"]),
        _pct(a["leak_answer_first"]),
    ]
    if pass_k:
        cells[3:3] = [_ci(a["pass_k"]) + (f" (n={a['pass_k_runs']})" if a["pass_k"] else "")]
    return "| " + " | ".join(cells) + " |"


def _delta(d: dict[str, float], group: str) -> str:
    mean, std = d.get(f"rlsd/delta_mean_{group}"), d.get(f"rlsd/delta_std_{group}")
    if mean is None:
        return "-"
    return f"{mean:+.3f}" + ("" if std is None else f" ± {std:.3f}")


def _clips(d: dict[str, float], group: str) -> str:
    low, high = d.get(f"rlsd/clip_low_frac_{group}"), d.get(f"rlsd/clip_high_frac_{group}")
    return "-" if low is None else f"{_pct(low)} / {_pct(high)}"


def diagnostics_rows(arms: dict[str, dict]) -> list[str]:
    """The credit diagnostics table of the arms that have a teacher."""
    names = [g.replace("_", " ") for g in GROUPS]
    rows = [
        "| arm | teacher KL | "
        + " | ".join(f"Delta {g}" for g in names)
        + " | "
        + " | ".join(f"clipped low / high % {g}" for g in names)
        + " |",
        "|" + "---|" * (2 + 2 * len(GROUPS)),
    ]
    for arm, a in arms.items():
        d = a["diagnostics"]
        if "teacher/kl" in d:
            kl = f"{d['teacher/kl']:.3f}"
            rows.append(
                f"| {arm} | {kl} | "
                + " | ".join(_delta(d, g) for g in GROUPS)
                + " | "
                + " | ".join(_clips(d, g) for g in GROUPS)
                + " |"
            )
    return rows if len(rows) > 2 else []


def _changes(overrides: dict[str, Any], width: int = 40) -> str:
    """An ablation's overrides as `key=value` for one table cell: the algorithm's name left out,
    whitespace runs (a template's newlines) as one space, values over `width` characters cut."""
    values = {k: " ".join(str(v).split()) for k, v in overrides.items() if k != "algorithm.name"}
    text = [
        f"{k}={v}" if len(v) <= width else f"{k}={v[: width - 3]}..." for k, v in values.items()
    ]
    return ", ".join(text).replace("|", "/") or "-"


def ablation_rows(study: Study, arms: dict[str, dict], task: str) -> list[str]:
    """The ablations against the `ablation_reference` arm at the same seed (finished pairs)."""
    pairs = [
        (arm, a["vs_ablation_reference"])
        for arm, a in arms.items()
        if a.get("vs_ablation_reference")
    ]
    if not pairs:
        return []
    first = pairs[0][1]
    against = first["against"]
    spread = (
        f" The interval covers the items only, not the runs' own randomness: the "
        f"{first['seeds']} seeds of {study.ablation_reference} end "
        f"{_pct(first['seed_spread'])} points apart."
        if first["seeds"] > 1
        else ""
    )
    rows = [
        f"Ablations against {against} (the same seed, data order and held-out items; the "
        "difference pairs the items, so it is the change the ablation made on this seed, "
        f"not across seeds).{spread}",
        "",
        f"![ablations](ablations-{task}.png)",
        "",
        f"| ablation | changes | final pass@1 [95 % CI] | {against} | difference [95 % CI] "
        f"| AUC | AUC of {against} |",
        "|" + "---|" * 7,
    ]
    for arm, vs in pairs:
        rows.append(
            f"| {arm} | {_changes(study.ablations[arm])} | {_ci(arms[arm]['final'])} | "
            f"{_pct(vs['final'])} | {_diff(vs['difference'])} | "
            f"{_pct(arms[arm]['auc'])} | {_pct(vs['auc'])} |"
        )
    return rows


def _constant(base: dict[str, Any]) -> str:
    if not base.get("constant_answer"):
        return ""
    answer, share = base["constant_answer"]
    return (
        f" Always answering {answer!r}, the most frequent held-out answer, would score "
        f"{_pct(share)} %."
    )


def summary_markdown(study: Study, result: dict[str, Any]) -> str:
    k = study.pass_k
    lines = [
        f"# Study `{study.path}`",
        "",
        f"Made by `rlsd study {study.path}` (rerun it to continue or reproduce the study; "
        "`--summarize` rebuilds this page from the finished runs).",
        "",
        "Finished runs only. Held-out greedy pass@1 (%) on the same "
        f"{study.eval_items} items for every arm, with 95 % bootstrap intervals over seeds "
        f"and items; *vs {study.reference_arm}*: the final difference in points, items "
        "resampled in pairs; *best*: the highest evaluation after step 0 and its step (an "
        "optimistic pick); *learning groups*: the share of prompt groups whose rewards "
        "differed, the only ones that carry a gradient; *target*: the "
        f"{study.reference_arm} arm's final accuracy; *steps to target*: the first "
        "evaluation step from which the mean curve stays at or above it to the end; "
        "*TFLOP to target*: the runs' estimated training compute up to that step "
        "(`compute/flops`; - for runs from before it was logged); "
        "echo / answer-first: the leakage check on the last evaluation's completions; "
        "*peak MB*: the largest of the runs' "
        "own peaks (resident set on CPU, allocated on CUDA), runs that could only log the "
        "study process's peak (before rlsd measured per run, or on CPU outside Linux) "
        "left out.",
        "",
    ]
    if k:
        lines += [
            f"*pass@{k}*: {k} samples per item at the rollout temperature from the final "
            f"checkpoint, on the first {study.pass_k_items or study.eval_items} held-out "
            "items (n: runs with it).",
            "",
        ]
    lines += [
        "Credit diagnostics: means over every step of every run that logged them; Delta = "
        "log P_teacher - log P_student per completion token (mean ± the within-step std), "
        "*clipped*: RLSD weights exp(sign(A) Delta) outside [1 - eps_w, 1 + eps_w].",
        "",
    ]
    for task, part in result["tasks"].items():
        base = part.get("base", {})
        head = [
            "arm",
            "runs",
            "final pass@1 [95 % CI]",
            f"vs {study.reference_arm}",
            "best (step)",
            "AUC",
            "learning groups %",
            "steps to target",
            "s to target",
            "TFLOP to target",
            "s/step",
            "peak MB",
            "echo %",
            "answer-first %",
        ]
        if k:
            head[3:3] = [f"pass@{k} [95 % CI]"]
        lines += [
            f"## {task}",
            "",
            f"![accuracy](accuracy-{task}.png)",
            "",
            f"Training curves of every run: [compare-{task}](compare-{task}/compare.md).",
            "",
            f"Base model: greedy pass@1 {_pct(base.get('greedy'))} %"
            + (f", pass@{k} {_pct(base.get('pass_k'))} %" if k else "")
            + f". Target: {_pct(part['target'])} %."
            + _constant(base),
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        lines += [summary_row(arm, a, k) for arm, a in part["arms"].items()]
        ablations = ablation_rows(study, part["arms"], task)
        lines += ["", *ablations] if ablations else []
        table = diagnostics_rows(part["arms"])
        if table:
            lines += ["", f"![diagnostics](diagnostics-{task}.png)", "", *table]
        lines.append("")
    return "\n".join(lines) + "\n"
