"""FSDP2 sharding of the policy (`train.sharding: fsdp`): each process holds 1/N of it.

Every transformer block of the policy and the root (the `TokenScorer` around it, so the
embeddings, final norm and LM head form the root's group) are wrapped with
`torch.distributed.fsdp.fully_shard` on a 1-D device mesh over all processes (gloo on the CPU,
NCCL on GPUs). Weights, gradients and AdamW state are DTensor shards; with LoRA only the adapter
parameters are trainable and in the optimizer (the frozen base weights are sharded as well).
On CUDA the shards are fp32 and FSDP2 computes in bf16 and reduces gradients in fp32
(`MixedPrecisionPolicy`); on the CPU there is no mixed precision.

Processes run different numbers of forward passes (each generates, scores and teaches its own
prompts, and trains its own rows), so nothing here may depend on a collective inside a forward:

- **Whole weights, gathered once a step** (`gathered`, around the whole step in the trainer):
  one all-gather of every block on every process, then no collective in any forward until the
  update. The rollout decodes with the gathered weights, so a process whose prompts finish early
  never waits for another, and no layer is gathered per decoded token; the teacher and KL
  reference passes and the update's first forward use them too (the periodic evaluation
  gathers once more).
- **The update**: the weights stay whole through every micro-batch's forward. accelerate's
  `no_sync` calls `ShardedScorer.no_sync`, which turns FSDP2's gradient reduce-scatter and the
  reshard after backward off: every micro-batch but the last accumulates unsharded gradients
  locally, and the last one (one per process and optimizer step, as with DDP) reduce-scatters,
  in lockstep, and reshards. A process with no rows joins with the zero loss of
  `update.idle_loss`. Gradients are averaged over processes as DDP averages them. A further
  optimizer step of the batch (`train.ppo_epochs`, `train.mini_batches`) gathers the updated
  weights again in its first forward, which every process runs.
- The policy's training forward shares prompts only in the packed layout, one forward
  (`rlsd/engine/packing.py`; `train.share_prefix` applies in full to the passes without gradient):
  the cache layout runs each layer twice in one forward (prefix, then completions), which
  would reduce-scatter its gradient once per use, a different number of times on each process.

**Teachers and the KL reference.** `live` is the policy itself; `frozen` and `sync` with LoRA
use the policy too (the adapter turned off, or the snapshot of the adapter, kept whole, swapped
into the gathered weights). With full fine-tuning each model copy they keep (`frozen_copies`:
the frozen teacher, the sync teacher's snapshot, the KL reference; a frozen teacher's copy
serves as the reference) is deep-copied from the policy before it is sharded and sharded like
it, and so is OPD's external teacher (`shard_frozen`); `gathered` gathers them with the policy
and reshards them with it. The sync snapshot is refreshed shard by shard from the policy's
shards (`refresh_copy`: each process copies its own, then the snapshot, gathered at that
moment, is gathered again), gathered whole into the checkpoint (`teacher.safetensors`, as
without sharding) and re-sharded on resume.

**Memory, measured** (tests/test_fsdp.py, the tiny model, 2 processes, after an update): each
process holds 0.5001 of the parameter + gradient + AdamW bytes of an unsharded process (what
every DDP process holds, besides DDP's gradient buckets) with full fine-tuning, 0.5003 with LoRA
(the frozen base weights are sharded too), and 0.5000 of the frozen copies; what is not sharded
is AdamW's step count (one scalar per parameter) and the buffers (rotary frequencies). A weight
whose first dimension does not split evenly leaves the first process ceil(rows / N) rows. That
is the resting state: during a step every process also holds the whole weights (the policy's and
its copies') and, while micro-batches accumulate, the whole gradients.

Checkpoints hold a full state dict gathered on the main process (`full_state`), in the same
files as an unsharded run (rlsd export and rlsd eval read either); resuming re-shards it
(`shard_optimizer_state`, `like_params`). That gathers the whole model and optimizer state in
the main process's CPU memory: fine for the models rlsd trains today, not for one whose
optimizer state does not fit one machine's memory (that needs `torch.distributed.checkpoint`'s
sharded files).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..schema.config import ConfigError
from .logprobs import TokenScorer
from .models import base_model


class ShardedScorer(TokenScorer):
    """The policy's `TokenScorer` under FSDP2 (`fully_shard` makes it an `FSDPModule`)."""

    gather_seconds = 0.0  # spent gathering whole weights since the last take_gather_seconds
    gathering = False  # inside `gathered`

    def _cache_allowed(self) -> bool:
        return not torch.is_grad_enabled()  # one use of each layer per forward (docstring)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate this micro-batch's gradients without communication (what
        `accelerator.no_sync` calls on a model that has a `no_sync`)."""
        self.set_requires_gradient_sync(False)
        self.set_reshard_after_backward(False)
        try:
            yield
        finally:
            self.set_requires_gradient_sync(True)
            self.set_reshard_after_backward(True)


def is_sharded(module: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def blocks(lm: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: the classes transformers keeps whole when it splits a
    model over devices (`_no_split_modules`), e.g. LlamaDecoderLayer."""
    names = set(getattr(base_model(lm), "_no_split_modules", None) or ())
    found = [m for m in lm.modules() if type(m).__name__ in names]
    if not found:
        raise ConfigError(
            f"train.sharding: fsdp finds no transformer blocks in {type(base_model(lm)).__name__} "
            "(it declares no _no_split_modules); use train.sharding none"
        )
    return found


