"""Per-token log-probabilities of given completion ids, without a full (N, T, V) log-softmax.

log P(y_t) = z_t[y_t] - logsumexp(z_t), with z_t = lm_head(h_t) / temperature. The backbone runs
once over [prompt ; completion]; the vocabulary projection runs only on the hidden states that
predict real completion tokens (padding and prompt positions are skipped), a chunk of rows at a
time. Under autograd each chunk is checkpointed, so its (rows, V) logits are recomputed in the
backward pass instead of being kept: peak memory is one chunk of logits, not the whole batch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 scale: float, softcap: float) -> torch.Tensor:
    logits = F.linear(hidden, weight).float() * scale  # (rows, V)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (rows,)
    return picked - torch.logsumexp(logits, dim=-1)


def gather_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    chunk_rows: int = 256, scale: float = 1.0, softcap: float = 0.0,
                    ) -> torch.Tensor:
    """hidden (M, H), lm-head weight (V, H), targets (M,) -> log-probs (M,) in float32."""
    out = []
    for start in range(0, hidden.shape[0], chunk_rows):
        args = (hidden[start:start + chunk_rows], weight, targets[start:start + chunk_rows],
                scale, softcap)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            out.append(checkpoint(_chunk_logps, *args, use_reentrant=False))
        else:
            out.append(_chunk_logps(*args))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: cumulative sum of the mask minus 1 (pads at 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class TokenScorer(nn.Module):
    """Wraps a causal LM (plain or peft) so one forward returns completion log-probs.

    A module, not a function, so that a distributed wrapper (DDP via accelerate) sees the
    forward pass that produces the loss.
    """

    def __init__(self, lm: nn.Module, temperature: float = 1.0, chunk_rows: int = 256):
        super().__init__()
        self.lm = lm
        self.temperature = temperature
        self.chunk_rows = chunk_rows

    def _parts(self) -> tuple[nn.Module, nn.Module, float]:
        base = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        softcap = float(getattr(base.config, "final_logit_softcapping", None) or 0.0)
        return base.get_decoder(), base.get_output_embeddings(), softcap

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                completion_mask: torch.Tensor) -> torch.Tensor:
        """input_ids (N, P + T): left-padded prompt, then completion ids whose validity is
        completion_mask (N, T). Returns log-probs (N, T) of the completion ids, 0 where masked.
        """
        decoder, head, softcap = self._parts()
        width = completion_mask.shape[1]
        prompt_width = input_ids.shape[1] - width
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids_for(attention_mask),
                         use_cache=False).last_hidden_state  # (N, P + T, H)
        predicting = hidden[:, prompt_width - 1:-1]  # (N, T, H): position t predicts token t
        valid = completion_mask.bool()
        targets = input_ids[:, prompt_width:][valid]  # (M,)
        picked = gather_logprobs(predicting[valid], head.weight, targets, self.chunk_rows,
                                 1.0 / self.temperature, softcap)
        out = torch.zeros(completion_mask.shape, dtype=torch.float32, device=hidden.device)
        return out.masked_scatter(valid, picked)


def naive_logprobs(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Reference: full logits, full log-softmax, gather. Used by tests and benchmarks."""
    width = completion_mask.shape[1]
    logits = lm(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_for(attention_mask)).logits.float()
    logp = torch.log_softmax(logits[:, -width - 1:-1] / temperature, dim=-1)
    picked = logp.gather(-1, input_ids[:, -width:].unsqueeze(-1)).squeeze(-1)
    return picked * completion_mask
