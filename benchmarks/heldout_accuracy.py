"""Greedy held-out accuracy of the base model and of trained runs (their latest checkpoint).

    python benchmarks/heldout_accuracy.py RUN_DIR [RUN_DIR ...] [--n 128]

Held-out items are generated with another reasoning-gym seed and exclude every training
question. Prints a markdown table (strict = the run's first verifier; lenient = the last number
of the reply equals the answer).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlsd.engine.data import load_records
from rlsd.engine.models import load_model, pick_device, pick_dtype, stop_token_ids
from rlsd.schema.config import load_config
from rlsd.step.evaluate import greedy_accuracy, heldout_records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--n", type=int, default=128)
    args = parser.parse_args()
    cfg = load_config(args.runs[0] / "config.yaml")
    device = pick_device(cfg.model)
    train_records = load_records(cfg.data)
    candidates = load_records(replace(cfg.data, seed=cfg.data.seed + 7919, size=4 * args.n))
    items = heldout_records(train_records, candidates, args.n)
    rows = []
    base, tokenizer = load_model(replace(cfg.model, lora=False), pick_dtype(cfg.model, device))
    base.to(device).eval()
    stops = stop_token_ids(base, tokenizer)
    targets = [("base model", None)] + [(str(r), r) for r in args.runs]
    for name, run in targets:
        lm = base
        if run is not None:
            from peft import PeftModel

            ckpt = run / (run / "latest").read_text().strip()
            lm = PeftModel.from_pretrained(base, ckpt).eval()
        t0 = time.perf_counter()
        res = greedy_accuracy(cfg, lm, tokenizer, items, stops, device)
        rows.append((name, res, time.perf_counter() - t0))
        if run is not None:
            base = lm.unload()  # back to the plain base model for the next run
    print("| model | strict accuracy | lenient accuracy | n | seconds |\n|---|---|---|---|---|")
    for name, res, secs in rows:
        print(
            f"| {name} | {res['accuracy']:.3f} | {res['lenient_accuracy']:.3f} | {res['n']} | "
            f"{secs:.0f} |"
        )
    print(
        "\nexample completions:", *[f"{n}: {r['completions'][0]!r}" for n, r, _ in rows], sep="\n"
    )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
