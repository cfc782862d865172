"""Verifiers: reward functions `fn(prompts, completions, **columns) -> list[float | None]`.

`build_reward` turns the `reward` config section into one callable that scores a batch, sums the
weighted verifiers, and reports each verifier's mean and how many items it could not judge.
"""

from .builtin import BUILTIN, extract_after_marker, extract_answer, extract_last_number
from .combine import RewardFn, build_reward
from .loading import load_callable

__all__ = [
    "BUILTIN",
    "RewardFn",
    "build_reward",
    "extract_after_marker",
    "extract_answer",
    "extract_last_number",
    "load_callable",
]
