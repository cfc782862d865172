"""Rollout throughput: rlsd's own decoders against transformers' `generate`, side by side.

    python benchmarks/decode_bench.py [--prompts 8] [--group 4] [--max-new 64] [--repeats 3]
    python benchmarks/decode_bench.py --smoke   # 2 prompts x 2, 8 new tokens, one round, no file

The decoders sample the same quick-start prompts (SmolLM2-135M-Instruct, fp32 CPU unless
--set model.dtype=...) in one process, alternating, `--repeats` times each after one warm-up
round: `generate`, `own` (the eager KV-cache decoder, `rollout.decoder: own`) and `static` (the
same on a static cache, `decode_static.py`); on CUDA also `graph` (static with CUDA graphs) and
`generate-static` (`generate` with `cache_implementation="static"`). On CUDA the defaults are
the issue-24 grid: 16 and 64 prompts x 8 samples, 64 and 512 new tokens (`--prompts` and
`--max-new` take several values; one table per shape). Reported: median seconds per batch,
completion tokens per second, its ratio to `own`, and the mean completion length (the decoders
draw different random numbers, so lengths differ a little; tokens per second accounts for it).
Results go to benchmarks/results/decode-<machine>-<date>.md.

    python benchmarks/decode_bench.py --sampler   # the own decoder's draw: multinomial vs ours

With `--sampler` the own decoder runs twice per round, drawing each token with
`torch.multinomial` (an exponential number per vocabulary entry) and with rlsd's inverse-CDF
draw (`rlsd.engine.decode.sample_rows`, one uniform number per row); results go to
benchmarks/results/decode-sampler-<machine>-<date>.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import date
from pathlib import Path
from typing import Any
from unittest.mock import patch

ROOT = Path(__file__).resolve().parent.parent


def run(args: argparse.Namespace) -> str:
    sys.path.insert(0, str(ROOT))
    import torch

    from rlsd.engine.data import PromptRenderer, load_records
    from rlsd.engine.models import load_model, pick_device, pick_dtype, stop_token_ids
    from rlsd.schema.config import load_config
    from rlsd.step.tracking import quiet_libraries

    quiet_libraries(debug=False)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", {**overrides, "model.lora": "false"})
    device = pick_device(cfg.model)
    lm, tokenizer = load_model(cfg.model, pick_dtype(cfg.model, device))
    lm = lm.to(device).eval()
    cuda = device.type == "cuda"
    shapes = grid(args, cuda)
    renderer = PromptRenderer(cfg.data, tokenizer)
    records = load_records(cfg.data)[: max(p for p, _, _ in shapes)]
    prompts = [renderer.student_ids(r) for r in records]
    stops = stop_token_ids(lm, tokenizer)
    lines = [
        f"# Rollout {'samplers' if args.sampler else 'decoders'} ({platform.machine()}, "
        f"{torch.get_num_threads()} threads, {cfg.model.dtype} on {device}, {date.today()})"
    ]
    for count, group, max_new in shapes:
        results = measure(
            lm,
            prompts[:count],
            cfg.rollout,
            variants(args, cuda, lm),
            args,
            (group, max_new, tokenizer.pad_token_id, stops, device),
        )
        lines += table(results, count, group, max_new)
    lines += ["", f"Command: `python benchmarks/decode_bench.py {' '.join(sys.argv[1:])}`"]
    return "\n".join(lines) + "\n"


def grid(args: argparse.Namespace, cuda: bool) -> list[tuple[int, int, int]]:
    """(prompts, group, max new tokens) of each table: the flags, else the defaults (the
    issue-24 grid on CUDA, one short shape on the CPU, a tiny one with --smoke)."""
    if args.smoke:
        return [(2, 2, 8)]
    prompts = args.prompts or ([16, 64] if cuda else [8])
    max_new = args.max_new or ([64, 512] if cuda else [64])
    group = args.group or (8 if cuda else 4)
    return [(p, group, m) for p in prompts for m in max_new]


def variants(args: argparse.Namespace, cuda: bool, lm: Any) -> dict[str, tuple[str, Any]]:
    """name -> (rollout.decoder, context to run it in)."""
    if args.sampler:
        return {"multinomial": ("own", multinomial_draws), "inverse-cdf": ("own", nullcontext)}
    names = {name: (name, nullcontext) for name in ("generate", "own", "static")}
    if cuda:
        names["generate-static"] = ("generate", lambda: static_generate(lm))
        names["graph"] = ("graph", nullcontext)
    return names


def measure(lm, prompts, rollout, named, args, shape) -> dict[str, list[tuple[float, float]]]:
    """(seconds, completion tokens) of each variant's batches, alternating, after a warm-up."""
    import dataclasses

    import torch

    from rlsd.engine.rollout import sample_completions

    group, max_new, pad_id, stops, device = shape
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in named}
    for repeat in range(args.repeats + 1):
        for name, (decoder, context) in named.items():
            cfg = dataclasses.replace(
                rollout, decoder=decoder, max_new_tokens=max_new, num_generations=group
            )
            torch.manual_seed(repeat)
            start = time.perf_counter()
            with context():
                batch = sample_completions(lm, prompts, cfg, pad_id, stops, device)
            seconds = time.perf_counter() - start  # the ids come back to the CPU: synced
            if repeat:  # the first round warms up
                results[name].append((seconds, batch.completion_mask.sum().item()))
    return results


def table(results: dict[str, list[tuple[float, float]]], count: int, group: int, max_new: int):
    """A markdown table of one shape's results; tokens per second also as a ratio to `own`'s
    (to the first variant's with --sampler)."""
    base = "own" if "own" in results else next(iter(results))
    lines = [
        "",
        f"## {count} prompts x {group} samples, max {max_new} new tokens",
        "",
        f"| decoder | s/batch (median) | completion tokens/s | vs {base} | mean length |",
        "|---|---|---|---|---|",
    ]
    speed = {name: statistics.median(n / s for s, n in rows) for name, rows in results.items()}
    for decoder, rows in results.items():
        seconds = statistics.median(s for s, _ in rows)
        ratio = speed[decoder] / speed[base]
        length = statistics.mean(n for _, n in rows) / (count * group)
        lines.append(
            f"| {decoder} | {seconds:.2f} | {speed[decoder]:.1f} | {ratio:.2f}x | {length:.1f} |"
        )
    return lines


def multinomial_draws() -> Any:
    """The own decoder drawing with torch.multinomial instead of rlsd's sampler."""
    import torch

    return patch(
        "rlsd.engine.decode.sample_rows",
        lambda probs: torch.multinomial(probs.float(), 1).squeeze(-1),
    )


def static_generate(lm: Any) -> Any:
    """`generate` with a static cache (`cache_implementation="static"`) while in the block."""

    @contextmanager
    def context() -> Any:
        saved = lm.generation_config.cache_implementation
        lm.generation_config.cache_implementation = "static"
        try:
            yield
        finally:
            lm.generation_config.cache_implementation = saved

    return context()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, nargs="+", help="default 8; CUDA: 16 64")
    parser.add_argument("--group", type=int, help="default 4; CUDA: 8")
    parser.add_argument("--max-new", type=int, nargs="+", help="default 64; CUDA: 64 512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny shape, one round, no file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default="cpu2", help="machine name in the result file")
    parser.add_argument("--sampler", action="store_true", help="multinomial vs inverse-CDF draw")
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    text = run(args)
    print(text)
    if args.smoke:
        return
    kind = "decode-sampler" if args.sampler else "decode"
    out = ROOT / "benchmarks" / "results" / f"{kind}-{args.name}-{date.today()}.md"
    out.write_text(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
