"""A training run's state, built once: model, optimizer, teacher, data, run directory, logs.

`setup` loads everything, opens (or resumes) the run directory and returns a `Run`; `save` writes
a checkpoint. With several processes (accelerate DDP, or FSDP2 with `train.sharding: fsdp`, see
`sharding.py`) the main process decides the run directory and alone writes files; every process
builds the same model and restores the same checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState

from ..algorithms.method import Method, method_for
from ..engine.checkpoint import restore, save_checkpoint
from ..engine.compute import Shape, model_shape
from ..engine.context import ContextMemory
from ..engine.curriculum import PassRates
from ..engine.data import (
    PromptRenderer,
    PromptStream,
    Record,
    check_lengths,
    load_records,
    split_heldout,
)
from ..engine.distributed import from_main
from ..engine.envs.rollout import EnvSetup, build_environment
from ..engine.logprobs import TokenScorer
from ..engine.models import (
    base_model,
    load_model,
    pick_device,
    pick_dtype,
    set_threads,
    stop_token_ids,
)
from ..engine.preflight import check_teacher_prompts
from ..engine.rewards import build_reward
from ..engine.rundir import open_run_dir, run_dir_for
from ..engine.runfiles import JsonlWriter, NullWriter, read_jsonl
from ..engine.sharding import frozen_copies, full_state, is_sharded, shard_frozen, shard_policy
from ..engine.teacher import Teacher
from ..schema.config import Config, ConfigError, ModelConfig, to_dict
from .scoring import Scorers
from .tracking import build_trackers, flat_config, reset_peak_memory
from .update import Policy

log = logging.getLogger(__name__)
SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")  # accelerate engines that split the weights


@dataclass
class Run:
    """Everything a training step needs, built once by `setup`."""

    cfg: Config
    method: Method  # what the method is: its teacher, its rows, its token credit
    accelerator: Accelerator
    scorer: TokenScorer  # the policy, wrapped to return completion log-probs
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    teacher: Teacher | None
    reference: Teacher | None  # frozen initial policy for the KL penalty (algorithm.kl_coef)
    records: list[Record]
    renderer: PromptRenderer
    reward_fn: Any
    stream: PromptStream
    stop_ids: list[int]
    run_dir: Path
    metrics: JsonlWriter
    samples: JsonlWriter
    history: list[dict] = field(default_factory=list)
    start_step: int = 1
    phase: str = "setup"  # what the current step is doing (named in out-of-memory reports)
    eval_records: list[Record] | None = None  # train.eval_every items, chosen at first use
    evals: Any = field(default_factory=NullWriter)  # evals.jsonl: per-item held-out results
    mem_scope: str = "process"  # what perf/peak_mem_mb covers: "run" or the whole "process"
    memory: ContextMemory | None = None  # earlier successes per prompt (teacher.context memory)
    shape: Shape | None = None  # the policy's size, for the FLOP estimate (engine/compute.py)
    pass_rates: PassRates | None = None  # each prompt's recent pass rates (curriculum.enabled)
    env: EnvSetup | None = None  # the agent's environment (env.environment or env.tools)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def lm(self) -> Any:
        return self.accelerator.unwrap_model(self.scorer).lm

    @property
    def models(self) -> tuple[Any, Teacher | None, Teacher | None]:
        """The policy and the teachers whose weights `sharding.gathered` makes whole."""
        return self.scorer, self.teacher, self.reference

    @property
    def policy(self) -> Policy:
        """What the update trains."""
        return Policy(self.scorer, self.optimizer, self.accelerator, self.tokenizer.pad_token_id)

    @property
    def scorers(self) -> Scorers:
        """Who scores the trained rows in the teacher pass."""
        return Scorers(
            self.teacher,
            self.reference,
            self.renderer,
            self.tokenizer.pad_token_id,
            self.device,
            self.cfg.train.share_prefix,
        )


class TrainingStopped(RuntimeError):
    """Training stopped early on purpose (a signal, repeated non-finite gradients); a checkpoint
    of the last completed step was written first."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def load_external_teacher(cfg: Config, tokenizer: Any, device: torch.device) -> TokenScorer:
    """The OPD teacher: another model, frozen, whose tokenizer must equal the student's."""
    lm, teacher_tokenizer = load_model(
        ModelConfig(
            name=cfg.teacher.model, dtype=cfg.model.dtype, device=cfg.model.device, lora=False
        ),
        pick_dtype(cfg.model, device),
    )
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"teacher.model: its tokenizer differs from the student's (vocabulary "
            f"of {len(teacher_tokenizer)} vs {len(tokenizer)} tokens); the teacher "
            "must score exactly the student's token ids"
        )
    lm = lm.to(device).eval().requires_grad_(False)
    return TokenScorer(lm, temperature=cfg.rollout.temperature)


