"""Step time on a shared CPU: `model.threads` 0 (torch's default), 1 and 2 against 0-3 competing
processes, side by side in one run.

    python benchmarks/threads_bench.py [--threads 0,1,2] [--competitors 0,1,2,3] [--steps 2]

A competitor is what another torch job on the machine looks like: a process multiplying 512 x 512
fp32 matrices in a loop with torch's default thread count. For each (threads, competitors) pair a
fresh subprocess loads SmolLM2-135M, runs one warm-up training step and `--steps` timed ones (the
quick start's task, 2 prompts x 4 samples, 32 new tokens, LoRA, every row trained, learning rate 0
so every step does the same work) while the competitors run; then they are stopped. Reported: the
median step and decode seconds, and the slowdown against the same thread setting alone. Results
go to benchmarks/results/threads-cpu-<date>.md. Nothing else may run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPETITOR = "import torch\na = torch.randn(512, 512)\nwhile True:\n    a = torch.tanh(a @ a)\n"
OVERRIDES = {
    "train.prompts_per_step": "2",
    "rollout.num_generations": "4",
    "rollout.max_new_tokens": "32",
    "train.lr": "0",
    "train.seed": "0",
    "output.progress": "false",
    "output.report": "false",
    "output.save_every": "0",
}


def child(threads: int, steps: int) -> dict:
    """In a subprocess: median seconds per step and per decode over `steps` timed steps."""
    import torch

    from rlsd.schema.config import load_config
    from rlsd.step import trainer
    from rlsd.step.tracking import quiet_libraries

    quiet_libraries(debug=False)
    over = {**OVERRIDES, "model.threads": str(threads), "output.dir": tempfile.mkdtemp()}
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", over)
    cfg.train.steps = steps + 1
    # every row trained: early groups often have equal rewards, which would leave only decoding
    trainer.trained_rows = lambda method, kl_coef, adv: torch.ones_like(adv, dtype=torch.bool)
    run = trainer.setup(cfg)
    rows = [trainer.train_step(run, step) for step in range(1, steps + 2)][1:]
    return {
        "step_s": statistics.median(r["perf/step_seconds"] for r in rows),
        "generate_s": statistics.median(r["perf/generate_seconds"] for r in rows),
        "torch_threads": torch.get_num_threads(),
    }


def measure(threads: int, competitors: int, steps: int) -> dict:
    rivals = [
        subprocess.Popen([sys.executable, "-c", COMPETITOR], stdout=subprocess.DEVNULL)
        for _ in range(competitors)
    ]
    try:
        time.sleep(1.0 if rivals else 0.0)  # let them start working
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(threads), "--steps", str(steps)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
    finally:
        for rival in rivals:
            rival.kill()
            rival.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", default="0,1,2")
    parser.add_argument("--competitors", default="0,1,2,3")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.steps)))
        return
    threads = [int(t) for t in args.threads.split(",")]
    competitors = [int(c) for c in args.competitors.split(",")]
    load_before = os.getloadavg()[0]
    figures = {(t, c): measure(t, c, args.steps) for c in competitors for t in threads}
    rows = []
    for t in threads:
        alone = figures[(t, competitors[0])]["step_s"]
        for c in competitors:
            f = figures[(t, c)]
            rows.append(
                f"| {t} ({f['torch_threads']} used) | {c} | {f['step_s']:.1f} "
                f"| {f['generate_s']:.1f} | {f['step_s'] / alone:.2f} |"
            )
    command = "python benchmarks/threads_bench.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            f"`{command}`",
            "",
            f"{os.cpu_count()} cores; load average (1 min) before the run {load_before:.2f}. "
            f"Median of {args.steps} timed steps after one warm-up; slowdown = step time / the "
            f"same model.threads with {competitors[0]} competitors.",
            "",
            "| model.threads | competing processes | step (s) | decode (s) | slowdown |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    out = ROOT / "benchmarks" / "results" / f"threads-cpu-{date.today()}.md"
    out.write_text(text + "\n")
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
