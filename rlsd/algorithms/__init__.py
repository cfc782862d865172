"""Pure functions of the training objective: tensors in, tensors and a metrics dict out.

Nothing here imports from the rest of rlsd. `method.py` says what each method is.
"""

from .advantages import group_advantages, group_outcomes
from .distill import opsd_token_advantages, sampled_forward_token_advantages, token_divergence
from .masking import masked, teacher_gap
from .method import METHODS, Method, method_for
from .policy_loss import AGGREGATIONS, aggregate, clipped_policy_loss, loss_normaliser
from .rlsd import (
    credit_split,
    lambda_at,
    reweighted_tokens,
    rlsd_credit,
    rlsd_metrics,
    rlsd_token_advantages,
)
from .spans import answer_span_mask, reasoning_span_mask, span_split, token_pieces

__all__ = [
    "AGGREGATIONS",
    "METHODS",
    "Method",
    "aggregate",
    "answer_span_mask",
    "clipped_policy_loss",
    "credit_split",
    "group_advantages",
    "group_outcomes",
    "lambda_at",
    "loss_normaliser",
    "masked",
    "method_for",
    "opsd_token_advantages",
    "reasoning_span_mask",
    "reweighted_tokens",
    "rlsd_credit",
    "rlsd_metrics",
    "rlsd_token_advantages",
    "sampled_forward_token_advantages",
    "span_split",
    "teacher_gap",
    "token_divergence",
    "token_pieces",
]
