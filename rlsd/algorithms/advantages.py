"""Group-relative advantages (GRPO, Shao et al. 2024, arXiv 2402.03300) and their variants.

For a group of G completions of one prompt with rewards r_1..r_G, with baseline b_i:

    b_i = mean(r)                                 baseline="mean" (GRPO)
    b_i = mean_{j != i} r_j                       baseline="leave_one_out" (RLOO, arXiv 2402.14740)
    A_i = (r_i - b_i) / (std(r) + eps)            scale_std=True (GRPO)
    A_i =  r_i - b_i                              scale_std=False (Dr. GRPO, arXiv 2503.20783)

std is the unbiased sample std (divide by G - 1) by default, as in the RLSD reference code (verl's
`torch.std`) and TRL; `std="population"` divides by G instead, which makes every advantage
sqrt(G / (G - 1)) times larger (1.155x at G = 4: rewards [1, 0, 0, 0] give 1.732 instead of 1.5).
rlsd used the population std before 2026-12; the committed CPU and GPU studies ran with it.
A group whose rewards are all equal gets A = 0 exactly (no eps-sized noise), so it carries no
policy gradient. Leave-one-out equals G / (G - 1) times the mean-baseline advantage.
"""

from __future__ import annotations

import torch

from .registry import BASELINES, STD_ESTIMATORS


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale_std: bool = True,
    eps: float = 1e-6,
    baseline: str = "mean",
    std: str = "unbiased",
) -> tuple[torch.Tensor, dict[str, float]]:
    """rewards (B*G,) laid out group by group -> advantages (B*G,) and metrics."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}"
        )
    if std not in STD_ESTIMATORS:
        raise ValueError(f"unknown std estimator {std!r} (one of {', '.join(STD_ESTIMATORS)})")
    grouped = rewards.view(-1, group_size)  # (B, G)
    total = grouped.sum(dim=1, keepdim=True)
    if baseline == "mean":
        centred = grouped - total / group_size
    elif baseline == "leave_one_out":
        centred = grouped - (total - grouped) / (group_size - 1)
    else:
        raise ValueError(f"unknown baseline {baseline!r} (one of {', '.join(BASELINES)})")
    spread = grouped.std(dim=1, unbiased=std == "unbiased", keepdim=True)  # (B, 1)
    adv = centred / (spread + eps) if scale_std else centred
    flat = grouped.eq(grouped[:, :1]).all(dim=1)  # (B,) all rewards equal
    adv = torch.where(flat.unsqueeze(1), torch.zeros_like(adv), adv)  # all-equal groups: exact 0
    metrics = {
        "adv/zero_group_frac": flat.float().mean().item(),
        "adv/abs_mean": adv.abs().mean().item(),
    }
    return adv.reshape(-1), metrics


def group_outcomes(correct: torch.Tensor, group_size: int) -> dict[str, float]:
    """correct (B*G,) bool, laid out group by group -> the shares of groups whose completions
    were all correct, all wrong, or mixed. With a binary verifier only the mixed groups carry
    a gradient; an all-wrong group, where a teacher that knows the solution has the most to
    say, gets zero advantage, so RLSD (whose credit scales the advantage) learns nothing from it
    either, while OPSD's teacher still pulls on it."""
    if correct.dim() != 1 or correct.numel() == 0 or correct.numel() % group_size:
        raise ValueError(
            f"{tuple(correct.shape)} correctness flags do not split into groups of {group_size}"
        )
    hits = correct.view(-1, group_size).sum(dim=1)  # (B,) correct completions per group
    return {
        "all_correct": (hits == group_size).float().mean().item(),
        "all_wrong": (hits == 0).float().mean().item(),
        "mixed": ((hits > 0) & (hits < group_size)).float().mean().item(),
    }


def mixed_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards (B*G,) laid out group by group -> (B,) True where the group's rewards differ:
    the groups that carry a policy gradient (any other has A = 0 under every baseline). Dynamic
    sampling keeps these (DAPO, arXiv 2503.14476)."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}"
        )
    grouped = rewards.view(-1, group_size)  # (B, G)
    return ~grouped.eq(grouped[:, :1]).all(dim=1)
