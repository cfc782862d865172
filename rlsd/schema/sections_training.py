"""The config schema, training side: algorithm, rlsd, opsd, teacher, train, sft and output, each
field declared once with its help text (`opt`). `sections.py` holds the rest and the `Config`."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import Field, dataclass, field
from typing import Any

from ..algorithms.registry import AGGREGATIONS, BASELINES, STD_ESTIMATORS, methods

CONTEXT_SOURCES = ("reference", "sibling", "memory")  # teacher.context: see context.py
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name -> module


def opt(
    default: Any,
    help: str | Callable[[], str],
    choices: tuple | Callable[[], tuple] | None = None,
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """Declare a config field with its one help text and its allowed values or range. The help
    and the choices may be functions, called when they are read (`field_help`,
    `field_choices`): the methods' names come from a registry that loads torch."""
    meta = {"help": help, "choices": choices, "low": low, "high": high}
    if isinstance(default, (list, dict)):  # a deep copy: no two configs share a nested list
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def field_help(f: Field) -> str:
    """A field's help text (declared by `opt`)."""
    text = f.metadata["help"]
    return text() if callable(text) else text


def field_choices(f: Field) -> tuple | None:
    """A field's allowed values (declared by `opt`), or None when any value of its type goes."""
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


def method_names() -> tuple[str, ...]:
    """The registered methods' names (`algorithms/registry.py`), built-ins first."""
    return tuple(methods())


def method_help() -> str:
    """algorithm.name's help: every registered method with its summary."""
    return (
        "Training method: "
        + ", ".join(f"{m.name} ({m.summary})" for m in methods().values())
        + " (see algorithms/method.py)."
    )


@dataclass
class AlgorithmConfig:
    name: str = opt("rlsd", method_help, choices=method_names)
    baseline: str = opt(
        "mean",
        "Group baseline: the group mean (GRPO) or the mean of the other samples (RLOO).",
        choices=BASELINES,
    )
    scale_std: bool = opt(True, "Divide group advantages by the group's std (False = Dr. GRPO).")
    std: str = opt(
        "unbiased",
        "The group std of scale_std: unbiased (divide by G - 1, as the "
        "RLSD reference code and TRL) or population (divide by G; rlsd's estimator "
        "before 2026-12, advantages sqrt(G / (G - 1)) times larger).",
        choices=STD_ESTIMATORS,
    )
    adv_eps: float = opt(1e-6, "Added to the group std before dividing.", low=0)
    eps_low: float = opt(0.2, "PPO clip: ratio lower bound is 1 - eps_low.", low=0, high=1)
    eps_high: float = opt(0.28, "PPO clip: ratio upper bound is 1 + eps_high.", low=0)
    dual_clip: float = opt(
        3.0,
        "Dual clip: the loss of a token with negative advantage is at "
        "most dual_clip x |A| (the reference recipe's clip_ratio_c; > 1, or 0 "
        "= off). Acts only with ppo_epochs > 1 or mini_batches > 1.",
        low=0,
    )
    kl_coef: float = opt(
        0.0,
        "Weight of a k3 KL penalty to the frozen initial policy (0 = off; "
        "with it on, no row can be skipped).",
        low=0,
    )
    loss_agg: str = opt(
        "token_mean",
        "How per-token losses become one number: token_mean (all "
        "completion tokens of the step), seq_mean_token_mean (mean per "
        "completion, then over completions), constant (sum / (N x "
        "max_new_tokens), Dr. GRPO).",
        choices=AGGREGATIONS,
    )


@dataclass
class RlsdConfig:
    """The options of the rlsd method (`algorithms.method.RLSD.from_config` reads them)."""

    lambda_: float = opt(
        0.5,
        "Mix of teacher credit into uniform credit: m = 1 - lambda + lambda * w (0 = GRPO).",
        low=0,
        high=1,
    )
    eps_w: float = opt(
        0.2,
        "Teacher weights w = exp(sign(A) * Delta) are clipped to [1 - eps_w, 1 + eps_w].",
        low=0,
        high=1,
    )
    lambda_warmup_steps: int = opt(
        0, "Linear warm-up of lambda from 0 over this many steps (0 = none).", low=0
    )
    lambda_decay_steps: int = opt(
        0,
        "Linear decay of lambda to 0 over this many steps after the "
        "warm-up (0 = none; the reference recipe uses 60).",
        low=0,
    )
    negative_only: bool = opt(False, "Reweight only completions with a negative advantage.")
    thought_only: bool = opt(
        False,
        "Reweight only tokens inside the reasoning span (between "
        "thought_open and thought_close, found in the decoded text).",
    )
    thought_open: str = opt("<think>", "Tag that opens the reasoning span (thought_only).")
    thought_close: str = opt("</think>", "Tag that closes the reasoning span (thought_only).")
    max_spanless_steps: int = opt(
        10,
        "With thought_only: stop (with a checkpoint) after this "
        "many consecutive steps in which no completion opens a "
        "reasoning span, since such steps are plain GRPO (0 = never "
        "stop; a warning is always printed at the first).",
        low=0,
    )


