"""Verifier throughput (completions per second) on the CPU: the worker-process runner against
the in-process (thread) runner it replaced, side by side in one run.

    python benchmarks/verifier_bench.py [--n 2000] [--repeats 3]

Completions are real-looking: the quick-start task's references with a marker, half of them
wrong, some with LaTeX for `math`; for `code`, HumanEval's 164 canonical solutions and 164
broken ones, each run in the sandbox (the same path in both runners). Each verifier is built
both ways from the same config: `RewardFn(cfg)` (math, regex, reasoning_gym in confined worker
processes; exact, numeric, choice, format in threads) and `RewardFn(cfg, in_process=True)` (the
old runner: every verifier in threads). A runner's pool start-up is timed on its own, then the
best of `--repeats` calls over all `--n` completions, the two runners' calls alternating. The
machine's load average is written down before and after (the cores may be shared). Results go
to benchmarks/results/verifiers-cpu-<date>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlsd.engine.data import humaneval_records, load_records  # noqa: E402
from rlsd.engine.rewards import RewardFn  # noqa: E402
from rlsd.schema.config import RewardConfig, load_config  # noqa: E402

OLD_WORKERS = 32  # reward.workers' default before the worker processes (threads per wave)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min, {os.cpu_count()} cores)"


def side_by_side(cfg, prompts, texts, columns, repeats: int) -> dict:
    """Per runner: (start-up seconds, best seconds of `repeats` full passes, metrics, rewards).

    The runners' passes alternate, so a change in the machine's load hits them alike. "new" is
    the default (confined verifiers score each completion in its own forked process), "reused"
    the same workers with reward.isolate_completions false.
    """
    old = dataclasses.replace(cfg, workers=OLD_WORKERS)
    reused = dataclasses.replace(cfg, isolate_completions=False)  # no process per completion
    fns = {
        "threads": RewardFn(old, in_process=True),
        "new": RewardFn(cfg),
        "reused": RewardFn(reused),
    }
    figures = {}
    try:
        for runner, fn in fns.items():
            start = time.perf_counter()
            fn(prompts[:1], texts[:1], {k: v[:1] for k, v in columns.items()})  # starts a pool
            figures[runner] = [time.perf_counter() - start, float("inf"), None, None]
        for _ in range(repeats):
            for runner, fn in fns.items():
                start = time.perf_counter()
                rewards, _, metrics = fn(prompts, texts, columns)
                seconds = time.perf_counter() - start
                figures[runner][1] = min(figures[runner][1], seconds)
                figures[runner][2:] = [metrics, rewards]
    finally:
        for fn in fns.values():
            fn.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_before = load()
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
    prompts = [r.prompt for r in records]
    configs = {
        "exact": {},
        "numeric": {},
        "choice": {},
        "format": {},
        "math": {},
        "regex": {"pattern": r"-?\d+"},
        "reasoning_gym": {},
    }
    rows = []
    workers = RewardFn(RewardConfig()).workers
    for name, extra in configs.items():
        cfg = RewardConfig(verifiers=[name], **extra)
        figures = side_by_side(cfg, prompts, texts, columns, args.repeats)
        (_, old_s, _, old_r), (startup, new_s, metrics, new_r) = figures["threads"], figures["new"]
        reused_s, reused_r = figures["reused"][1], figures["reused"][3]
        assert old_r == new_r == reused_r, f"{name}: the runners disagree"
        where = RewardFn(cfg).where()[name]
        rows.append(
            f"| {name} | {where} | {len(texts) / old_s:,.0f} | {len(texts) / new_s:,.0f} | "
            f"{old_s / new_s:.2f} | {len(texts) / reused_s:,.0f} | {reused_s / new_s:.2f} | "
            f"{startup:.2f} | {sum(new_r) / len(new_r):.3f} | "
            f"{metrics['reward/errors']:.0f} | {metrics['reward/timeouts']:.0f} |"
        )
    problems = humaneval_records()  # code: HumanEval's canonical solutions and a broken copy
    completions = [f"```python\n{r.solution}\n```" for r in problems] + [
        f"```python\n{r.metadata['prompt_code']}    return None\n```" for r in problems
    ]
    columns = {"answer": [""] * len(completions), "metadata": [r.metadata for r in problems] * 2}
    figures = side_by_side(
        RewardConfig(verifiers=["code"]), [""] * len(completions), completions, columns, 1
    )
    (_, old_s, _, _), (_, new_s, metrics, rewards) = figures["threads"], figures["new"]
    rows.append(
        f"| code (HumanEval) | trainer threads, one sandbox process each "
        f"| {len(completions) / old_s:,.0f} | {len(completions) / new_s:,.0f} "
        f"| {old_s / new_s:.2f} | - | - | 0.00 | {sum(rewards) / len(rewards):.3f} "
        f"| {metrics['reward/errors']:.0f} | {metrics['reward/timeouts']:.0f} |"
    )
    table = "\n".join(
        [
            f"| verifier | runs in (new) | old: threads, {OLD_WORKERS} at a time (completions/s) "
            f"| new: {workers} workers (completions/s) "
            "| new / old | reused workers, no process per completion (completions/s) "
            "| new / reused | new: pool start-up (s) | mean reward | errors | time-outs |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    load_after = load()
    command = "python benchmarks/verifier_bench.py " + " ".join(sys.argv[1:])
    notes = (
        f"{len(texts)} completions, best of {args.repeats} alternating passes per runner, "
        f"reward.workers = {workers} (the default on this machine), reward.timeout = 10 s.\n"
        f"Load average before: {load_before}; after: {load_after}.\n"
        "exact, numeric, choice and format run the same code in both columns (threads): their "
        "ratios show how much the figures move from one pass to the next on this machine.\n"
    )
    if max(os.getloadavg()) > (os.cpu_count() or 1):
        notes += (
            "The load average was above the number of cores: other jobs shared them during the "
            "run, so every figure is contended; compare the two columns within a row only.\n"
        )
    print(table)
    print(notes)
    out = ROOT / "benchmarks" / "results" / f"verifiers-cpu-{date.today()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"`{command}`\n\n{notes}\n{table}\n")


if __name__ == "__main__":
    main()
