"""One training or evaluation item: what every task source returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Record:
    """A prompt, its reference answer, an optional worked solution (the teacher's privileged
    context when present) and free-form metadata."""

    prompt: str
    answer: str
    solution: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
