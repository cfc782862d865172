"""The teacher's prompts for a TRL batch, the config and start-up checks on them, and rlsd's
run files (samples.jsonl lines, the metrics.jsonl callback, config.yaml).

Helpers of `rlsd.integrations.trl`, free of TRL itself (so they are tested on their own).
A TRL row is a dict of dataset columns; its `prompt` is either a string (TRL's "standard"
format) or a list of chat messages ("conversational"). The teacher's prompt has the same
format as the student's:

- from a ready column (`rlsd_teacher_prompt_column`): the column's value, a message list, or a
  string that replaces the text of the student's last user message (conversational prompts) or
  the whole prompt (standard ones);
- rendered from a context (`rlsd_context`): the Jinja template `rlsd_teacher_template` renders
  the teacher's user text from the student's (`prompt`), the context (`context`,
  `context_kind`) and every column of the row; the result replaces the student's last user
  message. The context of each completion is chosen by rlsd's own `choose_contexts`: the
  `reference` (the row's `rlsd_reference_column`), a `sibling` (the shortest correct other
  completion of its group) or `memory` (the best earlier correct completion of the prompt,
  `trl_memory`), first available wins; with none, the teacher sees the student's very prompt
  (Delta = 0: GRPO's credit for that completion).
"""

from __future__ import annotations

import math
from typing import Any

import jinja2
from transformers import TrainerCallback

from ..engine.context import SOURCES, Context
from ..engine.runfiles import JsonlWriter
from ..schema.config import ConfigError, load_config, to_yaml

# As rlsd's own teacher template (rlsd/schema/sections.py), less its answer-format line: the user's
# prompt carries its own instructions.
TRL_TEACHER_TEMPLATE = (
    "{{ prompt }}\n\nHere is {{ 'a reference solution' if context_kind == 'reference' else "
    "'a correct solution written earlier' }}:\n{{ context }}\n\nAfter understanding the "
    "{{ 'reference' if context_kind == 'reference' else 'correct' }} solution, solve the "
    "problem in your own way."
)
TRL_SOURCES = SOURCES  # reference, sibling, memory: every source rlsd's own trainer has


class RLSDDataError(ValueError):
    """A dataset that cannot give the teacher its prompt; the message names the column."""


def is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt)


def user_text(prompt: Any, where: str) -> str:
    """The student's last user message (conversational) or the whole prompt (standard)."""
    if isinstance(prompt, str):
        return prompt
    if is_conversational(prompt):
        for message in reversed(prompt):
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                return message["content"]
    raise RLSDDataError(
        f"{where}: the prompt has no user message with text content; RLSD renders the "
        "teacher's prompt from it (set rlsd_teacher_prompt_column to give it ready-made)"
    )


def with_user_text(prompt: Any, text: str) -> Any:
    """The prompt with its last user message's text (or, standard, the whole prompt) replaced."""
    if isinstance(prompt, str):
        return text
    out = [dict(m) for m in prompt]
    last = max(i for i, m in enumerate(out) if m.get("role") == "user")
    out[last]["content"] = text
    return out


def compile_template(text: str) -> jinja2.Template:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        return env.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"rlsd_teacher_template: {exc}") from None


def check_rlsd_fields(args: Any) -> None:
    """Refuse `RLSDConfig` values rlsd would refuse, naming the field."""
    sources = args.rlsd_context
    known = bool(sources) and set(sources) <= set(TRL_SOURCES)
    checks = [
        ("rlsd_lambda", 0.0 <= args.rlsd_lambda <= 1.0, "must lie in [0, 1]"),
        ("rlsd_eps_w", 0.0 <= args.rlsd_eps_w < 1.0, "must lie in [0, 1)"),
        ("rlsd_lambda_warmup_steps", args.rlsd_lambda_warmup_steps >= 0, "must be >= 0"),
        ("rlsd_lambda_decay_steps", args.rlsd_lambda_decay_steps >= 0, "must be >= 0"),
        ("rlsd_sync_every", args.rlsd_sync_every >= 1, "must be >= 1"),
        ("rlsd_memory_size", args.rlsd_memory_size >= 1, "must be >= 1"),
        ("rlsd_log_samples", args.rlsd_log_samples >= 0, "must be >= 0"),
        (
            "rlsd_teacher_mode",
            args.rlsd_teacher_mode in ("live", "frozen", "sync"),
            "must be live, frozen or sync",
        ),
        (
            "rlsd_context",
            known and len(set(sources)) == len(sources),
            f"must list each of {', '.join(TRL_SOURCES)} at most once, at least one of them",
        ),
        (
            "rlsd_thought_open",
            not args.rlsd_thought_only or bool(args.rlsd_thought_open and args.rlsd_thought_close),
            "rlsd_thought_only needs non-empty open and close tags",
        ),
    ]
    for name, ok, text in checks:
        if not ok:
            raise ConfigError(f"{name}={getattr(args, name)!r}: {text}")
    compile_template(args.rlsd_teacher_template)


def rendered_prompt(template: jinja2.Template, row: dict, context: Context | None) -> Any:
    """The teacher's prompt for one completion of `row` shown `context` (None: the student's)."""
    if context is None:
        return row["prompt"]
    values = {
        **row,
        "prompt": user_text(row["prompt"], "prompt"),
        "context": context.text,
        "context_kind": context.kind,
    }
    try:
        text = template.render(**values)
    except jinja2.UndefinedError as exc:
        raise ConfigError(f"rlsd_teacher_template: {exc.message}") from None
    return with_user_text(row["prompt"], text)


