"""Rollout throughput: rlsd's own KV-cache decoder against transformers' `generate`, side by side.

    python benchmarks/decode_bench.py [--prompts 8] [--group 4] [--max-new 64] [--repeats 3]

Both decoders sample the same quick-start prompts (SmolLM2-135M-Instruct, fp32 CPU unless
--set model.dtype=...) in one process, alternating, `--repeats` times each after one warm-up
call each. Reported: median seconds per batch, completion tokens per second, the ratio, and the
mean completion length (the decoders draw different random numbers, so lengths differ a little;
tokens per second accounts for it). Results go to benchmarks/results/decode-<machine>-<date>.md.

    python benchmarks/decode_bench.py --sampler   # the own decoder's draw: multinomial vs ours

With `--sampler` the own decoder runs twice per round, drawing each token with
`torch.multinomial` (an exponential number per vocabulary entry) and with rlsd's inverse-CDF
draw (`rlsd.decode.sample_rows`, one uniform number per row); results go to
benchmarks/results/decode-sampler-<machine>-<date>.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from datetime import date
from pathlib import Path
from typing import Any
from unittest.mock import patch

ROOT = Path(__file__).resolve().parent.parent


def run(args: argparse.Namespace) -> str:
    sys.path.insert(0, str(ROOT))
    import dataclasses

    import torch

    from rlsd.config import load_config
    from rlsd.data import PromptRenderer, load_records
    from rlsd.models import load_model, pick_device, pick_dtype, stop_token_ids
    from rlsd.rollout import sample_completions
    from rlsd.tracking import quiet_libraries

    quiet_libraries(debug=False)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", {**overrides, "model.lora": "false"})
    device = pick_device(cfg.model)
    lm, tokenizer = load_model(cfg.model, pick_dtype(cfg.model, device))
    lm = lm.to(device).eval()
    renderer = PromptRenderer(cfg.data, tokenizer)
    prompts = [renderer.student_ids(r) for r in load_records(cfg.data)[: args.prompts]]
    stops = stop_token_ids(lm, tokenizer)
    variants = (
        {"multinomial": multinomial_draws, "inverse-cdf": nullcontext}
        if args.sampler
        else {"generate": nullcontext, "own": nullcontext}
    )
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for repeat in range(args.repeats + 1):
        for name, context in variants.items():
            rollout = dataclasses.replace(
                cfg.rollout,
                decoder="generate" if name == "generate" else "own",
                max_new_tokens=args.max_new,
                num_generations=args.group,
            )
            torch.manual_seed(repeat)
            start = time.perf_counter()
            with context():
                batch = sample_completions(
                    lm, prompts, rollout, tokenizer.pad_token_id, stops, device
                )
            seconds = time.perf_counter() - start
            if repeat:  # the first round warms up
                results[name].append((seconds, batch.completion_mask.sum().item()))
    lines = [
        f"# Rollout {'samplers' if args.sampler else 'decoders'}, {args.prompts} prompts x "
        f"{args.group} samples, max {args.max_new} new tokens ({platform.machine()}, "
        f"{torch.get_num_threads()} threads, {cfg.model.dtype} on {device}, {date.today()})",
        "",
        "| decoder | s/batch (median) | completion tokens/s | mean length |",
        "|---|---|---|---|",
    ]
    speed = {}
    for decoder, rows in results.items():
        seconds = statistics.median(s for s, _ in rows)
        speed[decoder] = statistics.median(n / s for s, n in rows)
        length = statistics.mean(n for _, n in rows) / (args.prompts * args.group)
        lines.append(f"| {decoder} | {seconds:.2f} | {speed[decoder]:.1f} | {length:.1f} |")
    first, second = results
    lines += [
        "",
        f"{second} / {first} tokens per second: **{speed[second] / speed[first]:.2f}x**",
        "",
        f"Command: `python benchmarks/decode_bench.py {' '.join(sys.argv[1:])}`",
    ]
    return "\n".join(lines) + "\n"


def multinomial_draws() -> Any:
    """The own decoder drawing with torch.multinomial instead of rlsd's sampler."""
    import torch

    return patch(
        "rlsd.decode.sample_rows", lambda probs: torch.multinomial(probs.float(), 1).squeeze(-1)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default="cpu2", help="machine name in the result file")
    parser.add_argument("--sampler", action="store_true", help="multinomial vs inverse-CDF draw")
    args = parser.parse_args()
    text = run(args)
    print(text)
    kind = "decode-sampler" if args.sampler else "decode"
    out = ROOT / "benchmarks" / "results" / f"{kind}-{args.name}-{date.today()}.md"
    out.write_text(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
