"""PPO-style clipped surrogate with asymmetric clipping (DAPO's clip-higher, arXiv 2503.14476).

Per token, with ratio rho_t = exp(logp_t - old_logp_t) and token advantage A_t:

    l_t = -min(rho_t * A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_t)

Aggregation `token_mean`: sum of l_t over every completion token of the *whole step's batch*,
divided by that batch's token count (`normaliser`). Passing the normaliser in, rather than
dividing by each micro-batch's own count, makes gradient accumulation exact: the sum of the
micro-batch losses equals the loss of the full batch. With one optimisation pass per rollout
batch, old_logps are the detached current log-probs, so rho = 1 and the clip is inactive; no
extra forward pass is run for them.
"""

from __future__ import annotations

import torch


def aggregate(per_token: torch.Tensor, completion_mask: torch.Tensor, mode: str,
              normaliser: float | None = None) -> torch.Tensor:
    """Reduce (N, T) per-token values to a scalar; `normaliser` defaults to this batch's."""
    mask = completion_mask.to(per_token.dtype)
    if mode == "token_mean":
        denom = mask.sum().clamp(min=1) if normaliser is None else normaliser
        return (per_token * mask).sum() / denom
    raise ValueError(f"unknown loss aggregation {mode!r}")


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