def process_group(device: torch.device) -> int:
    """The number of processes; a single process launched without torchrun gets a group of
    its own (a mesh of 1)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_world_size()


def _sharded(lm: nn.Module, temperature: float, device: torch.device, mesh: Any) -> ShardedScorer:
    """A scorer around `lm` with every block and the root wrapped with `fully_shard` on
    `mesh`; bf16 compute and fp32 gradient reduction on CUDA."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    precision = MixedPrecisionPolicy()
    if device.type == "cuda":
        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    scorer = ShardedScorer(lm.to(device), temperature=temperature)
    for block in blocks(lm):
        fully_shard(block, mesh=mesh, mp_policy=precision)
    fully_shard(scorer, mesh=mesh, mp_policy=precision)
    # Make the scorer the root now: the first forward is the rollout's, which calls the
    # language model (its blocks), not the scorer. FSDP2 has no public call for this.
    scorer._get_fsdp_state()._lazy_init()
    return scorer


def _mesh(device: torch.device) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (process_group(device),))


def shard_policy(lm: nn.Module, temperature: float, device: torch.device) -> ShardedScorer:
    """The policy's scorer with every block and the root wrapped with `fully_shard` on a 1-D
    mesh over all processes; bf16 compute and fp32 gradient reduction on CUDA."""
    return _sharded(lm, temperature, device, _mesh(device))


def copy_roles(cfg: Any) -> list[str]:
    """Who keeps a frozen copy of the initial policy: with full fine-tuning, the "teacher"
    (frozen or sync) and the KL "reference" (unless the frozen teacher's copy serves, as in
    `run.build_teachers`); nobody with LoRA (the adapter is turned off or swapped instead)."""
    from ..algorithms.method import METHODS

    if cfg.model.lora:
        return []
    mode = cfg.teacher.mode if METHODS[cfg.algorithm.name].teacher == "privileged" else None
    roles = ["teacher"] if mode in ("frozen", "sync") else []
    if cfg.algorithm.kl_coef > 0 and mode != "frozen":
        roles.append("reference")
    return roles


def frozen_copies(cfg: Any, lm: nn.Module, device: torch.device) -> dict[str, ShardedScorer]:
    """FSDP2: {role: frozen copy of the initial policy} (`copy_roles`), each deep-copied from
    the policy before it is sharded and sharded like it; {} without sharding (a `Teacher`
    copies the model itself)."""
    roles = copy_roles(cfg) if cfg.train.sharding == "fsdp" else []
    return {
        role: shard_frozen(copy.deepcopy(lm), cfg.rollout.temperature, device) for role in roles
    }


def shard_frozen(lm: nn.Module, temperature: float, device: torch.device) -> ShardedScorer:
    """A frozen model (a copy of the policy, the external teacher) sharded like the policy, to
    be gathered with it (`gathered`)."""
    return _sharded(lm.eval().requires_grad_(False), temperature, device, _mesh(device))


def _fsdp_modules(scorer: nn.Module) -> list[Any]:
    return [m for m in scorer.modules() if is_sharded(m)]


def _keep_whole(scorer: nn.Module, whole: bool) -> None:
    """Keep the blocks' weights gathered after each forward (whole) or reshard them (FSDP2's
    default for blocks; the root never reshards after forward)."""
    for module in _fsdp_modules(scorer):
        if module is not scorer:
            module.set_reshard_after_forward(not whole, recurse=False)


def _gather(scorer: nn.Module) -> None:
    for module in _fsdp_modules(scorer):  # the same order on every process
        module.unshard()
    _keep_whole(scorer, True)
    scorer.gathering = True


def _release(scorer: nn.Module) -> None:
    scorer.gathering = False
    _keep_whole(scorer, False)
    for module in _fsdp_modules(scorer):
        module.reshard()


def sharded_models(policy: nn.Module, *teachers: Any) -> list[nn.Module]:
    """The sharded models of a run: the policy, then the frozen copies the teachers (the
    method's and the KL reference, `teacher.Teacher` or None) keep (`frozen_copies`) and the
    external teacher, each once; [] without sharding."""
    found: list[nn.Module] = []
    frozen = [getattr(t, name, None) for t in teachers for name in ("copy", "external")]
    for model in (policy, *frozen):
        if model is not None and is_sharded(model) and all(model is not m for m in found):
            found.append(model)
    return found


