"""How far the teacher moved each token's credit, read from runs' logged samples.

    python benchmarks/credit_shift.py RUN_DIR [RUN_DIR ...]

For every logged completion that carried a gradient (a non-zero sequence advantage), the
teacher's multiplier m_t is the token's advantage over the sequence's (GRPO's credit is 1.0 on
every token). Per run: how many such tokens, the share within 1 % of 1.0, the share at the bound
1 +- lambda * eps_w that RLSD's clip allows, the mean |m_t - 1|, and the mean m_t on correct and
on incorrect completions. A run whose multipliers stay near 1.0 is GRPO in all but name.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import yaml


def shifts(run: Path) -> dict[str, float]:
    """The figures above for one run directory (samples.jsonl and config.yaml)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    bound = cfg["rlsd"]["lambda"] * cfg["rlsd"]["eps_w"]
    by_sign: dict[bool, list[float]] = {True: [], False: []}
    for line in (run / "samples.jsonl").read_text().splitlines():
        sample = json.loads(line)
        if abs(sample["advantage"]) > 1e-6 and "credit_multiplier" in sample:
            by_sign[bool(sample["correct"])].extend(sample["credit_multiplier"])
    every = by_sign[True] + by_sign[False]
    if not every:
        raise SystemExit(f"{run}: no logged sample with a gradient and a credit multiplier")
    return {
        "tokens": len(every),
        "within_1pct": statistics.mean(abs(m - 1) <= 0.01 for m in every),
        "at_bound": statistics.mean(abs(m - 1) >= bound - 1e-3 for m in every),
        "mean_abs_shift": statistics.mean(abs(m - 1) for m in every),
        "mean_correct": statistics.mean(by_sign[True]) if by_sign[True] else float("nan"),
        "mean_incorrect": statistics.mean(by_sign[False]) if by_sign[False] else float("nan"),
        "bound": bound,
    }


def main(paths: list[str]) -> None:
    print(
        "| run | tokens | within 1 % of 1.0 | at the bound | mean abs(m - 1) | mean m correct "
        "| mean m incorrect |"
    )
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        s = shifts(Path(path))
        print(
            f"| {Path(path).name} | {s['tokens']} | {s['within_1pct']:.1%} | "
            f"{s['at_bound']:.1%} (1 ± {s['bound']:.2f}) | {s['mean_abs_shift']:.4f} | "
            f"{s['mean_correct']:.4f} | {s['mean_incorrect']:.4f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
