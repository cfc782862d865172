"""RLSD per-token credit (Self-Distilled RLVR, arXiv 2604.03128).

The verifier fixes the direction of each sequence's update (the sign of its group advantage A);
the same model, shown privileged context (the teacher), decides how much credit each token gets:

    Delta_t = stopgrad(log P_T(y_t) - log P_S(y_t))
    w_t     = clip(exp(sign(A) * Delta_t), 1 - eps_w, 1 + eps_w)
    m_t     = (1 - lambda) + lambda * w_t
    A_t     = A * m_t

m_t > 0, so no token's advantage changes sign. lambda = 0 gives m_t = 1 exactly (GRPO). Nothing is
renormalised after reweighting (as in the reference code). Tokens outside `completion_mask` get
A_t = 0. Lambda schedule (step counted from 1): linear warm-up over W steps, then linear decay to 0
over D steps; W = D = 0 keeps lambda constant.
"""

from __future__ import annotations

import torch


def lambda_at(step: int, lam: float, warmup: int = 0, decay: int = 0) -> float:
    """The mixing weight at a 1-based step."""
    if warmup > 0 and step < warmup:
        return lam * step / warmup
    if decay > 0:
        return lam * max(1.0 - (step - warmup) / decay, 0.0)
    return lam


def rlsd_token_advantages(seq_adv: torch.Tensor, logps: torch.Tensor,
                          teacher_logps: torch.Tensor, completion_mask: torch.Tensor,
                          lam: float, eps_w: float) -> tuple[torch.Tensor, dict[str, float]]:
    """seq_adv (N,), logps / teacher_logps / completion_mask (N, T) -> token advantages (N, T).

    `logps` may carry gradient; the credit is computed from detached values only.
    """
    mask = completion_mask.to(logps.dtype)
    delta = (teacher_logps - logps).detach()  # (N, T)
    sign = torch.sign(seq_adv).unsqueeze(1)  # (N, 1)
    raw = torch.exp(sign * delta)  # (N, T)
    weight = raw.clamp(1.0 - eps_w, 1.0 + eps_w)
    multiplier = (1.0 - lam) + lam * weight  # (N, T)
    token_adv = seq_adv.unsqueeze(1) * multiplier * mask  # (N, T)

    active = (mask > 0) & (sign != 0)  # tokens whose credit the teacher can change
    n_active = active.sum().clamp(min=1)
    n_tokens = mask.sum().clamp(min=1)

    def mean_over(x: torch.Tensor, where: torch.Tensor, count: torch.Tensor) -> float:
        return (x * where).sum().div(count).item()

    d_mean = mean_over(delta, mask > 0, n_tokens)
    d_var = mean_over((delta - d_mean) ** 2, mask > 0, n_tokens)
    metrics = {
        "rlsd/lambda": lam,
        "rlsd/delta_mean": d_mean,
        "rlsd/delta_std": d_var ** 0.5,
        "rlsd/weight_mean": mean_over(weight, active, n_active),
        "rlsd/clip_low_frac": mean_over((raw < 1.0 - eps_w).to(mask.dtype), active, n_active),
        "rlsd/clip_high_frac": mean_over((raw > 1.0 + eps_w).to(mask.dtype), active, n_active),
        "rlsd/adv_abs_mean": mean_over(token_adv.abs(), mask > 0, n_tokens),
    }
    return token_adv, metrics
