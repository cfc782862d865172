"""Pure functions of the training objective: tensors in, tensors and a metrics dict out."""

from .advantages import group_advantages
from .distill import opsd_token_advantages, sampled_forward_token_advantages, token_divergence
from .policy_loss import aggregate, clipped_policy_loss, loss_normaliser
from .rlsd import (answer_span_mask, credit_split, lambda_at, reasoning_span_mask,
                   reweighted_tokens, rlsd_token_advantages, span_split)

__all__ = ["aggregate", "answer_span_mask", "clipped_policy_loss", "credit_split",
           "group_advantages", "lambda_at", "loss_normaliser", "opsd_token_advantages",
           "reasoning_span_mask", "reweighted_tokens", "rlsd_token_advantages",
           "sampled_forward_token_advantages", "span_split", "token_divergence"]
