"""On-policy self-distillation (OPSD) on the student's own samples, sampled-token estimate.

The student S samples y; the teacher T (the same network shown the privileged context, or for OPD
an external model) scores it. OPSD minimises the reverse KL(S || T) = E_{y~S}[log S(y) - log T(y)].
Because y is sampled from S, the loss written as mean(log S - stopgrad(log T)) has a gradient that
does not depend on the teacher at all (the score-function term is missing). The sampled estimate
therefore takes the policy-gradient form: each token gets the advantage

    A_t = stopgrad(log T(y_t) - log S(y_t))

and goes through the same clipped surrogate as GRPO; its gradient is E_S[-(log S - log T) grad
log S], the exact gradient of the per-token reverse KL. GRPO+OPSD (the paper's naive combination)
adds beta times this to the GRPO token advantage.
"""

from __future__ import annotations

import torch


def opsd_token_advantages(logps: torch.Tensor, teacher_logps: torch.Tensor,
                          completion_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """(N, T) log-probs -> token advantages (N, T) = detached log T - log S on real tokens."""
    mask = completion_mask.to(logps.dtype)
    delta = (teacher_logps - logps).detach() * mask  # (N, T)
    n_tokens = mask.sum().clamp(min=1)
    return delta, {"opsd/reverse_kl": (-delta.sum() / n_tokens).item()}
