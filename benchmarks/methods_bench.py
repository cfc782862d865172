"""Seconds per step and peak memory of every method on the quick start, side by side.

    python benchmarks/methods_bench.py [--steps 3] [--methods grpo,rlsd,opsd,grpo_opsd,opd]

Each method runs in a fresh subprocess (so peak memory is its own) on the quick-start recipe with
two changes that make the comparison clean: the learning rate is 0, so every method samples the
very same completions (same seeds, same weights), and every row is trained (none skipped for a
zero advantage), so each step pays each method's full cost. One warm-up step, then `--steps`
timed steps; medians are reported, with ratios to GRPO. OPD's external teacher is a second copy
of the same model (a teacher of the same size). Results go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("step", "generate", "teacher", "train")


def child(method: str, steps: int, extra: dict[str, str]) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from rlsd.schema.config import load_config
    from rlsd.step import trainer
    from rlsd.step.tracking import quiet_libraries

    quiet_libraries(debug=False)
    overrides = {
        "algorithm.name": method,
        "train.lr": "0",
        "train.steps": str(steps + 1),
        "output.dir": tempfile.mkdtemp(),
        "output.progress": "false",
    }
    overrides.update(extra)
    if method == "opd":  # a teacher of the same size: a second copy of the student's model
        overrides.update(
            {
                "teacher.mode": "external",
                "teacher.model": extra.get("model.name", "smollm2-135m-instruct"),
            }
        )
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    trainer.trained_rows = lambda run, adv: torch.ones_like(adv, dtype=torch.bool)
    run = trainer.setup(cfg)
    rows = [trainer.train_step(run, step) for step in range(1, steps + 2)][1:]
    out = {p: statistics.median(r[f"perf/{p}_seconds"] for r in rows) for p in PHASES}
    out["peak_mem_mb"] = max(r["perf/peak_mem_mb"] for r in rows)
    out["completion_tokens"] = statistics.median(r["completion/length_mean"] for r in rows) * 32
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", default="grpo,rlsd,opsd,grpo_opsd,opd")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every method, e.g. model.dtype=bfloat16",
    )
    parser.add_argument("--child")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.set)
    if args.child:
        return child(args.child, args.steps, extra)
    results = {}
    for method in args.methods.split(","):
        sets = [x for item in args.set for x in ("--set", item)]
        proc = subprocess.run(
            [sys.executable, __file__, "--child", method, "--steps", str(args.steps), *sets],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
        results[method] = json.loads(line[0][7:])
        print(method, results[method], flush=True)
    base = results.get("grpo")
    lines = [
        "| method | s/step | generate | teacher | train | peak MB | step vs grpo | "
        "memory vs grpo |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        ratio = (
            f"{r['step'] / base['step']:.2f} | {r['peak_mem_mb'] / base['peak_mem_mb']:.2f}"
            if base
            else "- | -"
        )
        lines.append(
            f"| {method} | {r['step']:.1f} | {r['generate']:.1f} | {r['teacher']:.1f} | "
            f"{r['train']:.1f} | {r['peak_mem_mb']:.0f} | {ratio} |"
        )
    table = "\n".join(lines)
    print(table)
    import torch

    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu{os.cpu_count()}"
    stem = ROOT / "benchmarks" / "results" / (f"methods-{machine.replace(' ', '_')}-{date.today()}")
    command = "python benchmarks/methods_bench.py " + " ".join(sys.argv[1:])
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(
        json.dumps(
            {"command": command, "machine": machine, "host": platform.node(), "results": results},
            indent=2,
        )
    )
    stem.with_suffix(".md").write_text(f"`{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