@contextlib.contextmanager
def gathered(policy: nn.Module, *teachers: Any) -> Iterator[None]:
    """Whole weights on every process, gathered once on entering (every process must enter)
    and resharded on leaving: the policy's and its frozen copies' (`sharded_models`); nothing
    without sharding, or inside another `gathered`.

    Inside, no forward communicates, so processes may run different numbers of them: the
    rollout, the teacher and KL reference passes, the evaluation, and the update, where each
    optimizer step's last backward (one per process) reduce-scatters and reshards and the next
    optimizer step's first forward gathers the updated weights again. So an update must be the
    last thing inside."""
    models = sharded_models(policy, *teachers)
    if not models or policy.gathering:
        yield
        return
    start = time.perf_counter()
    for model in models:
        _gather(model)
    policy.gather_seconds += time.perf_counter() - start
    try:
        yield
    finally:
        for model in models:
            _release(model)


def _shard_params(scorer: nn.Module) -> list[nn.Parameter]:
    """Every parameter's shard (a DTensor), in module order, whether or not the weights are
    gathered at the moment. FSDP2 has no public call for this."""
    return [
        param.sharded_param
        for module in _fsdp_modules(scorer)
        if (group := module._get_fsdp_state()._fsdp_param_group) is not None
        for param in group.fsdp_params
    ]


@torch.no_grad()
def refresh_copy(target: nn.Module, source: nn.Module) -> None:
    """Copy the sharded `source`'s weights into its sharded copy `target` (the sync teacher's
    snapshot): each process copies its own shards; a `target` gathered at the moment is
    gathered again (every process must call this at the same point)."""
    mine, theirs = _shard_params(target), _shard_params(source)
    if len(mine) != len(theirs):
        raise RuntimeError(f"a copy of {len(theirs)} sharded parameters has {len(mine)}")
    for into, value in zip(mine, theirs):
        into.copy_(value)
    if target.gathering:
        _release(target)
        _gather(target)


def take_gather_seconds(policy: nn.Module) -> dict[str, float]:
    """{"perf/gather_seconds": time spent gathering whole weights since the last call} under
    sharding, else {}."""
    if not is_sharded(policy):
        return {}
    seconds, policy.gather_seconds = policy.gather_seconds, 0.0
    return {"perf/gather_seconds": seconds}


def full_state(
    policy: nn.Module, optimizer: Any, lora: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The policy's weights (named as `save_pretrained` names them; with LoRA only the trainable
    ones are gathered) and the optimizer state (numbered as `Optimizer.state_dict` numbers it),
    whole, on the CPU of the main process; empty elsewhere. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)
    weights = get_model_state_dict(policy, options=options)
    # the names an unsharded save writes: a tied weight (lm_head = embeddings) only once
    lm = policy.lm
    names = {n for n, _ in lm.named_parameters()} | {n for n, _ in lm.named_buffers()}
    weights = {n.removeprefix("lm."): v for n, v in weights.items()}
    weights = {n: v for n, v in weights.items() if n in names}
    saved = optimizer.state_dict()
    main = torch.distributed.get_rank() == 0
    state: dict[int, dict[str, Any]] = {}
    for index in sorted(saved["state"]):  # full_tensor is a collective: the same order everywhere
        values = {}
        for key, value in saved["state"][index].items():
            if isinstance(value, DTensor):
                value = value.full_tensor()
            values[key] = value.cpu() if isinstance(value, torch.Tensor) else value
        if main:
            state[index] = values
    optimizer = {"state": state, "param_groups": saved["param_groups"]} if main else {}
    return weights, optimizer


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The detached whole tensor of a shard (a collective: every process must call it, in the
    same order); a tensor that is not sharded as it is."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.full_tensor().detach().cpu()
    return tensor.detach()


def distributed_like(value: Any, param: Any) -> Any:
    """A whole tensor as a DTensor shard laid out like `param` (each process has the whole
    tensor, read from the same checkpoint, and keeps its own part: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor) or not isinstance(value, torch.Tensor):
        return value
    if isinstance(value, DTensor) or value.shape != param.shape:
        return value
    value = value.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


def like_params(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole weights (as `read_weights` returns them) laid out like the model's parameters, so
    `load_state_dict` can copy them into a sharded model; unchanged for an unsharded one."""
    params = dict(model.named_parameters())
    return {name: distributed_like(value, params.get(name)) for name, value in state.items()}


def shard_optimizer_state(optimizer: Any, saved: dict[str, Any]) -> dict[str, Any]:
    """A whole optimizer state (as `full_state` or an unsharded run writes it) with each
    parameter's state tensors laid out like that parameter; unchanged without sharding."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    by_id = dict(zip(ids, params))
    state = {
        index: {key: distributed_like(value, by_id.get(index)) for key, value in values.items()}
        for index, values in saved["state"].items()
    }
    return {**saved, "state": state}