def ready_prompt(row: dict, column: str, index: int) -> Any:
    """The teacher's prompt held by `column` of `row`, in the student prompt's format."""
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RLSDDataError(
            f"rlsd_teacher_prompt_column={column!r}: row {index} has no teacher prompt "
            f"(missing or empty) for the prompt {str(row.get('prompt'))[:60]!r}"
        )
    if isinstance(value, str):
        return with_user_text(row["prompt"], value)
    if is_conversational(value) and is_conversational(row["prompt"]):
        return value
    raise RLSDDataError(
        f"rlsd_teacher_prompt_column={column!r}: row {index} holds a {type(value).__name__}; "
        "give a string, or a message list when the prompts are conversational"
    )


def check_columns(columns: list[str], needed: dict[str, str]) -> None:
    """Every needed column ({column: the config field that names it}) is in the dataset."""
    for column, field in needed.items():
        if column not in columns:
            raise RLSDDataError(
                f"{field}={column!r}: the training dataset has no column {column!r} "
                f"(its columns: {', '.join(columns)}); RLSD will not fall back to plain GRPO"
            )


def reference_text(row: dict, column: str, index: int) -> str:
    value = row.get(column)
    if value is None or not str(value).strip():
        raise RLSDDataError(
            f"rlsd_reference_column={column!r}: row {index} has no reference (missing or "
            f"empty) for the prompt {str(row.get('prompt'))[:60]!r}"
        )
    return str(value)


def prompt_text(prompt: Any) -> str:
    """All the text of a prompt (a string, or its messages' text contents)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if isinstance(m.get("content"), str))


def check_teacher_text(student: Any, teacher: Any, shown: str | None, where: str) -> None:
    """The teacher's prompt differs from the student's and shows its context (`shown`)."""
    if teacher == student:
        raise ConfigError(
            f"{where}: the teacher's prompt equals the student's; the teacher would see no "
            "privileged context and RLSD would train as GRPO (rlsd_privileged=False for a "
            "control run)"
        )
    if shown and shown.strip() not in prompt_text(teacher):
        raise ConfigError(
            f"{where}: the teacher's prompt does not contain its context ({shown[:40]!r}); "
            "use {{ context }} in rlsd_teacher_template"
        )


def check_header(ids: list[int], header: list[int], which: str, index: int) -> None:
    """A tokenized prompt ends with the chat template's assistant header (rlsd's preflight)."""
    if header and list(ids[-len(header) :]) != header:
        raise ConfigError(
            f"{which} of row {index}: the tokenized prompt does not end with the chat "
            "template's assistant header; the completion would follow a different context "
            "for student and teacher"
        )


def sample_lines(batch: dict[str, Any], step: int, limit: int) -> list[dict[str, Any]]:
    """Lines of rlsd's samples.jsonl (the fields `rlsd.step.trainer.write_samples` writes) for
    the first `limit` rows (0 = all). `batch` holds per-row lists: prompt, answer, completion,
    reward, correct, advantage (the sequence's), token_ids, token_advantage, context
    (Context or None) and teacher_prompt."""
    out = []
    rows = len(batch["token_ids"])
    for i in range(min(limit or rows, rows)):
        adv, ids = batch["advantage"][i], batch["token_ids"][i]
        token_adv = batch["token_advantage"][i][: len(ids)]
        context = batch["context"][i]
        line = {
            "step": step,
            "index": i,
            "prompt": batch["prompt"][i],
            "answer": batch["answer"][i],
            "completion": batch["completion"][i],
            "reward": batch["reward"][i],
            "correct": batch["correct"][i],
            "advantage": adv,
            "token_ids": ids,
            "token_advantage": [round(v, 5) for v in token_adv],
            "teacher_context_kind": context.kind if context else "none",
        }
        if context is not None:
            line["teacher_prompt"] = batch["teacher_prompt"][i]
        if adv != 0:
            line["credit_multiplier"] = [round(v / adv, 4) for v in token_adv]
        out.append(line)
    return out


def metrics_line(step: int, logs: dict[str, Any]) -> dict[str, Any]:
    """One line of rlsd's metrics.jsonl from TRL's logs: the numbers, and TRL's reward under
    rlsd's names (`reward/mean`, `reward/std`)."""
    line: dict[str, Any] = {"step": step}
    for key, value in logs.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            line[key] = value if math.isfinite(value) else str(value)
    for trl_name, name in (("reward", "reward/mean"), ("reward_std", "reward/std")):
        if trl_name in line:
            line[name] = line[trl_name]
    return line


def report_config(model_name: str, settings: dict[str, Any]) -> str:
    """An rlsd config.yaml describing a TRL run well enough for `rlsd report`: the method,
    the model and the RLSD settings (`settings`: dotted rlsd keys)."""
    cfg = load_config(overrides={"algorithm.name": "rlsd", "model.name": model_name, **settings})
    return to_yaml(cfg)


class RunFiles(TrainerCallback):
    """Writes TRL's logs to rlsd's metrics.jsonl (main process), for `rlsd report`."""

    def __init__(self, writer: JsonlWriter):
        self.writer = writer

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            self.writer.write(metrics_line(state.global_step, logs))
