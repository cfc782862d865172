"""On-policy self-distillation (OPSD) on the student's own samples, sampled-token estimate.

The student S samples y; the teacher T (the same network shown the privileged context, or for OPD
an external model) scores it. OPSD minimises the reverse KL(S || T) = E_{y~S}[log S(y) - log T(y)].
Because y is sampled from S, the loss written as mean(log S - stopgrad(log T)) has a gradient that
does not depend on the teacher at all (the score-function term is missing). The sampled estimate
therefore takes the policy-gradient form: each token gets the advantage

    A_t = stopgrad(log T(y_t) - log S(y_t))

and goes through the same clipped surrogate as GRPO; its gradient is E_S[-(log S - log T) grad
log S], the exact gradient of the per-token reverse KL. GRPO+OPSD (the paper's naive combination)
adds beta times this to the GRPO token advantage. Positions outside `completion_mask` are set to
0 before any arithmetic, so a -inf log-prob at a pad never produces NaN.
"""

from __future__ import annotations

import torch

from .masking import masked, teacher_gap


def opsd_token_advantages(
    logps: torch.Tensor, teacher_logps: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """(N, T) log-probs -> token advantages (N, T) = detached log T - log S on real tokens."""
    delta = teacher_gap(teacher_logps, logps, completion_mask)  # (N, T)
    n_tokens = completion_mask.sum().clamp(min=1)
    return delta, {"opsd/reverse_kl": (-delta.sum() / n_tokens).item()}


def sampled_forward_token_advantages(
    logps: torch.Tensor, teacher_logps: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Forward KL(T || S) on student samples: grad = -E_T[grad log S] = -E_S[(T/S) grad log S],
    so each sampled token gets the importance weight T/S as advantage, minus the constant 1
    (a baseline: E_S[grad log S] = 0), i.e. exp(Delta_t) - 1."""
    delta = teacher_gap(teacher_logps, logps, completion_mask)  # (N, T)
    return masked(torch.expm1(delta), completion_mask)


def token_divergence(
    student_logp: torch.Tensor,
    teacher_vals: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    reverse: bool = True,
) -> torch.Tensor:
    """Exact per-token KL between the student's distribution and the teacher's.

    student_logp (M, V): the student's log-probs over the vocabulary (with gradient).
    teacher_vals: (M, V) teacher log-probs (`full`), or (M, k) log-probs of the teacher's top-k
    tokens with their ids (M, k) (`topk`): the KL is then taken over k + 1 buckets, the k tokens
    and one tail bucket holding the rest of each distribution's mass. With k = V it equals the
    full KL. reverse: KL(S || T) = sum S (log S - log T); else forward KL(T || S).
    """
    if teacher_ids is None:
        s_lp, t_lp = student_logp, teacher_vals
    else:
        s_k = student_logp.gather(-1, teacher_ids)  # (M, k)

        def with_tail(lp: torch.Tensor) -> torch.Tensor:
            tail = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp(min=1e-30)
            return torch.cat([lp, tail.log()], dim=-1)

        s_lp, t_lp = with_tail(s_k), with_tail(teacher_vals)
    if reverse:
        return (s_lp.exp() * (s_lp - t_lp)).sum(-1)
    return (t_lp.exp() * (t_lp - s_lp)).sum(-1)