@dataclass
class OpsdConfig:
    """The options of opsd, grpo_opsd and opd (`algorithms.method.OPSD.from_config`)."""

    divergence: str = opt(
        "sampled",
        "Per-token divergence to the teacher (opsd, grpo_opsd, "
        "opd): sampled = estimate on the sampled tokens only (policy-gradient "
        "form); full = exact KL over the vocabulary (chunked); topk = over the "
        "teacher's top-k tokens plus one tail bucket.",
        choices=("sampled", "full", "topk"),
    )
    direction: str = opt(
        "reverse",
        "reverse = KL(student || teacher) (mode-seeking, the OPSD "
        "default); forward = KL(teacher || student).",
        choices=("reverse", "forward"),
    )
    topk: int = opt(32, "Teacher tokens kept per position (divergence=topk).", low=1)
    beta: float = opt(
        1.0, "Weight of the OPSD loss added to the GRPO loss (grpo_opsd only).", low=0
    )


@dataclass
class TeacherConfig:
    mode: str = opt(
        "live",
        "Teacher weights: live = the current policy; frozen = the initial "
        "policy (LoRA: adapter disabled); sync = a snapshot of the policy refreshed "
        "every sync_every steps; external = teacher.model (OPD only).",
        choices=("live", "frozen", "sync", "external"),
    )
    sync_every: int = opt(
        20, "Steps between refreshes of the sync teacher (the reference recipe: 20).", low=1
    )
    model: str = opt(
        "",
        "The external teacher (mode=external): alias, HF directory or .gguf; "
        "its tokenizer must equal the student's.",
    )
    batch_size: int = opt(
        0, "Sequences per teacher forward pass (0 = train.micro_batch_size).", low=0
    )
    privileged: bool = opt(
        True,
        "The self-teacher's prompt must contain the reference (checked "
        "before training). false = a control run whose teacher template "
        "holds no reference, to measure what the reference adds.",
    )
    context: list = opt(
        ["reference"],
        "Where the self-teacher's privileged context comes from, tried in order, the first "
        "available winning per completion: reference (the record's solution, else its "
        "answer), sibling (the shortest other correct completion of the same prompt in this "
        "step's group), memory (the best earlier correct completion of the prompt). A "
        "completion with none keeps uniform credit (see rlsd/engine/context.py).",
    )
    memory_size: int = opt(
        4096,
        "Prompts the memory of earlier successes holds (teacher.context memory); the entry "
        "stored longest ago is evicted first. Saved in checkpoints.",
        low=1,
    )


