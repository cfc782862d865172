"""RLSD per-token credit (Self-Distilled RLVR, arXiv 2604.03128).

The verifier fixes the direction of each sequence's update (the sign of its group advantage A);
the same model, shown privileged context (the teacher), decides how much credit each token gets:

    Delta_t = stopgrad(log P_T(y_t) - log P_S(y_t))
    w_t     = clip(exp(sign(A) * Delta_t), 1 - eps_w, 1 + eps_w)
    m_t     = (1 - lambda) + lambda * w_t        on reweighted tokens, else 1
    A_t     = A * m_t

m_t > 0, so no token's advantage changes sign. lambda = 0 gives m_t = 1 exactly (GRPO). Nothing is
renormalised after reweighting (as in the reference code). Tokens outside `completion_mask` get
A_t = 0. Options of the reference implementation:
- `negative_only`: only sequences with A < 0 are reweighted; the others keep m_t = 1.
- `thought_only`: only tokens inside the reasoning span are reweighted (`span_mask`, built by
  `reasoning_span_mask`); the tag tokens and everything outside keep m_t = 1.
Lambda schedule (step counted from 1): linear warm-up over W steps, then linear decay to 0 over
D steps; W = D = 0 keeps lambda constant.
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


def _find(ids: list[int], pattern: list[int], start: int) -> int:
    """First index >= start where `pattern` occurs in `ids`, or -1."""
    n = len(pattern)
    for i in range(start, len(ids) - n + 1):
        if ids[i:i + n] == pattern:
            return i
    return -1


def reasoning_span_mask(completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                        open_ids: list[int], close_ids: list[int]) -> torch.Tensor:
    """(N, T) True on tokens strictly between the open and close tag id sequences.

    Matching is on token ids, never on re-tokenized text. Several spans per completion are
    allowed; an unclosed span runs to the end of the completion.
    """
    out = torch.zeros_like(completion_mask, dtype=torch.bool)
    for row in range(completion_ids.shape[0]):
        length = int(completion_mask[row].sum())
        ids = completion_ids[row, :length].tolist()
        pos = 0
        while (start := _find(ids, open_ids, pos)) >= 0:
            inner = start + len(open_ids)
            end = _find(ids, close_ids, inner)
            stop = length if end < 0 else end
            out[row, inner:stop] = True
            pos = length if end < 0 else end + len(close_ids)
    return out


def reweighted_tokens(seq_adv: torch.Tensor, completion_mask: torch.Tensor,
                      negative_only: bool = False, span_mask: torch.Tensor | None = None
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


def rlsd_token_advantages(seq_adv: torch.Tensor, logps: torch.Tensor,
                          teacher_logps: torch.Tensor, completion_mask: torch.Tensor,
                          lam: float, eps_w: float, negative_only: bool = False,
                          span_mask: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, dict[str, float]]:
    """seq_adv (N,), logps / teacher_logps / masks (N, T) -> token advantages (N, T).

    `logps` may carry gradient; the credit is computed from detached values only.
    """
    mask = completion_mask.to(logps.dtype)
    delta = (teacher_logps - logps).detach()  # (N, T)
    sign = torch.sign(seq_adv).unsqueeze(1)  # (N, 1)
    raw = torch.exp(sign * delta)  # (N, T)
    weight = raw.clamp(1.0 - eps_w, 1.0 + eps_w)
    reweighted = reweighted_tokens(seq_adv, completion_mask, negative_only, span_mask)
    multiplier = torch.where(reweighted, (1.0 - lam) + lam * weight, torch.ones_like(weight))
    token_adv = seq_adv.unsqueeze(1) * multiplier * mask  # (N, T)

    n_active = reweighted.sum().clamp(min=1)
    n_tokens = mask.sum().clamp(min=1)

    def mean_over(x: torch.Tensor, where: torch.Tensor, count: torch.Tensor) -> float:
        return (x * where).sum().div(count).item()

    d_mean = mean_over(delta, mask > 0, n_tokens)
    d_var = mean_over((delta - d_mean) ** 2, mask > 0, n_tokens)
    metrics = {
        "rlsd/lambda": lam,
        "rlsd/delta_mean": d_mean,
        "rlsd/delta_std": d_var ** 0.5,
        "rlsd/weight_mean": mean_over(weight, reweighted, n_active),
        "rlsd/clip_low_frac": mean_over((raw < 1.0 - eps_w).to(mask.dtype), reweighted, n_active),
        "rlsd/clip_high_frac": mean_over((raw > 1.0 + eps_w).to(mask.dtype), reweighted,
                                         n_active),
        "rlsd/adv_abs_mean": mean_over(token_adv.abs(), mask > 0, n_tokens),
        "rlsd/reweighted_frac": mean_over(reweighted.to(mask.dtype), mask > 0, n_tokens),
    }
    if span_mask is not None:
        metrics.update(span_split(multiplier, span_mask, completion_mask))
    return token_adv, metrics


def span_split(multiplier: torch.Tensor, span_mask: torch.Tensor,
               completion_mask: torch.Tensor) -> dict[str, float]:
    """Mean credit multiplier inside the reasoning span and outside it (the answer)."""
    out = {}
    for name, where in (("thought", span_mask.bool()), ("answer", ~span_mask.bool())):
        where = where & completion_mask.bool()
        if where.any():
            out[f"rlsd/multiplier_mean_{name}"] = multiplier[where].mean().item()
    return out


def answer_span_mask(pieces: list[list[str]], anchor: str, width: int) -> torch.Tensor:
    """(N, width) True from the token holding the start of the last `anchor` (e.g. "Answer:")
    to the end of the completion: the final-answer tokens; a row without the anchor has none.
    `pieces[i]` holds the decoded text of each of row i's completion tokens, in order."""
    out = torch.zeros(len(pieces), width, dtype=torch.bool)
    for row, parts in enumerate(pieces):
        pos = "".join(parts).rfind(anchor)
        end = 0
        for t, part in enumerate(parts if pos >= 0 else []):
            end += len(part)
            if end > pos:
                out[row, t:len(parts)] = True
                break
    return out


def credit_split(delta: torch.Tensor, groups: dict[str, torch.Tensor],
                 clip: tuple[torch.Tensor, torch.Tensor, float] | None = None
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
