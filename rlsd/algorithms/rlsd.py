"""RLSD per-token credit (Self-Distilled RLVR, arXiv 2604.03128).

The verifier fixes the direction of each sequence's update (the sign of its group advantage A);
the same model, shown privileged context (the teacher), decides how much credit each token gets:

    Delta_t = stopgrad(log P_T(y_t) - log P_S(y_t))
    w_t     = clip(exp(sign(A) * Delta_t), 1 - eps_w, 1 + eps_w)
    m_t     = (1 - lambda) + lambda * w_t        on reweighted tokens, else 1
    A_t     = A * m_t

m_t > 0, so no token's advantage changes sign. lambda = 0 gives m_t = 1 exactly (GRPO). Nothing is
renormalised after reweighting (as in the reference code). Tokens outside `completion_mask` get
A_t = 0, and their inputs are masked before any arithmetic (a -inf pad never gives NaN).
Options of the reference implementation:
- `negative_only`: only sequences with A < 0 are reweighted; the others keep m_t = 1.
- `thought_only`: only tokens inside the reasoning span are reweighted (`span_mask`, built by
  `spans.reasoning_span_mask` from the decoded text); the tag tokens and everything outside keep
  m_t = 1.
Lambda schedule (step counted from 1): linear warm-up over W steps, then linear decay to 0 over
D steps; W = D = 0 keeps lambda constant.
"""

from __future__ import annotations

import torch

from .masking import masked, teacher_gap
from .spans import span_split


def lambda_at(step: int, lam: float, warmup: int = 0, decay: int = 0) -> float:
    """The mixing weight at a 1-based step."""
    if warmup > 0 and step < warmup:
        return lam * step / warmup
    if decay > 0:
        return lam * max(1.0 - (step - warmup) / decay, 0.0)
    return lam


def reweighted_tokens(
    seq_adv: torch.Tensor,
    completion_mask: torch.Tensor,
    negative_only: bool = False,
    span_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, T) True on the tokens whose credit the teacher sets: completion tokens of sequences
    with A != 0 (A < 0 only under `negative_only`), inside `span_mask` when given."""
    sign = torch.sign(seq_adv).unsqueeze(1)
    out = completion_mask.bool() & (sign != 0)
    if negative_only:
        out = out & (sign < 0)
    if span_mask is not None:
        out = out & span_mask.bool()
    return out


def rlsd_credit(
    seq_adv: torch.Tensor,
    logps: torch.Tensor,
    teacher_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    lam: float,
    eps_w: float,
    negative_only: bool = False,
    span_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """seq_adv (N,), logps / teacher_logps / masks (N, T) -> token advantages A_t (N, T) and the
    credit multipliers m_t (N, T; 1 on tokens the teacher does not reweight). No host sync.

    `logps` may carry gradient; the credit is computed from detached values only.
    """
    delta = teacher_gap(teacher_logps, logps, completion_mask)  # (N, T)
    sign = torch.sign(seq_adv).unsqueeze(1)  # (N, 1)
    weight = torch.exp(sign * delta).clamp(1.0 - eps_w, 1.0 + eps_w)  # (N, T)
    reweighted = reweighted_tokens(seq_adv, completion_mask, negative_only, span_mask)
    multiplier = torch.where(reweighted, (1.0 - lam) + lam * weight, torch.ones_like(weight))
    token_adv = masked(seq_adv.unsqueeze(1) * multiplier, completion_mask)  # (N, T)
    return token_adv, multiplier


def rlsd_metrics(
    seq_adv: torch.Tensor,
    delta: torch.Tensor,
    token_adv: torch.Tensor,
    completion_mask: torch.Tensor,
    reweighted: torch.Tensor,
    lam: float,
    eps_w: float,
) -> dict[str, float]:
    """The step's RLSD statistics from its credit: delta = Delta (N, T, 0 at pads), the token
    advantages and the reweighted tokens (`reweighted_tokens`)."""
    tokens = completion_mask.bool()
    raw = torch.exp(torch.sign(seq_adv).unsqueeze(1) * delta)  # (N, T) unclipped weights
    weight = raw.clamp(1.0 - eps_w, 1.0 + eps_w)

    def mean_over(x: torch.Tensor, where: torch.Tensor) -> float:
        return (masked(x.to(delta.dtype), where).sum() / where.sum().clamp(min=1)).item()

    d_mean = mean_over(delta, tokens)
    return {
        "rlsd/lambda": lam,
        "rlsd/delta_mean": d_mean,
        "rlsd/delta_std": mean_over((delta - d_mean) ** 2, tokens) ** 0.5,
        "rlsd/weight_mean": mean_over(weight, reweighted),
        "rlsd/clip_low_frac": mean_over(raw < 1.0 - eps_w, reweighted),
        "rlsd/clip_high_frac": mean_over(raw > 1.0 + eps_w, reweighted),
        "rlsd/adv_abs_mean": mean_over(token_adv.abs(), tokens),
        "rlsd/reweighted_frac": mean_over(reweighted, tokens),
    }


def rlsd_token_advantages(
    seq_adv: torch.Tensor,
    logps: torch.Tensor,
    teacher_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    lam: float,
    eps_w: float,
    negative_only: bool = False,
    span_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`rlsd_credit` and `rlsd_metrics` in one call: token advantages (N, T) and metrics."""
    token_adv, multiplier = rlsd_credit(
        seq_adv, logps, teacher_logps, completion_mask, lam, eps_w, negative_only, span_mask
    )
    reweighted = reweighted_tokens(seq_adv, completion_mask, negative_only, span_mask)
    delta = teacher_gap(teacher_logps, logps, completion_mask)
    metrics = rlsd_metrics(seq_adv, delta, token_adv, completion_mask, reweighted, lam, eps_w)
    if span_mask is not None:
        metrics.update(span_split(multiplier, span_mask, completion_mask))
    return token_adv, metrics


def credit_split(
    delta: torch.Tensor,
    groups: dict[str, torch.Tensor],
    clip: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> dict[str, float]:
    """Per group of tokens ((N, T) bool, completion tokens only): mean and std of the
    teacher-student gap Delta (N, T); with `clip` = (seq_adv (N,), reweighted (N, T), eps_w),
    the fractions of the group's reweighted tokens whose RLSD weight exp(sign(A) * Delta) was
    clipped low (< 1 - eps_w) and high (> 1 + eps_w). A group without tokens is left out."""
    out = {}
    if clip is not None:
        seq_adv, reweighted, eps_w = clip
        raw = torch.exp(torch.sign(seq_adv).unsqueeze(1) * delta)  # (N, T) unclipped weights
    for name, where in groups.items():
        if not where.any():
            continue
        values = delta[where]
        out[f"rlsd/delta_mean_{name}"] = values.mean().item()
        out[f"rlsd/delta_std_{name}"] = values.std(unbiased=False).item()
        if clip is None:
            continue
        active = where & reweighted
        if active.any():
            out[f"rlsd/clip_low_frac_{name}"] = (raw[active] < 1.0 - eps_w).float().mean().item()
            out[f"rlsd/clip_high_frac_{name}"] = (raw[active] > 1.0 + eps_w).float().mean().item()
    return out