def trainable_records(
    cfg: Config, renderer: PromptRenderer, records: list[Record], method: Method
) -> list[Record]:
    """The records whose prompts fit data.max_prompt_tokens (an error, or dropped and counted
    with data.long_prompts=skip); a self-teacher's prompt must fit too."""
    records, skipped = check_lengths(renderer, records, method.teacher == "privileged")
    if skipped:
        log.warning(
            "skipped %d of %d records: prompt longer than data.max_prompt_tokens=%d",
            skipped,
            skipped + len(records),
            cfg.data.max_prompt_tokens,
        )
    return records


def build_teachers(
    cfg: Config,
    method: Method,
    policy: TokenScorer,
    tokenizer: Any,
    renderer: PromptRenderer,
    records: list[Record],
    device: torch.device,
    copies: dict[str, TokenScorer] | None = None,
) -> tuple[Teacher | None, Teacher | None]:
    """The method's teacher (after the preflight of its prompts) and, with algorithm.kl_coef,
    the frozen initial policy for the KL penalty (a frozen teacher's copy is shared). Under
    FSDP2 the frozen copies come sharded, by role (`sharding.frozen_copies`)."""
    copies = copies or {}
    batch = cfg.teacher.batch_size or cfg.train.micro_batch_size
    teacher = None
    if method.teacher is not None:
        external = None
        if method.teacher == "plain":
            external = load_external_teacher(cfg, tokenizer, device)
            if cfg.train.sharding == "fsdp":  # gathered with the policy (sharding.gathered)
                external = shard_frozen(external.lm, cfg.rollout.temperature, device)
        else:
            check_teacher_prompts(
                renderer, tokenizer, records, cfg.teacher.privileged, cfg.teacher.context
            )
        teacher = Teacher(
            cfg.teacher.mode,
            policy,
            cfg.model.lora,
            batch,
            cfg.teacher.sync_every,
            external,
            copies.get("teacher"),
        )
    if cfg.algorithm.kl_coef <= 0:
        return teacher, None
    if teacher is not None and teacher.mode == "frozen":
        return teacher, teacher
    return teacher, Teacher(
        "frozen", policy, cfg.model.lora, batch, model_copy=copies.get("reference")
    )


def make_accelerator(cfg: Config, device: torch.device, run_dir: Path) -> Accelerator:
    """The accelerator (trackers attached); the engines that shard weights are refused."""
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        log_with=build_trackers(cfg.output.trackers, cfg.output.project, run_dir) or None,
    )
    if accelerator.distributed_type.value in SHARDED:
        raise ConfigError(
            f"accelerate config: {accelerator.distributed_type.value} is not "
            "supported (rlsd gathers the weights itself for generation); for sharded "
            "weights use a DDP or plain launch with --train.sharding fsdp (FSDP2), "
            "e.g. configs/accelerate/ddp-8gpu.yaml"
        )
    return accelerator