@dataclass
class TrainConfig:
    steps: int = opt(30, "Optimizer steps.", low=1)
    prompts_per_step: int = opt(8, "Prompts per step (B); each is sampled G times.", low=1)
    micro_batch_size: int = opt(
        8,
        "Sequences per forward/backward pass (gradient accumulation covers the rest of the step).",
        low=1,
    )
    sharding: str = opt(
        "none",
        "How a multi-process launch (torchrun, accelerate launch) holds the policy: none = "
        "every process holds the whole model, gradients and optimizer state (DDP); fsdp = "
        "FSDP2: every transformer block and the rest of the model sharded over the processes, "
        "each keeping 1/N of the weights, gradients and AdamW state and gathering the whole "
        "weights once a step for the rollout, the teacher and the update (README: Scaling "
        "out); a teacher's or KL reference's model copy and an external teacher are "
        "sharded the same way.",
        choices=("none", "fsdp"),
    )
    gradient_checkpointing: bool = opt(
        False,
        "Recompute the decoder layers' activations in "
        "the backward pass: much less memory for about one "
        "more forward pass of time.",
    )
    share_prefix: bool = opt(
        True,
        "Score the rows that share a prompt (a group's G samples; the self-teacher's rows "
        "with the same context) with the prompt processed once, in the teacher pass and in "
        "the policy's forward and backward (same values and gradients): the completions "
        "packed behind it in one row, no padding inside (rlsd/engine/packing.py), or, where that "
        "is estimated to cost more (long completions), run padded against its cached keys "
        "and values (rlsd/engine/prefix.py). false = every row runs its whole "
        "[prompt ; completion].",
    )
    ppo_epochs: int = opt(
        1,
        "Passes over each rollout batch (> 1 computes the old log-probs "
        "with one extra forward pass).",
        low=1,
    )
    mini_batches: int = opt(
        1, "Optimizer steps per pass: the batch is split into this many parts.", low=1
    )
    lr: float = opt(
        5e-4,
        "AdamW learning rate (constant; 5e-4 suits LoRA, ~1e-5 full fine-tuning).",
        low=0,
        high=1,
    )
    weight_decay: float = opt(0.0, "AdamW weight decay.", low=0)
    max_grad_norm: float = opt(1.0, "Gradient clipping by global norm (0 = off).", low=0)
    seed: int = opt(
        0, "Seed of data order, sampling and initialisation: 0 to 2**32 - 1.", low=0, high=2**32 - 1
    )
    eval_every: int = opt(
        0,
        "Greedy held-out evaluation every N steps, logged as eval/* "
        "(0 = off; items as in `rlsd eval`).",
        low=0,
    )
    eval_items: int = opt(64, "Held-out items per evaluation.", low=1)
    max_idle_steps: int = opt(
        10,
        "Stop (with a checkpoint) after this many consecutive steps in which no group carried "
        "a gradient (every group's rewards equal: the model cannot learn); 0 = never.",
        low=0,
    )
    max_nonfinite_steps: int = opt(
        3,
        "Stop (with a checkpoint) after this many consecutive "
        "steps whose gradient was NaN or infinite; each is skipped.",
        low=1,
    )


@dataclass
class CurriculumConfig:
    """Skip prompts whose recent groups were all solved or all failed (rlsd/engine/curriculum.py):
    such a group carries no gradient under grpo and rlsd. Off by default."""

    enabled: bool = opt(False, "Skip settled prompts when drawing a step's prompts.")
    low: float = opt(
        0.0,
        "A prompt whose mean recent pass rate is at or below this is settled (failed).",
        low=0,
        high=1,
    )
    high: float = opt(
        1.0,
        "A prompt whose mean recent pass rate is at or above this is settled (solved).",
        low=0,
        high=1,
    )
    window: int = opt(2, "Groups of a prompt remembered (its recent pass rates).", low=1)
    min_visits: int = opt(2, "Groups seen before a prompt can be settled.", low=1)
    recheck_every: int = opt(
        4, "After this many skips a settled prompt is sampled again (0: never).", low=0
    )
    capacity: int = opt(100_000, "Prompts remembered at most (the least recent go).", low=1)


@dataclass
class SftConfig:
    """`rlsd sft` only (the supervised warm start on worked solutions); `rlsd train` ignores it."""

    steps: int = opt(100, "Optimizer steps of the warm start.", low=1)
    batch_size: int = opt(16, "Records per step (micro-batched by train.micro_batch_size).", low=1)
    lr: float = opt(2e-4, "AdamW learning rate of the warm start (suits LoRA).", low=0, high=1)


@dataclass
class OutputConfig:
    dir: str = opt("runs", "Parent directory of run directories.")
    run_name: str = opt("", "Run directory name; empty = '<method>-<task>-<timestamp>'.")
    save_every: int = opt(
        20, "Checkpoint every N steps (and always at the end; 0 = end only).", low=0
    )
    keep_last: int = opt(0, "Checkpoints kept on disk, newest first (0 = all).", low=0)
    log_samples: int = opt(8, "Completions per step written to samples.jsonl (0 = all).", low=0)
    progress: bool = opt(True, "Show a progress bar.")
    report: bool = opt(True, "Write report.html (curves, per-token credit heat map) at the end.")
    trackers: list = opt(
        [],
        "Also log metrics to these trackers (optional extras, e.g. pip "
        "install 'rlsd[tensorboard]'); metrics.jsonl is always written. Any "
        "of: tensorboard, wandb, mlflow.",
    )
    project: str = opt("rlsd", "Project / experiment name the trackers file the run under.")
