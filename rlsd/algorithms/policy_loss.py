"""PPO-style clipped surrogate with asymmetric clipping (DAPO's clip-higher, arXiv 2503.14476).

Per token, with ratio rho_t = exp(logp_t - old_logp_t) and token advantage A_t:

    l_t = -min(rho_t * A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_t)

Aggregation over the step's batch of N completions (lengths |y_i|, at most T_max tokens):

    token_mean            sum_i sum_t l_it / sum_i |y_i|          (DAPO; the default)
    seq_mean_token_mean   (1/N) sum_i (1/|y_i|) sum_t l_it        (the original GRPO)
    constant              sum_i sum_t l_it / (N * T_max)          (Dr. GRPO)

The denominators are those of the *whole step* (`loss_normaliser`), passed in rather than taken
from each micro-batch, so gradient accumulation is exact: the micro-batch losses sum to the loss
of the full batch, and rows skipped for having zero advantage still count. With one optimisation
pass per rollout batch, old_logps are the detached current log-probs, so rho = 1 and the clip is
inactive; no extra forward pass is run for them.
"""

from __future__ import annotations

import torch

from ..config import AGGREGATIONS


def loss_normaliser(mode: str, completion_mask: torch.Tensor, max_new_tokens: int) -> float:
    """The denominator of `mode` for a step whose completions have this (N, T) mask."""
    if mode == "token_mean":
        return float(completion_mask.sum().clamp(min=1))
    if mode == "seq_mean_token_mean":
        return float(completion_mask.shape[0])
    if mode == "constant":
        return float(completion_mask.shape[0] * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r} (one of {', '.join(AGGREGATIONS)})")


def aggregate(per_token: torch.Tensor, completion_mask: torch.Tensor, mode: str,
              normaliser: float | None = None, max_new_tokens: int | None = None) -> torch.Tensor:
    """Reduce (N, T) per-token values to a scalar; `normaliser` defaults to this batch's own."""
    mask = completion_mask.to(per_token.dtype)
    if normaliser is None:
        normaliser = loss_normaliser(mode, completion_mask, max_new_tokens or mask.shape[1])
    if mode == "seq_mean_token_mean":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_seq.sum() / normaliser
    return (per_token * mask).sum() / normaliser


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, token_adv: torch.Tensor,
                        completion_mask: torch.Tensor, eps_low: float, eps_high: float,
                        agg: str = "token_mean", normaliser: float | None = None,
                        ) -> tuple[torch.Tensor, dict[str, float]]:
    """(N, T) tensors -> scalar loss and metrics (clip fraction over completion tokens)."""
    ratio = torch.exp(logps - old_logps)  # (N, T)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * token_adv, clipped * token_adv)  # (N, T)
    loss = aggregate(per_token, completion_mask, agg, normaliser)
    mask = completion_mask.bool()
    with torch.no_grad():
        was_clipped = (ratio * token_adv) != torch.minimum(ratio * token_adv, clipped * token_adv)
        clip_frac = (was_clipped & mask).sum().item() / max(mask.sum().item(), 1)
    return loss, {"policy/clip_frac": clip_frac}
