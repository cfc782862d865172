"""The self-teacher: the policy's network shown the privileged context, scoring sampled ids.

Modes:
- `live`: the current policy. No extra memory; Delta then measures only what the privileged
  context changes.
- `frozen`: the initial policy. With LoRA it is the base model with the adapter disabled (no copy,
  no memory); with full fine-tuning a frozen copy of the initial weights is kept.

The teacher only ever needs the log-probs of the sampled tokens, computed without autograd.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch

from .logprobs import TokenScorer
from .rollout import join


class Teacher:
    def __init__(self, mode: str, scorer: TokenScorer, lora: bool, batch_size: int):
        self.mode, self.lora, self.batch_size = mode, lora, batch_size
        self.scorer = scorer
        self.frozen_copy: TokenScorer | None = None
        if mode == "frozen" and not lora:
            lm = copy.deepcopy(scorer.lm).eval().requires_grad_(False)
            self.frozen_copy = TokenScorer(lm, scorer.temperature, scorer.chunk_rows)

    @contextlib.contextmanager
    def _weights(self) -> Iterator[TokenScorer]:
        if self.mode == "frozen" and self.lora:
            with self.scorer.lm.disable_adapter():
                yield self.scorer
        else:
            yield self.frozen_copy or self.scorer

    @torch.no_grad()
    def logprobs(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                 device: torch.device) -> torch.Tensor:
        """Teacher log-probs (N, T) of the completion ids after the teacher's own prompts."""
        out = []
        with self._weights() as scorer:
            was_training = scorer.training
            scorer.eval()
            for s in range(0, completion_ids.shape[0], self.batch_size):
                rows = slice(s, s + self.batch_size)
                p_ids, p_mask = trim_left(prompt_ids[rows], prompt_mask[rows])
                ids, mask = join(p_ids, p_mask, completion_ids[rows], completion_mask[rows])
                out.append(scorer(ids.to(device), mask.to(device),
                                  completion_mask[rows].to(device)).cpu())
            scorer.train(was_training)
        return torch.cat(out)


def trim_left(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row of a left-padded slice."""
    keep = int(mask.sum(1).max().item())
    return ids[:, ids.shape[1] - keep:], mask[:, mask.shape[1] - keep:]
