"""Launched by tests/test_fsdp.py, as one of 2 processes under torchrun or as 1 plain process.

fsdp_worker.py train SPEC.json OUT.json
    the real `rlsd.step.trainer.train`; after each step the whole trainable weights (gathered from
    the shards) are digested, and each process's shard shapes recorded; the main process
    writes OUT.json and the last step's whole weights next to it (OUT.safetensors)
fsdp_worker.py equiv SPEC.json OUT.safetensors
    SPEC["updates"] updates (`trainer.learn`) on one fixed batch of B prompts, split over the
    processes; with SPEC["idle"] the second half's groups have equal rewards, so a second
    process has no row to train (it joins each update with a zero loss). The main process
    writes the whole gradients of the last update and the weights after it, and OUT.json:
    per process, the bytes it holds of parameters, gradients (at the optimizer step), AdamW
    state and frozen model copies (a DTensor's local shard, a tensor whole)

SPEC.json: {"config": {dotted overrides}, ...}; in train mode, "pause": {"step": S, "marker":
PATH} stops every process in step S after the update's first optimizer step, to be killed
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from rlsd.engine.distributed import leave
from rlsd.schema.config import load_config
from rlsd.step import trainer
from tests.ddp_worker import capture_gradients, learn_on_shard


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
    if "pause" in spec:
        pause_in_step(**spec["pause"])
    run_dir = trainer.train(load_config(None, spec["config"]))
    if seen and seen[0]["rank"] == 0:
        out.write_text(json.dumps({"run_dir": str(run_dir), "steps": seen}))
        save_file(last, out.with_suffix(".safetensors"))


def pause_in_step(step: int, marker: str) -> None:
    """In step `step`, after the update's first optimizer step (the weights in memory differ
    from every checkpoint), each process writes its process id to MARKER-RANK and sleeps, to
    be killed (torchrun starts each worker in a session of its own)."""
    original = trainer.optimise

    def optimise_and_pause(policy, method, cfg, now, *args):
        if now == step:
            step_fn = policy.optimizer.step

            def step_then_sleep(*a, **kw):
                step_fn(*a, **kw)
                rank = policy.accelerator.process_index
                Path(f"{marker}-{rank}").write_text(str(os.getpid()))
                time.sleep(120)
                raise SystemExit(f"rank {rank} was not killed in step {now}")

            policy.optimizer.step = step_then_sleep
        return original(policy, method, cfg, now, *args)

    trainer.optimise = optimise_and_pause


def local_bytes(tensors) -> int:
    """Bytes this process holds of the tensors: a DTensor's local shard, a tensor whole."""
    total = 0
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            mine = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            total += mine.numel() * mine.element_size()
    return total


def count_gradients(run, held: dict[str, int]) -> None:
    """held["gradients"]: the bytes of the gradients each optimizer step applies."""
    model = run.accelerator.unwrap_model(run.scorer)
    step_fn = run.optimizer.step

    def count_then_step(*args, **kwargs):
        held["gradients"] = local_bytes(p.grad for p in model.parameters() if p.requires_grad)
        return step_fn(*args, **kwargs)

    run.optimizer.step = count_then_step


def held_bytes(run, held: dict[str, int]) -> list[dict[str, int]]:
    """Per process (in rank order): the bytes of the policy's parameters, gradients and AdamW
    state, and of the frozen model copies the teacher and KL reference keep."""
    from accelerate.utils import gather_object

    model = run.accelerator.unwrap_model(run.scorer)
    held["parameters"] = local_bytes(model.parameters())
    held["optimizer"] = local_bytes(
        value for state in run.optimizer.state.values() for value in state.values()
    )
    teachers = [t for t in (run.teacher, run.reference) if t is not None]
    copies = {id(t.copy): t.copy for t in teachers if t.copy is not None}
    held["copies"] = sum(local_bytes(c.parameters()) for c in copies.values())
    return gather_object([held]) if run.accelerator.num_processes > 1 else [held]


def equiv_mode(spec: dict, out: Path) -> None:
    from safetensors.torch import save_file

    run = trainer.setup(load_config(None, spec["config"]))
    grads = capture_gradients(run, whole)
    held: dict[str, int] = {}
    count_gradients(run, held)
    learn_on_shard(run, spec.get("updates", 1), spec.get("idle", False))
    weights = trainable(run)
    every = held_bytes(run, held)
    if run.accelerator.is_main_process:
        save_file({**grads, **{f"param.{k}": v for k, v in weights.items()}}, out)
        out.with_suffix(".json").write_text(json.dumps(every))


if __name__ == "__main__":
    faulthandler.enable()  # a crash prints every thread's Python stack (CI logs)
    mode, spec, out = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
    torch.set_num_threads(1)
    {"train": train_mode, "equiv": equiv_mode}[mode](spec, out)
    leave(0)  # the process group ended, then out without finalization (rlsd.engine.distributed)
