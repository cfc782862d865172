"""Start-up checks that refuse a run whose teacher would be misaligned or would teach nothing.

Run once before training:
- on every record and every `teacher.context` source (text only, cheap): the teacher's prompt
  differs from the student's and shows the privileged context (the reference: the solution,
  else the answer; a sibling's or a memory's completion, stood in for by a probe text);
  otherwise RLSD's Delta is 0 on that record and it trains as plain GRPO without a word;
- on a sample of records (`ALIGNMENT_SAMPLE`, token ids): both prompts end with the chat
  template's assistant header, so the completion follows the same context in both;
- through the very code that builds scoring inputs, the positions the scorer reads hold exactly
  the completion ids, and the first completion token gets the position right after its prompt
  whatever the padding: student and teacher score the same tokens at the same places.
"""

from __future__ import annotations

from typing import Any

import torch

from ..schema.config import ConfigError
from .context import Context
from .data import PromptRenderer, Record, chat_ids
from .logprobs import position_ids_for
from .rollout import join, left_pad

ALIGNMENT_SAMPLE = 8  # records whose token alignment is checked (the text checks cover all)


def generation_header(tokenizer: Any) -> list[int]:
    """The ids the chat template appends to open the assistant turn ([] without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    messages = [{"role": "user", "content": "x"}]
    bare = chat_ids(tokenizer, messages, add_generation_prompt=False)
    opened = chat_ids(tokenizer, messages, add_generation_prompt=True)
    return opened[len(bare) :] if opened[: len(bare)] == bare else []


PROBE = "rlsd-context-probe: 12 + 7 = 19"  # stands for a sibling's or a memory's completion


def source_contexts(record: Record, sources: tuple[str, ...] | list[str]) -> list[Context]:
    """One context per configured source, as the preflight renders them: the record's own
    reference, and a probe text for the completions that sibling and memory will show."""
    return [
        Context(kind, record.solution or record.answer if kind == "reference" else PROBE)
        for kind in sources
    ]


def check_teacher_prompts(
    renderer: PromptRenderer,
    tokenizer: Any,
    records: list[Record],
    privileged: bool = True,
    sources: tuple[str, ...] | list[str] = ("reference",),
) -> None:
    """For every record and every context source, the teacher prompt differs from the student's
    and shows the context (unless this is a `teacher.privileged: false` control); for the first
    `ALIGNMENT_SAMPLE` records, every source's prompt also ends like the student's and lines up
    with the completion ids."""
    if privileged:
        for index, record in enumerate(records):
            for context in source_contexts(record, sources):
                check_privileged_text(renderer, record, index, context)
    header = generation_header(tokenizer)
    for record in records[:ALIGNMENT_SAMPLE]:
        prompts = [("prompt_template", renderer.student_ids(record))]
        for context in source_contexts(record, sources if privileged else ("reference",)):
            prompts.append(("teacher_template", renderer.teacher_ids(record, context)))
        for name, ids in prompts:
            if header and ids[-len(header) :] != header:
                raise ConfigError(
                    f"data.{name}: the rendered prompt does not end with the chat "
                    "template's assistant header; completions would follow a "
                    "different context for student and teacher"
                )
            check_scoring_positions(ids, tokenizer, name)


def check_privileged_text(
    renderer: PromptRenderer, record: Record, index: int, context: Context | None = None
) -> None:
    """One record's teacher message shows it something the student's does not: its context
    (by default the reference)."""
    context = context or Context("reference", record.solution or record.answer)
    where = f"data.teacher_template: record {index} ({record.prompt[:40]!r})"
    if context.kind != "reference":
        where += f", teacher.context {context.kind}"
    teacher = renderer.teacher_text(record, context)
    if teacher == renderer.student_text(record):
        raise ConfigError(
            f"{where}: renders the same prompt as the student's; the teacher "
            "would see no privileged context and the record would train as GRPO"
        )
    shown = context.text.strip()
    if shown and shown not in teacher:
        what = "reference" if context.kind == "reference" else f"{context.kind} completion"
        raise ConfigError(
            f"{where}: the teacher's prompt does not contain the {what} "
            f"({shown[:40]!r}); use {{{{ context }}}} "
            "(or teacher.privileged: false for a control run)"
        )


def check_scoring_positions(prompt: list[int], tokenizer: Any, name: str) -> None:
    """Build padded scoring inputs as training does and verify what the scorer will read."""
    probe = tokenizer("Answer: 42", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    rows = [prompt, prompt[1:] or prompt]  # two lengths, so one row is left-padded
    p_ids, p_mask = left_pad(rows, tokenizer.pad_token_id)
    c_ids = torch.tensor([probe, probe])
    ids, attn = join(p_ids, p_mask, c_ids, torch.ones_like(c_ids, dtype=torch.bool))
    positions = position_ids_for(attn)
    for row, prompt_row in enumerate(rows):
        if ids[row, -len(probe) :].tolist() != probe or int(positions[row, -len(probe)]) != len(
            prompt_row
        ):
            raise ConfigError(
                f"data.{name}: scoring inputs do not line up with the sampled completion ids"
            )
