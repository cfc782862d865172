"""PPO-style clipped surrogate with asymmetric clipping (DAPO's clip-higher, arXiv 2503.14476)
and the dual clip for negative advantages (Ye et al. 2020, arXiv 1912.09729; the RLSD reference
code's `clip_ratio_c`).

Per token, with ratio rho_t = exp(logp_t - old_logp_t) and token advantage A_t:

    l_t = -min(rho_t * A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_t)
    l_t = min(l_t, -c * A_t)                 where A_t < 0 and dual clip c > 1 (c = 0: off)

The dual clip bounds the loss of a penalised token whose ratio has grown large: with A = -1 and
rho = 5 the loss is c = 3 and its gradient zero, instead of 5 with gradient 5. It can only bite
when the ratio moves away from 1, i.e. with several optimisation passes over one rollout batch.

Aggregation over the step's batch of N completions (lengths |y_i|, at most T_max tokens):

    token_mean            sum_i sum_t l_it / sum_i |y_i|          (DAPO; the default)
    seq_mean_token_mean   (1/N) sum_i (1/|y_i|) sum_t l_it        (the original GRPO)
    constant              sum_i sum_t l_it / (N * T_max)          (Dr. GRPO)

The denominators are those of the *whole step* (`loss_normaliser`), passed in rather than taken
from each micro-batch, so gradient accumulation is exact: the micro-batch losses sum to the loss
of the full batch, and rows skipped for having zero advantage still count. With one optimisation
pass per rollout batch, old_logps are the detached current log-probs, so rho = 1 and the clip is
inactive; no extra forward pass is run for them.

Padding never produces NaN: values at positions outside `completion_mask` are replaced by 0
(`masked_fill`) before any arithmetic, so a -inf log-prob at a pad gives neither a NaN loss nor a
NaN gradient.
"""

from __future__ import annotations

import torch

from .masking import masked
from .registry import AGGREGATIONS

DUAL_CLIP = 3.0  # algorithm.dual_clip's default (tests/test_fidelity.py checks they agree)


def loss_normaliser(mode: str, completion_mask: torch.Tensor, max_new_tokens: int) -> float:
    """The denominator of `mode` for a step whose completions have this (N, T) mask."""
    if mode == "token_mean":
        return float(completion_mask.sum().clamp(min=1))
    if mode == "seq_mean_token_mean":
        return float(completion_mask.shape[0])
    if mode == "constant":
        return float(completion_mask.shape[0] * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r} (one of {', '.join(AGGREGATIONS)})")


def aggregate(
    per_token: torch.Tensor,
    completion_mask: torch.Tensor,
    mode: str,
    normaliser: float | None = None,
    max_new_tokens: int | None = None,
) -> torch.Tensor:
    """Reduce (N, T) per-token values to a scalar; `normaliser` defaults to this batch's own."""
    if normaliser is None:
        normaliser = loss_normaliser(mode, completion_mask, max_new_tokens or per_token.shape[1])
    values = masked(per_token, completion_mask)  # (N, T)
    if mode == "seq_mean_token_mean":
        lengths = completion_mask.sum(1).clamp(min=1).to(values.dtype)
        return (values.sum(1) / lengths).sum() / normaliser
    return values.sum() / normaliser


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    token_adv: torch.Tensor,
    completion_mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    agg: str = "token_mean",
    normaliser: float | None = None,
    dual_clip: float = DUAL_CLIP,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(N, T) tensors -> scalar loss and metrics (clip fractions over completion tokens). The
    dual clip defaults to the config's (`algorithm.dual_clip`), so a direct call with the clip
    bounds alone gives training's loss; pass 0 to turn it off."""
    if dual_clip and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be 0 (off) or > 1, got {dual_clip}")
    mask = completion_mask.bool()
    logps, old_logps = masked(logps, mask), masked(old_logps, mask)
    token_adv = masked(token_adv, mask)
    ratio = torch.exp(logps - old_logps)  # (N, T)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    surrogate = torch.minimum(ratio * token_adv, clipped * token_adv)  # (N, T)
    per_token = -surrogate
    dual = torch.zeros_like(mask)
    if dual_clip:
        bound = -dual_clip * token_adv  # (N, T) the largest loss a penalised token may have
        dual = (token_adv < 0) & (per_token > bound)
        per_token = torch.where(dual, bound, per_token)
    loss = aggregate(per_token, mask, agg, normaliser)
    with torch.no_grad():
        tokens = max(mask.sum().item(), 1)
        was_clipped = (ratio * token_adv) != surrogate
        metrics = {
            "policy/clip_frac": (was_clipped & mask).sum().item() / tokens,
            "policy/dual_clip_frac": (dual & mask).sum().item() / tokens,
        }
    return loss, metrics
