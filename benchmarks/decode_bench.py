"""Rollout throughput: rlsd's own KV-cache decoder against transformers' `generate`, side by side.

    python benchmarks/decode_bench.py [--prompts 8] [--group 4] [--max-new 64] [--repeats 3]

Both decoders sample the same quick-start prompts (SmolLM2-135M-Instruct, fp32 CPU unless
--set model.dtype=...) in one process, alternating, `--repeats` times each after one warm-up
call each. Reported: median seconds per batch, completion tokens per second, the ratio, and the
mean completion length (the decoders draw different random numbers, so lengths differ a little;
tokens per second accounts for it). Results go to benchmarks/results/decode-<machine>-<date>.md.

    python benchmarks/decode_bench.py --lora      # LoRA adapter: unmerged vs folded in

With `--lora` the model carries the quick start's LoRA adapter (r 16 on every projection, B
filled with small random values as after training) and the own decoder runs it two ways: the
adapter path computed at every token (`lora-unmerged`), and folded into the weights for the
rollout as training does (`lora-merged`, `rlsd.models.merged_lora`); the same random draws.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from datetime import date
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest.mock import patch

ROOT = Path(__file__).resolve().parent.parent


def run(args: argparse.Namespace) -> str:
    sys.path.insert(0, str(ROOT))
    import dataclasses

    import torch

    from rlsd.cli import quiet_libraries
    from rlsd.config import load_config
    from rlsd.data import PromptRenderer, load_records
    from rlsd.models import load_model, pick_device, pick_dtype, stop_token_ids
    from rlsd.rollout import sample_completions

    quiet_libraries(debug=False)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      {**overrides, "model.lora": str(args.lora).lower()})
    device = pick_device(cfg.model)
    lm, tokenizer = load_model(cfg.model, pick_dtype(cfg.model, device))
    lm = lm.to(device).eval()
    renderer = PromptRenderer(cfg.data, tokenizer)
    prompts = [renderer.student_ids(r) for r in load_records(cfg.data)[:args.prompts]]
    stops = stop_token_ids(lm, tokenizer)
    variants = lora_variants(lm) if args.lora else {"generate": nullcontext, "own": nullcontext}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for repeat in range(args.repeats + 1):
        for name, context in variants.items():
            rollout = dataclasses.replace(cfg.rollout, decoder="generate" if name == "generate"
                                          else "own", max_new_tokens=args.max_new,
                                          num_generations=args.group)
            torch.manual_seed(repeat)
            start = time.perf_counter()
            with context(lm):
                batch = sample_completions(lm, prompts, rollout, tokenizer.pad_token_id, stops,
                                           device)
            seconds = time.perf_counter() - start
            if repeat:  # the first round warms up
                results[name].append((seconds, batch.completion_mask.sum().item()))
    lines = [f"# Rollout {'LoRA decoding' if args.lora else 'decoders'}, {args.prompts} prompts x {args.group} samples, max "
             f"{args.max_new} new tokens ({platform.machine()}, {torch.get_num_threads()} "
             f"threads, {cfg.model.dtype} on {device}, {date.today()})", "",
             "| decoder | s/batch (median) | completion tokens/s | mean length |",
             "|---|---|---|---|"]
    speed = {}
    for decoder, rows in results.items():
        seconds = statistics.median(s for s, _ in rows)
        speed[decoder] = statistics.median(n / s for s, n in rows)
        length = statistics.mean(n for _, n in rows) / (args.prompts * args.group)
        lines.append(f"| {decoder} | {seconds:.2f} | {speed[decoder]:.1f} | {length:.1f} |")
    first, second = list(speed)
    lines += ["", f"{second} / {first} tokens per second: **{speed[second] / speed[first]:.2f}x**",
              "", f"Command: `python benchmarks/decode_bench.py {' '.join(sys.argv[1:])}`"]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def unmerged(model: Any) -> Iterator[None]:
    """sample_completions folds the adapter in; this keeps it out (the adapter at every token)."""
    with patch("rlsd.rollout.merged_lora", nullcontext):
        yield


def lora_variants(lm: Any) -> dict[str, Callable]:
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an adapter as after training (B starts at zero)
        for name, param in lm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return {"lora-unmerged": unmerged, "lora-merged": nullcontext}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default="cpu2", help="machine name in the result file")
    parser.add_argument("--lora", action="store_true", help="LoRA adapter unmerged vs merged")
    args = parser.parse_args()
    text = run(args)
    print(text)
    kind = "decode-lora" if args.lora else "decode"
    out = ROOT / "benchmarks" / "results" / f"{kind}-{args.name}-{date.today()}.md"
    out.write_text(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
