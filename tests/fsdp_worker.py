"""Launched by tests/test_fsdp.py, as one of 2 processes under torchrun or as 1 plain process.

fsdp_worker.py train SPEC.json OUT.json
    the real `rlsd.trainer.train`; after each step the whole trainable weights (gathered from
    the shards) are digested, and each process's shard shapes recorded; the main process
    writes OUT.json and the last step's whole weights next to it (OUT.safetensors)
fsdp_worker.py equiv SPEC.json OUT.safetensors
    SPEC["updates"] updates (`trainer.learn`) on one fixed batch of B prompts, split over the
    processes; with SPEC["idle"] the second half's groups have equal rewards, so a second
    process has no row to train (it joins each update with a zero loss). The main process
    writes the whole gradients of the last update and the weights after it.

SPEC.json: {"config": {dotted overrides}, ...}
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from rlsd import trainer
from rlsd.config import load_config
from rlsd.distributed import shard, world
from tests.ddp_worker import capture_gradients, fixed_batch


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every process calls it, in the same order)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


def trainable(run) -> dict[str, torch.Tensor]:
    model = run.accelerator.unwrap_model(run.scorer)
    return {n: whole(p).clone() for n, p in model.named_parameters() if p.requires_grad}


def shapes(run) -> dict[str, list[list[int]]]:
    """{name: [global shape, this process's shard shape]} of the DTensor parameters."""
    return {
        n: [list(p.shape), list(p.to_local().shape)]
        for n, p in run.scorer.named_parameters()
        if isinstance(p, DTensor)
    }


def digest(weights: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for name, tensor in sorted(weights.items()):
        sha.update(name.encode() + tensor.float().numpy().tobytes())
    return sha.hexdigest()


def train_mode(spec: dict, out: Path) -> None:
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    seen: list[dict] = []
    last: dict[str, torch.Tensor] = {}
    original = trainer.train_step

    def step_and_record(run, step):
        metrics = original(run, step)
        last.clear()
        last.update(trainable(run))
        seen.append(
            {
                "step": step,
                "digest": digest(last),
                "shapes": gather_object([shapes(run)]),
                "rank": run.accelerator.process_index,
            }
        )
        return metrics

    trainer.train_step = step_and_record
    run_dir = trainer.train(load_config(None, spec["config"]))
    if seen and seen[0]["rank"] == 0:
        out.write_text(json.dumps({"run_dir": str(run_dir), "steps": seen}))
        save_file(last, out.with_suffix(".safetensors"))


def equiv_mode(spec: dict, out: Path) -> None:
    from safetensors.torch import save_file

    run = trainer.setup(load_config(None, spec["config"]))
    group, prompts = run.cfg.rollout.num_generations, run.cfg.train.prompts_per_step
    everything = run.records[:prompts]
    batch, rewards = fixed_batch(run, everything, group)
    if spec.get("idle"):
        rewards[len(rewards) // 2 :] = 1.0  # equal rewards: no advantage, no trained row
    rank, size = world(run.accelerator)
    rows = torch.tensor(shard(list(range(len(rewards))), rank, size))
    grads = capture_gradients(run, whole)
    local = batch.select(rows)
    correct = [bool(r) for r in rewards[rows]]
    for update in range(1, spec["updates"] + 1):
        now = time.perf_counter()
        trainer.learn(
            run,
            update,
            shard(everything, rank, size),
            local,
            [""] * len(rows),
            rewards[rows],
            correct,
            {},
            {"start": now, "generate": now, "reward": now},
        )
    weights = trainable(run)
    if run.accelerator.is_main_process:
        save_file({**grads, **{f"param.{k}": v for k, v in weights.items()}}, out)


if __name__ == "__main__":
    mode, spec, out = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
    torch.set_num_threads(1)
    {"train": train_mode, "equiv": equiv_mode}[mode](spec, out)
