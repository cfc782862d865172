"""Start-up checks that refuse a run whose teacher would be misaligned or would teach nothing.

Run once before training, on the first records:
- the teacher's prompt differs from the student's and contains the privileged context (the
  solution, else the answer); otherwise RLSD's Delta is 0 everywhere and the run is silently GRPO;
- both prompts end with the chat template's assistant header, so the completion follows the same
  context in both;
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


def generation_header(tokenizer: Any) -> list[int]:
    """The ids the chat template appends to open the assistant turn ([] without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    messages = [{"role": "user", "content": "x"}]
    bare = chat_ids(tokenizer, messages, add_generation_prompt=False)
    opened = chat_ids(tokenizer, messages, add_generation_prompt=True)
    return opened[len(bare):] if opened[:len(bare)] == bare else []


def check_teacher_prompts(renderer: PromptRenderer, tokenizer: Any, records: list[Record],
                          privileged: bool = True) -> None:
    """The teacher's prompt differs from the student's, holds the reference (unless this is a
    `teacher.privileged: false` control) and ends like the student's."""
    header = generation_header(tokenizer)
    for record in records:
        student, teacher = renderer.student_ids(record), renderer.teacher_ids(record)
        if student == teacher and privileged:
            raise ConfigError("data.teacher_template: renders the same prompt as the student's; "
                              "the teacher would see no privileged context")
        reference = (record.solution or record.answer).strip()
        text = tokenizer.decode(teacher, skip_special_tokens=False)
        if privileged and reference and reference not in text:
            raise ConfigError(f"data.teacher_template: the teacher's prompt does not contain the "
                              f"reference ({reference[:40]!r}); use {{{{ solution or answer }}}} "
                              "(or teacher.privileged: false for a control run)")
        for name, ids in (("prompt_template", student), ("teacher_template", teacher)):
            if header and ids[-len(header):] != header:
                raise ConfigError(f"data.{name}: the rendered prompt does not end with the chat "
                                  "template's assistant header; completions would follow a "
                                  "different context for student and teacher")
            check_scoring_positions(ids, tokenizer, name)


def check_scoring_positions(prompt: list[int], tokenizer: Any, name: str) -> None:
    """Build padded scoring inputs as training does and verify what the scorer will read."""
    probe = tokenizer("Answer: 42", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = [prompt, prompt[1:] or prompt]  # two lengths, so one row is left-padded
    p_ids, p_mask = left_pad(rows, tokenizer.pad_token_id)
    c_ids = torch.tensor([probe, probe])
    ids, attn = join(p_ids, p_mask, c_ids, torch.ones_like(c_ids, dtype=torch.bool))
    positions = position_ids_for(attn)
    for row, prompt_row in enumerate(rows):
        if ids[row, -len(probe):].tolist() != probe or \
                int(positions[row, -len(probe)]) != len(prompt_row):
            raise ConfigError(f"data.{name}: scoring inputs do not line up with the sampled "
                              "completion ids")
