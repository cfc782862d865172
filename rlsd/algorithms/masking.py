"""Masking without multiplication: padding can never turn into NaN.

`x * mask` gives NaN where x is +/-inf at a padded position (inf * 0), and so does its gradient.
Every pure function of the objective takes its (N, T) inputs through `masked` first: positions
outside `completion_mask` become 0 (and get zero gradient) before any arithmetic.
"""

from __future__ import annotations

import torch


def masked(x: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """x with every position outside the mask set to 0 (gradient 0 there, never inf * 0)."""
    return x.masked_fill(~completion_mask.bool(), 0.0)


def teacher_gap(
    teacher_logps: torch.Tensor, logps: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Delta_t = stopgrad(log P_T(y_t) - log P_S(y_t)) on completion tokens, 0 elsewhere."""
    return masked(teacher_logps.detach(), completion_mask) - masked(
        logps.detach(), completion_mask
    )  # (N, T)
