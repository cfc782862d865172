"""Verifier throughput (completions per second) through the safe runner, on the CPU.

    python benchmarks/verifier_bench.py [--n 2000]

Completions are real-looking: the quick-start task's references with a marker, half of them
wrong, some with LaTeX for `math`; for `code`, HumanEval's 164 canonical solutions and 164
broken ones, each run in the sandbox. Results go to benchmarks/results/verifiers-<date>.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlsd.config import RewardConfig, load_config  # noqa: E402
from rlsd.data import humaneval_records, load_records  # noqa: E402
from rlsd.rewards import build_reward  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    records = load_records(load_config(None, {"data.size": str(args.n)}).data)
    rng = random.Random(0)
    texts = []
    for r in records:
        value = r.answer if rng.random() < 0.5 else str(int(r.answer) + rng.randint(1, 9))
        if rng.random() < 0.3:
            value = f"\\frac{{{int(value) * 2}}}{{2}}"
        texts.append(f"Let me compute it step by step.\nAnswer: {value}")
    columns = {
        "answer": [r.answer for r in records],
        "solution": [""] * len(records),
        "metadata": [r.metadata for r in records],
    }
    rows = []
    for name in ("exact", "numeric", "math", "reasoning_gym"):
        fn = build_reward(RewardConfig(verifiers=[name]))
        start = time.perf_counter()
        rewards, _, metrics = fn([r.prompt for r in records], texts, columns)
        seconds = time.perf_counter() - start
        rows.append(
            f"| {name} | {len(texts) / seconds:,.0f} | {sum(rewards) / len(rewards):.3f} "
            f"| {metrics['reward/errors']:.0f} | {metrics['reward/timeouts']:.0f} |"
        )
    problems = humaneval_records()  # code: HumanEval's canonical solutions and a broken copy
    completions = [f"```python\n{r.solution}\n```" for r in problems] + [
        f"```python\n{r.metadata['prompt_code']}    return None\n```" for r in problems
    ]
    fn = build_reward(RewardConfig(verifiers=["code"]))
    start = time.perf_counter()
    rewards, _, metrics = fn(
        [""] * len(completions),
        completions,
        {"answer": [""] * len(completions), "metadata": [r.metadata for r in problems] * 2},
    )
    seconds = time.perf_counter() - start
    rows.append(
        f"| code (HumanEval) | {len(completions) / seconds:,.0f} | "
        f"{sum(rewards) / len(rewards):.3f} | {metrics['reward/errors']:.0f} | "
        f"{metrics['reward/timeouts']:.0f} |"
    )
    table = "\n".join(
        [
            "| verifier | completions/s | mean reward | errors | time-outs |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    command = "python benchmarks/verifier_bench.py " + " ".join(sys.argv[1:])
    print(table)
    out = ROOT / "benchmarks" / "results" / f"verifiers-cpu-{date.today()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"`{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
