"""Peak memory of completion log-probs: rlsd's chunked path against the naive full log-softmax.

    python benchmarks/logprob_bench.py [--rows 2048] [--vocab 49152] [--hidden 576]

Both compute log P(target) for `rows` completion tokens from hidden states (rows, hidden) and an
lm-head weight (vocab, hidden) at SmolLM2's sizes, forward and backward, each in a fresh subprocess.
The naive path materialises the (rows, vocab) logits and their log-softmax (and keeps them for the
backward pass); the chunked path (`rlsd.engine.logprobs.gather_logprobs`) holds one chunk of logits
at a time and recomputes it in the backward pass. Peak memory is the growth of the process's peak
resident set (VmHWM) over the run, with glibc's mmap threshold pinned so that freed tensors leave
the resident set. Also checks that both give the same values and gradients. Writes
benchmarks/results/logprob-<name>-<date>.md and prints the ratio against issue 5's goal (chunked <=
0.3 x naive at vocabulary 49k)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL = 0.3


def status(key: str) -> float:
    """MiB of a /proc/self/status field (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def child(mode: str, rows: int, hidden: int, vocab: int, chunk: int) -> dict:
    import torch

    from rlsd.engine.logprobs import gather_logprobs

    torch.manual_seed(0)
    h = torch.randn(rows, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden) * 0.02
    targets = torch.randint(0, vocab, (rows,))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    before = status("VmRSS")
    start = time.perf_counter()
    if mode == "naive":
        out = torch.log_softmax(h @ w.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    else:
        out = gather_logprobs(h, w, targets, chunk_rows=chunk)
    out.sum().backward()
    seconds = time.perf_counter() - start
    return {
        "peak_mb": status("VmHWM") - before,
        "seconds": seconds,
        "sum": float(out.sum()),
        "grad_norm": float(h.grad.norm()),
    }


def measure(mode: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--rows",
            str(args.rows),
            "--hidden",
            str(args.hidden),
            "--vocab",
            str(args.vocab),
            "--chunk",
            str(args.chunk),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(args: argparse.Namespace, naive: dict, chunked: dict) -> str:
    ratio = chunked["peak_mb"] / naive["peak_mb"]
    same = (
        abs(naive["sum"] - chunked["sum"]) <= 1e-3 * abs(naive["sum"])
        and abs(naive["grad_norm"] - chunked["grad_norm"]) <= 1e-3 * naive["grad_norm"]
    )
    lines = [
        f"# Log-prob peak memory ({args.name}, {date.today()})",
        "",
        f"Command: `python benchmarks/logprob_bench.py {' '.join(sys.argv[1:])}`",
        "",
        f"{args.rows} completion tokens, hidden {args.hidden}, vocabulary {args.vocab}, "
        f"fp32, forward + backward; chunked path: {args.chunk} rows per chunk.",
        "",
        "| path | peak MB | seconds |",
        "|---|---|---|",
        f"| naive log-softmax | {naive['peak_mb']:.0f} | {naive['seconds']:.2f} |",
        f"| rlsd chunked | {chunked['peak_mb']:.0f} | {chunked['seconds']:.2f} |",
        "",
        f"chunked / naive peak memory: **{ratio:.2f}** (goal <= {GOAL}: "
        f"{'met' if ratio <= GOAL else 'NOT met'}); same values and gradients: "
        f"{'yes' if same else 'NO'}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--name", default="cpu2", help="machine name in the result file")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.hidden, args.vocab, args.chunk)))
        return
    text = table(args, measure("naive", args), measure("chunked", args))
    print(text)
    out = Path(args.out) / f"logprob-{args.name}-{date.today()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
