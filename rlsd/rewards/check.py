"""`rlsd check-reward`: score the data set's own references with the configured verifiers.

A verifier that rejects the references is misconfigured (wrong extraction, wrong marker, a task
whose answers it cannot parse): it would teach nothing, or the wrong thing. Each reference answer
is written the way the configured extraction expects to find it, then scored like a completion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Config
from ..data import Record, load_records
from .combine import build_reward


def reference_completion(answer: str, extract: str, marker: str, verifier: str = "") -> str:
    """The reference answer, written where `extract` (or the code verifier) looks for it."""
    if verifier == "code":
        return f"```python\n{answer}\n```"
    if extract == "marker":
        return f"{marker} {answer}"
    if extract == "boxed":
        return f"The answer is \\boxed{{{answer}}}."
    if extract == "answer_tag":
        return f"<answer>{answer}</answer>"
    return answer


@dataclass
class CheckResult:
    total: int
    accepted: int
    metrics: dict[str, float]
    rejected: list[tuple[Record, str]] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.accepted / max(self.total, 1)


def check_references(cfg: Config, limit: int = 0, batch: int = 256) -> CheckResult:
    records = load_records(cfg.data)
    if limit:
        records = records[:limit]
    reward_fn = build_reward(cfg.reward)
    try:  # the verifier pool's workers stop when the check ends
        accepted, rejected, sums = 0, [], {}
        for start in range(0, len(records), batch):
            chunk = records[start : start + batch]
            texts = [
                reference_completion(
                    r.answer, cfg.reward.extract, cfg.reward.answer_marker, cfg.reward.verifiers[0]
                )
                for r in chunk
            ]
            columns = {
                "answer": [r.answer for r in chunk],
                "solution": [r.solution for r in chunk],
                "metadata": [r.metadata for r in chunk],
            }
            _, correct, metrics = reward_fn([r.prompt for r in chunk], texts, columns)
            for key, value in metrics.items():
                weight = len(chunk) if key.endswith("/mean") else 1
                sums[key] = sums.get(key, 0.0) + value * weight
            accepted += sum(correct)
            rejected += [(r, t) for r, t, ok in zip(chunk, texts, correct) if not ok]
        means = {k: v / len(records) if k.endswith("/mean") else v for k, v in sums.items()}
    finally:
        reward_fn.close()
    return CheckResult(len(records), accepted, means, rejected)
