"""Start-up checks that refuse a run whose teacher would silently teach nothing.

Run once before training, on the first records: the teacher's prompt must differ from the
student's and must contain the privileged context (the solution, else the answer); otherwise
RLSD's Delta would be 0 everywhere and the run would silently be plain GRPO.
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError
from .data import PromptRenderer, Record


def check_teacher_prompts(renderer: PromptRenderer, tokenizer: Any, records: list[Record]) -> None:
    for record in records:
        student, teacher = renderer.student_ids(record), renderer.teacher_ids(record)
        if student == teacher:
            raise ConfigError("data.teacher_template: renders the same prompt as the student's; "
                              "the teacher would see no privileged context")
        privileged = (record.solution or record.answer).strip()
        text = tokenizer.decode(teacher, skip_special_tokens=False)
        if privileged and privileged not in text:
            raise ConfigError(f"data.teacher_template: the teacher's prompt does not contain the "
                              f"reference ({privileged[:40]!r}); use {{{{ solution or answer }}}}")
