"""Rebuild a study's warm-started model from its committed LoRA adapter, bit for bit.

    python benchmarks/warm_model.py [--adapter benchmarks/results/study-chain/warm-model]
                                    [--out runs/sft-chain/model]

`rlsd sft` is deterministic on one machine, but not across machines: on a fresh CPU the chain
study's warm start came out slightly different (501 of 512 held-out greedy answers the same,
62.7 % against 63.3 %), because float sums round differently there. A study that runs across
several sessions on fresh machines must start every run from the same model, so the adapter of
the warm start is committed (ADAPTER/adapter_model.safetensors and adapter_config.json) and this
script merges it into the packaged base model (ADAPTER/merged.json names it) and writes the
model directory `rlsd train --model.name` reads, with the base model's tokenizer. The merged
weights' digest must equal the one in merged.json, else it stops: a different base model or peft
would otherwise change the study's starting point unnoticed. `--record` writes merged.json
instead (once, when the adapter is committed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def weights_digest(state: dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def merge(adapter: Path, base: str, out: Path) -> str:
    """Merge `adapter` into model `base` (an rlsd model name or directory), write the result
    and the base's tokenizer to `out`; returns the merged weights' digest."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlsd.engine.models import resolve_model_path

    base_dir = resolve_model_path(base)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return weights_digest(merged.state_dict())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    adapter = ROOT / "benchmarks/results/study-chain/warm-model"
    parser.add_argument("--adapter", type=Path, default=adapter)
    parser.add_argument("--out", type=Path, default=Path("runs/sft-chain/model"))
    parser.add_argument("--base", default=None, help="the base model (default: merged.json's)")
    parser.add_argument("--record", action="store_true", help="write merged.json, check nothing")
    args = parser.parse_args(argv)
    record_path = args.adapter / "merged.json"
    record = {} if args.record else json.loads(record_path.read_text())
    base = args.base or record.get("base")
    if not base:
        parser.error(f"--base is needed: {record_path} names no base model")
    digest = merge(args.adapter, base, args.out)
    if args.record:
        record = {"base": base, "weights_sha256": digest}
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"recorded {record_path}: {digest}")
        return 0
    if digest != record["weights_sha256"]:
        print(
            f"{args.out}: the merged weights' digest {digest} is not the one in {record_path} "
            f"({record['weights_sha256']}): a different base model or peft version; the study "
            "would not start from its warm model",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {args.out} (weights sha256 {digest}, as recorded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