def load_policy(cfg: Config, device: torch.device) -> tuple[Any, Any]:
    """The policy model (LoRA-wrapped per config) and its tokenizer. FSDP2 on CUDA keeps fp32
    shards and computes in bf16 (sharding.py), so model.dtype auto loads fp32 there."""
    dtype = pick_dtype(cfg.model, device)
    if cfg.train.sharding == "fsdp" and device.type == "cuda" and cfg.model.dtype == "auto":
        dtype = torch.float32
    model, tokenizer = load_model(cfg.model, dtype)
    if cfg.train.gradient_checkpointing:  # the decoder layers recompute in the backward pass
        base_model(model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return model, tokenizer


def build_policy(cfg: Config, accelerator: Accelerator, model: Any) -> tuple[Any, Any]:
    """The policy's scorer and its AdamW over the trainable parameters: prepared by accelerate
    (DDP), or sharded with FSDP2 first (train.sharding fsdp; neither is then prepared)."""
    if cfg.train.sharding == "fsdp":
        scorer = shard_policy(model, cfg.rollout.temperature, accelerator.device)
    else:
        scorer = TokenScorer(model, temperature=cfg.rollout.temperature)
    params = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if cfg.train.sharding == "fsdp":
        return scorer, optimizer
    return accelerator.prepare(scorer, optimizer)


def setup(cfg: Config, resume: bool = True) -> Run:
    """Load data and model, build optimizer and teacher, run the preflight, open the run dir;
    restore the latest checkpoint when resuming."""
    device = pick_device(cfg.model)
    mem_scope = reset_peak_memory(device)  # before loading: the run's peak includes the model
    state = PartialState(cpu=device.type == "cpu")  # the process group, when launched with several
    if cfg.train.prompts_per_step % state.num_processes:
        raise ConfigError(
            f"train.prompts_per_step: {cfg.train.prompts_per_step} prompts do not "
            f"split evenly over {state.num_processes} processes"
        )
    run_dir, ckpt = from_main(state, lambda: run_dir_for(cfg, resume))  # before the slow work
    set_threads(cfg.model.threads, device, state.is_main_process)
    torch.manual_seed(cfg.train.seed)
    accelerator = make_accelerator(cfg, device, run_dir)
    records, _ = split_heldout(
        load_records(cfg.data), cfg.data.heldout_size, cfg.data.seed
    )  # held-out records are never trained on
    model, tokenizer = load_policy(cfg, accelerator.device)
    renderer = PromptRenderer(cfg.data, tokenizer)
    method = method_for(cfg)
    records = trainable_records(cfg, renderer, records, method)
    reward_fn = build_reward(cfg.reward)
    copies = frozen_copies(cfg, model, accelerator.device)  # FSDP2: before the policy is sharded
    scorer, optimizer = build_policy(cfg, accelerator, model)
    policy = accelerator.unwrap_model(scorer)
    teacher, reference = build_teachers(
        cfg, method, policy, tokenizer, renderer, records, accelerator.device, copies
    )
    stream = PromptStream(len(records), cfg.train.seed)
    memory = None
    if method.teacher == "privileged" and "memory" in cfg.teacher.context:
        memory = ContextMemory(cfg.teacher.memory_size)
    c = cfg.curriculum
    pass_rates = PassRates(c.capacity, c.window) if c.enabled else None
    start = 1
    if ckpt is not None:
        start = restore(
            ckpt, policy.lm, optimizer, stream, teacher, cfg.model.lora, memory, pass_rates
        )
    main = accelerator.is_main_process
    if main:
        open_run_dir(cfg, run_dir, start)
    accelerator.wait_for_everyone()
    if cfg.output.trackers:
        accelerator.init_trackers(cfg.output.project, config=flat_config(to_dict(cfg)))
    logs = [
        JsonlWriter(run_dir / name) if main else NullWriter()
        for name in ("metrics.jsonl", "samples.jsonl")
    ]
    run = Run(
        cfg,
        method,
        accelerator,
        scorer,
        tokenizer,
        optimizer,
        teacher,
        reference,
        records,
        renderer,
        reward_fn,
        stream,
        stop_token_ids(model, tokenizer),
        run_dir,
        *logs,
    )
    run.start_step, run.mem_scope, run.memory = start, mem_scope, memory
    run.pass_rates = pass_rates
    run.env = build_environment(cfg.env) if cfg.env.active else None
    run.shape = model_shape(policy.lm)
    if main and cfg.train.eval_every:
        run.evals = JsonlWriter(run_dir / "evals.jsonl")
    run.history = read_jsonl(run_dir / "metrics.jsonl") if main else []  # main's bar only
    return run


def save(run: Run, step: int) -> Path:
    """Write checkpoint-<step> (main process; the others wait until it is complete). Sharded
    weights and optimizer state are gathered whole on the main process first."""
    ckpt = run.run_dir / f"checkpoint-{step}"
    weights, optimizer = (None, run.optimizer)
    if is_sharded(run.scorer):
        weights, optimizer = full_state(run.scorer, run.optimizer, run.cfg.model.lora)
    synced_at, tensors = run.teacher.state() if run.teacher is not None else (0, None)
    if run.accelerator.is_main_process:
        ckpt = save_checkpoint(
            run.run_dir,
            step,
            run.lm,
            optimizer,
            {
                "data": run.stream.state_dict(),
                "teacher_synced_at": synced_at,
                **({"context_memory": run.memory.state_dict()} if run.memory is not None else {}),
                **({"pass_rates": run.pass_rates.state_dict()} if run.pass_rates else {}),
            },
            tensors,
            run.cfg.output.keep_last,
            weights,
        )
    run.accelerator.wait_for_everyone()
    return ckpt
