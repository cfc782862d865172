"""A training run's state, built once: model, optimizer, teacher, data, run directory, logs.

`setup` loads everything, opens (or resumes) the run directory and returns a `Run`; `save` writes
a checkpoint. With several processes (accelerate DDP, or FSDP2 with `train.sharding: fsdp`, see
`sharding.py`) the main process decides the run directory and alone writes files; every process
builds the same model and restores the same checkpoint.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState

from ..algorithms.method import Method, method_for
from ..engine.checkpoint import (
    DamagedCheckpoint,
    apply_weights,
    check_resumable,
    checkpoint_step,
    intact_checkpoints,
    load_state,
    resume_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from ..engine.context import ContextMemory
from ..engine.data import (
    PromptRenderer,
    PromptStream,
    Record,
    check_lengths,
    load_records,
    split_heldout,
)
from ..engine.distributed import from_main
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
from ..engine.runfiles import JsonlWriter, NullWriter, jsonl_lines, read_jsonl, write_atomic
from ..engine.sharding import (
    frozen_copies,
    full_state,
    is_sharded,
    shard_frozen,
    shard_optimizer_state,
    shard_policy,
)
from ..engine.teacher import Teacher
from ..schema.config import Config, ConfigError, ModelConfig, load_config, to_dict, to_yaml
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


def run_dir_for(cfg: Config, resume: bool) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (None for a new run).

    A directory that already holds a run is resumed from its latest intact checkpoint when
    `resume` is set and the config changes nothing that matters; otherwise it is refused, never
    overwritten. The directory is the run's identity: its location and name (output.dir,
    output.run_name) are not compared with the saved config, so a run resumes by a relative or
    absolute path, from any working directory, moved or copied. A generated name (empty
    output.run_name) always starts a new run, in a directory that does not exist yet.
    """
    if not cfg.output.run_name:
        return generated_run_dir(cfg), None
    run_dir = Path(cfg.output.dir) / cfg.output.run_name
    if not (run_dir / "config.yaml").is_file():
        return run_dir, None
    if not resume:
        raise FileExistsError(
            f"{run_dir}: already holds a run; resume it (drop --no-resume) "
            "or choose another output.run_name"
        )
    check_resumable(load_config(run_dir / "config.yaml", saved=True), cfg, str(run_dir))
    return run_dir, resume_checkpoint(run_dir)  # None: died before its first checkpoint


def generated_run_dir(cfg: Config) -> Path:
    """output.dir/<method>-<task>-<time>, with -2, -3... when that directory exists already
    (two runs started in the same second never share one)."""
    name = "{}-{}-{}".format(
        cfg.algorithm.name,
        cfg.data.task if cfg.data.source == "reasoning_gym" else "file",
        datetime.now().strftime("%Y%m%d-%H%M%S"),
    )
    run_dir, n = Path(cfg.output.dir) / name, 1
    while run_dir.exists() or run_dir.is_symlink():
        n += 1
        run_dir = Path(cfg.output.dir) / f"{name}-{n}"
    return run_dir


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
    start = 1
    if ckpt is not None:
        start = restore(ckpt, policy.lm, optimizer, stream, teacher, cfg.model.lora, memory)
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
    if main and cfg.train.eval_every:
        run.evals = JsonlWriter(run_dir / "evals.jsonl")
    run.history = read_jsonl(run_dir / "metrics.jsonl") if main else []  # main's bar only
    return run


LOGS = ("metrics.jsonl", "samples.jsonl", "evals.jsonl")


def open_run_dir(cfg: Config, run_dir: Path, start: int) -> None:
    """Create the run directory, remove what a killed process left half-written, drop log lines
    written after the checkpoint we resume from (they are rewritten), and save the resolved
    config, with output.dir and output.run_name saying where the run directory is now. A run
    with a generated name says how to resume it (the same command again starts another)."""
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    remove_leftovers(run_dir)
    for name in LOGS:
        truncate_log(run_dir / name, start - 1)
    here = replace(cfg.output, dir=str(run_dir.parent), run_name=run_dir.name)
    write_atomic(run_dir / "config.yaml", to_yaml(replace(cfg, output=here)))
    if not cfg.output.run_name:
        print(
            f"rlsd: new run in {run_dir} (a generated name: the same command again starts "
            f"another run); to continue this one: rlsd train --resume {run_dir}",
            file=sys.stderr,
        )


