"""Start-up checks that refuse a run whose teacher would be misaligned or would teach nothing.

Run once before training:
- on every record (text only, cheap): the teacher's prompt differs from the student's and
  contains the privileged context (the solution, else the answer); otherwise RLSD's Delta is 0
  on that record and it trains as plain GRPO without a word;
- on a sample of records (`ALIGNMENT_SAMPLE`, token ids): both prompts end with the chat
  template's assistant header, so the completion follows the same context in both;
- through the very code that builds scoring inputs, the positions the scorer reads hold exactly
  the completion ids, and the first completion token gets the position right after its prompt
  whatever the padding: student and teacher score the same tokens at the same places.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import ConfigError
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


def check_teacher_prompts(
    renderer: PromptRenderer, tokenizer: Any, records: list[Record], privileged: bool = True
) -> None:
    """Every record's teacher prompt differs from the student's and holds the reference (unless
    this is a `teacher.privileged: false` control); the first `ALIGNMENT_SAMPLE` records' prompts
    also end like the student's and line up with the completion ids."""
    if privileged:
        for index, record in enumerate(records):
            check_privileged_text(renderer, record, index)
    header = generation_header(tokenizer)
    for record in records[:ALIGNMENT_SAMPLE]:
        student, teacher = renderer.student_ids(record), renderer.teacher_ids(record)
        for name, ids in (("prompt_template", student), ("teacher_template", teacher)):
            if header and ids[-len(header) :] != header:
                raise ConfigError(
                    f"data.{name}: the rendered prompt does not end with the chat "
                    "template's assistant header; completions would follow a "
                    "different context for student and teacher"
                )
            check_scoring_positions(ids, tokenizer, name)


def check_privileged_text(renderer: PromptRenderer, record: Record, index: int) -> None:
    """One record's teacher message shows it something the student's does not: the reference."""
    where = f"data.teacher_template: record {index} ({record.prompt[:40]!r})"
    teacher = renderer.teacher_text(record)
    if teacher == renderer.student_text(record):
        raise ConfigError(
            f"{where}: renders the same prompt as the student's; the teacher "
            "would see no privileged context and the record would train as GRPO"
        )
    reference = (record.solution or record.answer).strip()
    if reference and reference not in teacher:
        raise ConfigError(
            f"{where}: the teacher's prompt does not contain the reference "
            f"({reference[:40]!r}); use {{{{ solution or answer }}}} "
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
