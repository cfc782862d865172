"""What changes when several processes train together (accelerate DDP; `accelerate launch` or
`torchrun`). With one process every function here is the identity. The same holds with the
policy sharded by FSDP2 (`train.sharding: fsdp`); what changes then is in `sharding.py`.

- Each process takes a contiguous shard of the step's prompts (all G samples of a prompt stay on
  one process, so group advantages need no communication).
- The loss denominator is the global one, divided by the number of processes: DDP averages the
  gradients, so the update equals one process training on the whole batch.
- Every process makes the same number of synchronised backward passes per update (a process with
  no trained rows makes one zero-loss pass), so uneven shards never deadlock.
- Metrics are reduced across processes: per-completion means as means over equal shards,
  per-token statistics weighted by each process's trained tokens, times and memory as maxima.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import torch

T = TypeVar("T")
MAXIMA = ("perf/", "completion/length_max", "train/nonfinite")  # the slowest / largest process
SUMS = ("perf/completion_tokens_per_second", "compute/")  # each process's own work adds up
TOKEN_WEIGHTED = ("policy/entropy", "policy/clip_frac", "teacher/", "rlsd/", "opsd/")


def end_process_group(clean: bool = True) -> None:
    """Destroy the default process group, if one was started: the documented way to end a
    process's part in it, called as an `rlsd` command ends (never between runs in one process).
    With `clean` (a normal exit) the processes first meet at a barrier, so none tears down a
    group a peer still uses; after an error there is no barrier (a peer may be gone). A launched
    process then leaves through `leave`, which this alone cannot replace (see there)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End a launched process: its process group (`end_process_group`, with the barrier when
    `code` is 0), then out through `os._exit` once stdout, stderr and the logs are flushed.
    Destroying a group only unregisters it while FSDP2's device mesh still holds it, and a gloo
    group torn down in interpreter finalization can abort a process whose work is done
    (SIGABRT, "terminate called without an active exception"; about one launch in thirty in
    the FSDP tests). Every file rlsd writes is closed before this point."""
    import logging
    import os
    import sys

    end_process_group(clean=code == 0)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def world(accelerator: Any) -> tuple[int, int]:
    """(this process's rank, number of processes)."""
    return accelerator.process_index, accelerator.num_processes


def shard(items: list[T], rank: int, size: int) -> list[T]:
    """The rank's contiguous share of items (len(items) must divide by size)."""
    if len(items) % size:
        raise ValueError(f"{len(items)} items do not split over {size} processes")
    per = len(items) // size
    return items[rank * per : (rank + 1) * per]


def total(accelerator: Any, value: float) -> float:
    """The sum of a number over all processes."""
    if accelerator.num_processes == 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(tensor, "sum").item())


def anywhere(accelerator: Any, flag: bool) -> bool:
    """True when the flag is true on any process."""
    return total(accelerator, float(bool(flag))) > 0


def from_main(accelerator: Any, compute: Callable[[], T]) -> T:
    """Run compute() on the main process only and hand its result (or its exception, raised
    again on every process) to all processes."""
    if accelerator.num_processes == 1:
        return compute()
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            box[0] = ("ok", compute())
        except Exception as exc:  # every process must leave with the same error
            box[0] = ("error", exc)
    broadcast_object_list(box)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def reduce_metrics(accelerator: Any, metrics: dict[str, float], tokens: float) -> dict[str, float]:
    """Combine each process's metrics into the step's (see the module docstring). A metric a
    process did not log (e.g. no trained rows there) does not count towards its mean. Text
    values (e.g. perf/peak_mem_scope) are the same on every process and pass through."""
    if accelerator.num_processes == 1:
        return metrics
    from accelerate.utils import gather_object

    texts = {k: v for k, v in metrics.items() if isinstance(v, str)}
    metrics = {k: v for k, v in metrics.items() if k not in texts}

    keys = sorted({k for part in gather_object([sorted(metrics)]) for k in part})
    values, weights = [], []
    for key in keys:
        here = key in metrics
        weight = tokens if key.startswith(TOKEN_WEIGHTED) else 1.0
        values.append(metrics[key] * weight if here else 0.0)
        weights.append(weight if here else 0.0)
    device = accelerator.device
    stacked = torch.tensor([values, weights], dtype=torch.float64, device=device)
    sums = accelerator.reduce(stacked, "sum")
    biggest = torch.tensor(
        [metrics.get(k, float("-inf")) for k in keys], dtype=torch.float64, device=device
    )
    torch.distributed.all_reduce(biggest, op=torch.distributed.ReduceOp.MAX)
    out = {}
    for i, key in enumerate(keys):
        if key.startswith(MAXIMA):
            out[key] = float(biggest[i])
        elif key.startswith(SUMS):
            out[key] = float(sums[0, i])
        else:
            out[key] = float(sums[0, i] / sums[1, i]) if sums[1, i] > 0 else 0.0
    if "step" in metrics:
        out["step"] = metrics["step"]
    return {**out, **texts}
