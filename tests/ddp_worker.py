"""Launched by tests/test_distributed.py as one of several processes (accelerate launch).

ddp_worker.py train OVERRIDES.json OUT.json
    the real `rlsd.step.trainer.train`, with a digest of the trainable weights gathered from every
    process after each step (they must be identical everywhere)
ddp_worker.py equiv OVERRIDES.json OUT.safetensors
    one update on a fixed batch of B prompts, split over the processes; the main process
    writes the all-reduced gradients and the updated weights
ddp_worker.py equiv-idle OVERRIDES.json OUT.safetensors
    the same, with equal rewards in every group of the batch's second half: under 2 processes
    the second one has no trained row
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from rlsd.engine.data import Record
from rlsd.engine.distributed import leave, shard, world
from rlsd.engine.rollout import Batch, left_pad
from rlsd.schema.config import load_config
from rlsd.step import trainer
from rlsd.step.records import Rollout


def trainable(run) -> dict[str, torch.Tensor]:
    model = run.accelerator.unwrap_model(run.scorer)
    return {
        name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad
    }


def digest(run) -> str:
    sha = hashlib.sha256()
    for name, tensor in sorted(trainable(run).items()):
        sha.update(name.encode() + tensor.float().numpy().tobytes())
    return sha.hexdigest()


def train_mode(overrides: dict, out: Path) -> None:
    from accelerate.utils import gather_object

    seen: list[dict] = []
    original = trainer.train_step

    def step_and_check(run, step):
        metrics = original(run, step)
        seen.append(
            {
                "step": step,
                "digests": gather_object([digest(run)]),
                "memories": gather_object(
                    [json.dumps(run.memory.state_dict()) if run.memory is not None else ""]
                ),
                "rank": run.accelerator.process_index,
            }
        )
        return metrics

    trainer.train_step = step_and_check
    run_dir = trainer.train(load_config(None, overrides))
    if seen and seen[0]["rank"] == 0:
        out.write_text(json.dumps({"run_dir": str(run_dir), "steps": seen}))


def fixed_batch(run, records: list[Record], group: int) -> tuple[Batch, torch.Tensor]:
    """Completions and rewards that do not depend on sampling: the same on any process count."""
    gen = torch.Generator().manual_seed(7)
    prompts = [run.renderer.student_ids(r) for r in records for _ in range(group)]
    p_ids, p_mask = left_pad(prompts, run.tokenizer.pad_token_id)
    n, width = len(prompts), 10
    ids = torch.randint(3, len(run.tokenizer) - 1, (n, width), generator=gen)
    lengths = torch.randint(2, width + 1, (n,), generator=gen)
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    ids = torch.where(mask, ids, torch.full_like(ids, run.tokenizer.pad_token_id))
    rewards = torch.rand(n, generator=gen).round()
    rewards[:group] = torch.tensor([1.0] + [0.0] * (group - 1))  # never an all-equal group 0
    return Batch(p_ids, p_mask, ids, mask), rewards


def capture_gradients(run, convert) -> dict[str, torch.Tensor]:
    """The trainable parameters' gradients, as `convert` makes them, recorded at each optimizer
    step (the dict returned is filled in place) just before the step applies them."""
    grads: dict[str, torch.Tensor] = {}
    model = run.accelerator.unwrap_model(run.scorer)
    step_fn = run.optimizer.step

    def capture_then_step(*args, **kwargs):
        grads.update(
            {f"grad.{n}": convert(p.grad) for n, p in model.named_parameters() if p.requires_grad}
        )
        return step_fn(*args, **kwargs)

    run.optimizer.step = capture_then_step
    return grads


def learn_on_shard(run, updates: int = 1, idle: bool = False) -> None:
    """`updates` updates (`trainer.learn`) on one fixed batch of the step's prompts, split over
    the processes. With `idle`, the second half's groups have equal rewards, so a second
    process has no row to train (it joins each update with a zero loss)."""
    group, prompts = run.cfg.rollout.num_generations, run.cfg.train.prompts_per_step
    everything = run.records[:prompts]
    batch, rewards = fixed_batch(run, everything, group)
    if idle:
        rewards[len(rewards) // 2 :] = 1.0  # equal rewards: no advantage, no trained row
    rank, size = world(run.accelerator)
    rows = torch.tensor(shard(list(range(len(rewards))), rank, size))
    local = batch.select(rows)
    correct = [bool(r) for r in rewards[rows]]
    for update in range(1, updates + 1):
        now = time.perf_counter()
        group_rollout = Rollout(
            shard(everything, rank, size), local, [""] * len(rows), rewards[rows], correct, group
        )
        trainer.learn(run, update, group_rollout, {"start": now, "generate": now, "reward": now})


def equiv_mode(overrides: dict, out: Path, idle_half: bool = False) -> None:
    from safetensors.torch import save_file

    run = trainer.setup(load_config(None, overrides))
    grads = capture_gradients(run, lambda grad: grad.detach().cpu().clone())
    learn_on_shard(run, idle=idle_half)
    if run.accelerator.is_main_process:
        save_file({**grads, **{f"param.{k}": v for k, v in trainable(run).items()}}, out)


if __name__ == "__main__":
    faulthandler.enable()  # a crash prints every thread's Python stack (CI logs)
    mode, overrides, out = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
    torch.set_num_threads(1)
    modes = {
        "train": train_mode,
        "equiv": equiv_mode,
        "equiv-idle": lambda o, p: equiv_mode(o, p, idle_half=True),
    }
    modes[mode](overrides, out)
    leave(0)  # the process group ended, then out without finalization (rlsd.engine.distributed)
