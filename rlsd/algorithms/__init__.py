"""Pure functions of the training objective: tensors in, tensors and a metrics dict out."""

from .advantages import group_advantages
from .policy_loss import aggregate, clipped_policy_loss
from .rlsd import lambda_at, rlsd_token_advantages

__all__ = ["aggregate", "clipped_policy_loss", "group_advantages", "lambda_at",
           "rlsd_token_advantages"]
