"""Held-out accuracy of a model under a run's prompts and verifiers (greedy decoding)."""

from __future__ import annotations

from typing import Any

import torch

from .config import Config
from .data import PromptRenderer, Record
from .rewards import build_reward, extract_last_number
from .rollout import sample_completions


def heldout_records(records: list[Record], candidates: list[Record], n: int) -> list[Record]:
    """The first n candidates whose question does not occur in the training records."""
    seen = {r.prompt for r in records}
    return [r for r in candidates if r.prompt not in seen][:n]


@torch.no_grad()
def greedy_accuracy(cfg: Config, lm: Any, tokenizer: Any, records: list[Record],
                    stop_ids: list[int], device: torch.device, batch_size: int = 32,
                    ) -> dict[str, Any]:
    """Accuracy (the first verifier at full marks) and lenient accuracy (the last number in the
    reply equals the answer) of greedy completions, with the completions themselves."""
    renderer = PromptRenderer(cfg.data, tokenizer)
    reward_fn = build_reward(cfg.reward)
    texts: list[str] = []
    correct: list[bool] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        batch = sample_completions(lm, [renderer.student_ids(r) for r in chunk], cfg.rollout,
                                   tokenizer.pad_token_id, stop_ids, device, greedy=True)
        out = tokenizer.batch_decode([i[m].tolist() for i, m in zip(batch.completion_ids,
                                                                    batch.completion_mask)],
                                     skip_special_tokens=True)
        columns = {"answer": [r.answer for r in chunk], "solution": [r.solution for r in chunk],
                   "metadata": [r.metadata for r in chunk]}
        correct += reward_fn([renderer.student_text(r) for r in chunk], out, columns)[1]
        texts += out
    lenient = [extract_last_number(t) is not None and
               extract_last_number(t) == extract_last_number(r.answer)
               for t, r in zip(texts, records)]
    return {"n": len(records), "accuracy": sum(correct) / len(records),
            "lenient_accuracy": sum(lenient) / len(records), "completions": texts}
