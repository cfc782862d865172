"""Group-relative advantages (GRPO, Shao et al. 2024, arXiv 2402.03300) and their variants.

For a group of G completions of one prompt with rewards r_1..r_G, with baseline b_i:

    b_i = mean(r)                                 baseline="mean" (GRPO)
    b_i = mean_{j != i} r_j                       baseline="leave_one_out" (RLOO, arXiv 2402.14740)
    A_i = (r_i - b_i) / (std(r) + eps)            scale_std=True (GRPO)
    A_i =  r_i - b_i                              scale_std=False (Dr. GRPO, arXiv 2503.20783)

std is the population std (divide by G). A group whose rewards are all equal gets A = 0 exactly
(no eps-sized noise), so it carries no policy gradient. Leave-one-out equals G / (G - 1) times the
mean-baseline advantage.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale_std: bool = True,
                     eps: float = 1e-6, baseline: str = "mean",
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """rewards (B*G,) laid out group by group -> advantages (B*G,) and metrics."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups "
                         f"of {group_size}")
    grouped = rewards.view(-1, group_size)  # (B, G)
    total = grouped.sum(dim=1, keepdim=True)
    if baseline == "mean":
        centred = grouped - total / group_size
    elif baseline == "leave_one_out":
        centred = grouped - (total - grouped) / (group_size - 1)
    else:
        raise ValueError(f"unknown baseline {baseline!r}")
    std = grouped.std(dim=1, unbiased=False, keepdim=True)
    adv = centred / (std + eps) if scale_std else centred
    flat = (std.squeeze(1) == 0)
    adv = torch.where(flat.unsqueeze(1), torch.zeros_like(adv), adv)  # all-equal groups: exact 0
    metrics = {"adv/zero_group_frac": flat.float().mean().item(),
               "adv/abs_mean": adv.abs().mean().item()}
    return adv.reshape(-1), metrics