def remove_leftovers(run_dir: Path) -> None:
    """Delete the temporary checkpoint directories (`.checkpoint-N.*`) and files (`*.tmp`) of
    writes that a kill interrupted: nothing reads them, and each can be as large as a model."""
    for path in run_dir.glob(".checkpoint-*"):
        if path.is_dir() and not path.is_symlink():
            log.info("removing %s, left by an interrupted checkpoint", path)
            shutil.rmtree(path, ignore_errors=True)
    for name in ("latest", "config.yaml", *LOGS):
        leftover = run_dir / f"{name}.tmp"
        if leftover.is_file() and not leftover.is_symlink():
            leftover.unlink()


def restore(
    ckpt: Path,
    lm: Any,
    optimizer: Any,
    stream: PromptStream,
    teacher: Teacher | None,
    lora: bool,
    memory: ContextMemory | None = None,
) -> int:
    """Load a checkpoint into the freshly built run; returns the first step still to run.
    The frozen teacher was copied from the initial weights before this, so it stays the
    initial policy.

    Everything is read and checked before the policy changes. A checkpoint that cannot be read
    back (an unreadable or malicious optimizer or RNG file, say: `torch.load(weights_only=True)`
    refuses it) is skipped with a warning and the previous intact one used; when none can be,
    the run stops rather than start over at step 1 on top of its history."""
    problems = []
    older = intact_checkpoints(ckpt.parent, before=checkpoint_step(ckpt))  # verified lazily
    for candidate in itertools.chain([ckpt], older):
        try:
            saved = load_state(candidate, lora)
            check_optimizer_state(optimizer, saved.optimizer)
            # replaced whole by a fallback's; laid out like the parameters (sharding.py)
            optimizer.load_state_dict(shard_optimizer_state(optimizer, saved.optimizer))
            if teacher is not None:  # the sync snapshot, replaced whole by a fallback's
                teacher.load_state(saved.state.get("teacher_synced_at", 0), saved.teacher)
            if memory is not None:
                memory.load_state_dict(saved.state.get("context_memory", []))
        except (DamagedCheckpoint, ValueError, KeyError, TypeError, RuntimeError) as exc:
            problem = str(exc) if isinstance(exc, DamagedCheckpoint) else f"{candidate}: {exc}"
            problems.append(problem)
            log.warning("%s; falling back to the previous checkpoint", problem)
            continue
        stream.load_state_dict(saved.state["data"])
        apply_weights(lm, saved.weights, lora, candidate)
        set_rng_state(saved.rng)  # checked when read: the last change, nothing draws after it
        return saved.state["step"] + 1
    raise ConfigError(
        f"{ckpt.parent}: no checkpoint can be read back (newest: {problems[0]}); refusing to "
        "start over at step 1 on top of the run's history. Restore a checkpoint, or move the "
        "run directory away to start afresh"
    )


def check_optimizer_state(optimizer: Any, saved: dict[str, Any]) -> None:
    """Raise ValueError unless `saved` holds the optimizer's parameter groups, and each state
    tensor the shape of its parameter (torch checks the counts, not the shapes)."""
    groups, params = saved["param_groups"], [g["params"] for g in optimizer.param_groups]
    ids = [g.get("params") if isinstance(g, dict) else None for g in groups]
    if len(ids) != len(params) or any(
        not isinstance(i, list) or len(i) != len(p) for i, p in zip(ids, params)
    ):
        raise ValueError("optimizer.pt: its parameter groups are not this run's")
    shapes = {i: p.shape for group, ps in zip(ids, params) for i, p in zip(group, ps)}
    for index, values in saved["state"].items():
        if index not in shapes or not isinstance(values, dict):
            raise ValueError(f"optimizer.pt: state of an unknown parameter {index!r}")
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"optimizer.pt: {name!r} of parameter {index} is no tensor")
            if value.dim() and value.shape != shapes[index]:
                raise ValueError(
                    f"optimizer.pt: {name!r} of parameter {index} has shape "
                    f"{tuple(value.shape)}, not {tuple(shapes[index])}"
                )


def truncate_log(path: Path, step: int) -> None:
    """Keep only the lines of steps <= step (atomically): a resumed run rewrites the rest. A
    last line cut short (the process was killed while writing it) is dropped with the rest."""
    if not path.is_file():
        return
    kept = [line for line, record in jsonl_lines(path) if record["step"] <= step]
    write_atomic(path, "".join(kept))


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
            },
            tensors,
            run.cfg.output.keep_last,
            weights,
        )
    run.accelerator.wait_for_everyone()
    return ckpt
