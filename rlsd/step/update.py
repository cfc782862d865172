"""The policy update of one step: per-token credit, the loss, micro-batches, epochs, mini-batches.

With `train.ppo_epochs = 1` and `train.mini_batches = 1` (the default) the step makes one
optimisation pass, so the "old" log-probs of the PPO ratio are the detached current ones and no
extra forward pass runs. Otherwise the old log-probs are computed once, without gradient, before
the first update (the extra forward is then needed and used), and the teacher's credit is
computed from them, so it stays fixed across the passes over one rollout batch.

Optional KL penalty to the frozen initial policy (`algorithm.kl_coef`), per token with the k3
estimator (Schulman 2020): kl_t = exp(r_t) - r_t - 1, r_t = log P_ref(y_t) - log P(y_t); it is
added to the policy loss with the same aggregation.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..algorithms import aggregate, clipped_policy_loss, loss_normaliser, masked
from ..algorithms.method import Method
from ..engine.distributed import anywhere, total
from ..engine.rollout import Batch, join
from ..engine.teacher import trim_left, used_width, widen
from ..schema.config import Config
from .records import Rows, Update


@dataclass(frozen=True)
class Policy:
    """What the update trains: the policy's scorer (wrapped by accelerate's DDP or sharded with
    FSDP2), its optimizer and the accelerator that reduces their gradients."""

    scorer: Any  # logprobs.TokenScorer, possibly wrapped: (ids, attn, completion_mask) -> (n, T)
    optimizer: torch.optim.Optimizer
    accelerator: Any  # accelerate.Accelerator
    pad_id: int  # the tokenizer's pad token (a process with no rows forwards one)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def k3_kl(
    logps: torch.Tensor, ref_logps: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference) on sampled tokens (>= 0), 0 outside
    `completion_mask`: both inputs are masked before the arithmetic, so an infinite log-prob
    at a padded position gives neither a NaN value nor a NaN gradient."""
    r = masked(ref_logps, completion_mask) - masked(logps, completion_mask)  # (N, T)
    return torch.exp(r) - r - 1.0


def _scoring_inputs(batch: Batch, rows: slice, device: torch.device, width: int | None = None):
    """A pass's inputs: prompts trimmed of shared left padding, completions cut at `width`
    columns (None: all)."""
    p_ids, p_mask = trim_left(batch.prompt_ids[rows], batch.prompt_mask[rows])
    c_ids, c_mask = batch.completion_ids[rows, :width], batch.attention[rows, :width]
    ids, attn = join(p_ids, p_mask, c_ids, c_mask)
    return ids.to(device), attn.to(device), c_mask.to(device)


@torch.no_grad()
def current_logps(policy: Policy, cfg: Config, batch: Batch) -> torch.Tensor:
    """Log-probs (n, T) under the current policy, without gradient (the PPO "old" log-probs).
    Through the unwrapped model: DDP's forward broadcasts buffers, a collective that a process
    with fewer rows (or none) would not join."""
    out, mb, share = [], cfg.train.micro_batch_size, cfg.train.share_prefix
    scorer = policy.accelerator.unwrap_model(policy.scorer)
    for s in range(0, batch.completion_ids.shape[0], mb):
        rows, width = slice(s, s + mb), batch.completion_ids.shape[1]
        args = _scoring_inputs(batch, rows, policy.device, used_width(batch.attention[rows]))
        out.append(widen(scorer(*args, share_prefix=share).cpu(), width))
    return torch.cat(out) if out else torch.zeros(0, batch.completion_ids.shape[1])


def idle_loss(policy: Policy) -> torch.Tensor:
    """A zero loss through the policy, for a process with no trained rows this update: its
    backward joins the other processes' gradient all-reduce with zero gradients."""
    ids = torch.full((1, 2), policy.pad_id, dtype=torch.long, device=policy.device)
    mask = torch.ones(1, 1, dtype=torch.bool, device=policy.device)
    return policy.scorer(ids, torch.ones_like(ids), mask).sum() * 0.0


def credit(method: Method, step: int, data: Rows, logps: torch.Tensor) -> torch.Tensor:
    """The rows' token advantages (n, T) under the method, from detached log-probs."""
    device = logps.device

    def to_dev(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(device)

    teacher = to_dev(data.teacher_logps)
    if teacher is not None and data.context_rows is not None:  # no context: Delta = 0
        teacher = torch.where(data.context_rows.to(device).unsqueeze(1), teacher, logps.detach())
    return method.token_advantages(
        step,
        data.adv.to(device),
        logps.detach(),
        teacher,
        data.batch.completion_mask.to(device),
        to_dev(data.span),
    )


def micro_batch_loss(
    policy: Policy,
    method: Method,
    cfg: Config,
    step: int,
    part: Rows,
    normaliser: float,
    sums: dict[str, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of one micro-batch (its share of the step's loss), its log-probs and its token
    advantages (computed here from the detached log-probs unless the rows already hold them);
    adds its KL terms and clip counts to `sums`. The pass runs only as far as the micro-batch's
    longest completion; the log-probs and advantages come back at the batch's width."""
    device, alg, scorer = policy.device, cfg.algorithm, policy.scorer
    full = part.batch.completion_ids.shape[1]
    part = part.cut(used_width(part.batch.attention))
    ids, attn, seen = _scoring_inputs(part.batch, slice(None), device)  # seen: every real token
    c_mask = part.batch.completion_mask.to(device)  # the model's own tokens: what is trained
    exact_kl, share = None, cfg.train.share_prefix
    if part.support_vals is None:
        logps = scorer(ids, attn, seen, share_prefix=share)  # (mb, T)
    else:  # opsd.divergence full / topk: the exact per-token KL from the same pass
        support = (
            part.support_vals.to(device),
            None if part.support_ids is None else part.support_ids.to(device),
        )
        reverse = method.reverse_divergence
        logps, exact_kl = scorer(ids, attn, seen, support, reverse, share_prefix=share)
    old = logps.detach() if part.old_logps is None else part.old_logps.to(device)
    token_adv = (
        credit(method, step, part, old) if part.token_adv is None else part.token_adv.to(device)
    )
    loss, m = clipped_policy_loss(
        logps,
        old,
        token_adv,
        c_mask,
        alg.eps_low,
        alg.eps_high,
        alg.loss_agg,
        normaliser,
        alg.dual_clip,
    )
    if exact_kl is not None:
        kl = aggregate(exact_kl, c_mask, alg.loss_agg, normaliser)
        loss = loss + method.divergence_weight * kl
        sums["opsd/kl_exact"] = sums.get("opsd/kl_exact", 0.0) + kl.item()
    if part.ref_logps is not None:
        kl_t = k3_kl(logps, part.ref_logps.to(device), c_mask)  # (mb, T)
        kl = aggregate(kl_t, c_mask, alg.loss_agg, normaliser)
        loss = loss + alg.kl_coef * kl
        sums["policy/kl_ref"] += kl.item()
    tokens = c_mask.sum().item()
    sums["clipped"] += m["policy/clip_frac"] * tokens
    sums["dual_clipped"] += m["policy/dual_clip_frac"] * tokens
    logps = logps.masked_fill(~c_mask, 0.0)  # 0 off the model's tokens, as at padding
    return loss, widen(logps, full), widen(token_adv, full)


def policy_update(
    policy: Policy, method: Method, cfg: Config, step: int, data: Rows, normaliser: float
) -> Update:
    """One optimizer step: accumulate gradients over micro-batches of `data`, then step.

    `normaliser` is the loss denominator of the rows this step covers (skipped rows included),
    summed over processes and divided by their number. Gradients are all-reduced once, at the
    last micro-batch; a process with no rows joins with a zero loss.
    Returns the detached log-probs (n, T), the token advantages used (n, T) and metrics.
    """
    acc, scorer = policy.accelerator, policy.scorer
    mb, n = cfg.train.micro_batch_size, data.adv.shape[0]
    all_logps, all_adv = [], []
    sums = {"loss/policy": 0.0, "policy/kl_ref": 0.0, "clipped": 0.0, "dual_clipped": 0.0}
    scorer.train()
    starts = list(range(0, n, mb)) or [None]
    for i, s in enumerate(starts):
        last = i == len(starts) - 1
        with contextlib.nullcontext() if last else acc.no_sync(scorer):
            if s is None:
                loss = idle_loss(policy)
            else:
                part = data.select(torch.arange(s, min(s + mb, n)))
                loss, logps, token_adv = micro_batch_loss(
                    policy, method, cfg, step, part, normaliser, sums
                )
                all_logps.append(logps.detach().cpu())
                all_adv.append(token_adv.cpu())
            acc.backward(loss)
        sums["loss/policy"] += loss.item()
    params = [p for p in scorer.parameters() if p.requires_grad]
    grad_norm = float(
        acc.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"))
    )  # inf: measure, do not clip
    finite = math.isfinite(grad_norm) and not anywhere(acc, not math.isfinite(sums["loss/policy"]))
    if finite:  # a NaN or infinite gradient is never applied (the same decision everywhere)
        policy.optimizer.step()
    policy.optimizer.zero_grad(set_to_none=True)
    tokens = max(data.batch.completion_mask.sum().item(), 1)  # clip fraction over trained tokens
    metrics = {
        "loss/policy": sums["loss/policy"],
        "policy/grad_norm": grad_norm,
        "policy/clip_frac": sums["clipped"] / tokens,
        "policy/dual_clip_frac": sums["dual_clipped"] / tokens,
        "train/nonfinite": float(not finite),
    }
    if data.ref_logps is not None:
        metrics["policy/kl_ref"] = sums["policy/kl_ref"]
    if "opsd/kl_exact" in sums:
        metrics["opsd/kl_exact"] = sums["opsd/kl_exact"]
    empty = torch.zeros(0, data.batch.completion_ids.shape[1])
    return Update(
        torch.cat(all_logps) if all_logps else empty,
        torch.cat(all_adv) if all_adv else empty,
        metrics,
    )


def optimise(
    policy: Policy,
    method: Method,
    cfg: Config,
    step: int,
    batch: Batch,
    rows: torch.Tensor,
    data: Rows,
) -> Update:
    """All optimizer steps of one rollout batch: `ppo_epochs` passes over `mini_batches` parts.

    `batch` is the whole step's batch, `rows` (N,) marks the rows in `data`. Mini-batches split
    the whole batch in order; each one's loss denominator counts all its rows, trained or not.
    The token credit is computed once per rollout batch: from the single pass's own detached
    log-probs, or, with several passes, from the old log-probs before the first, so it stays
    fixed across them.
    Returns the log-probs (n, T) the credit was computed from, that credit, and the metrics
    averaged over updates.
    """
    mode, max_new = cfg.algorithm.loss_agg, cfg.rollout.max_new_tokens
    epochs, parts = cfg.train.ppo_epochs, cfg.train.mini_batches
    size = policy.accelerator.num_processes

    def normaliser(mask: torch.Tensor) -> float:  # the global denominator's share per process
        return total(policy.accelerator, loss_normaliser(mode, mask, max_new)) / size

    if epochs == 1 and parts == 1:
        return policy_update(policy, method, cfg, step, data, normaliser(batch.completion_mask))
    if data.adv.numel() > 0:
        old = current_logps(policy, cfg, data.batch)
        data = replace(data, old_logps=old, token_adv=credit(method, step, data, old))
    else:  # no trained row here (no teacher scores either): it joins each step with a zero loss
        empty = torch.zeros(0, data.batch.completion_ids.shape[1])
        data = replace(data, old_logps=empty, token_adv=empty)
    position = rows.long().cumsum(0) - 1  # where each row of the batch sits in `data`
    history = []
    for _ in range(epochs):
        for chunk in torch.arange(rows.shape[0]).tensor_split(parts):
            chosen = chunk[rows[chunk]]
            if anywhere(policy.accelerator, chosen.numel() > 0):  # every process, or none, steps
                norm = normaliser(batch.completion_mask[chunk])
                part = data.select(position[chosen])
                history.append(policy_update(policy, method, cfg, step, part, norm).metrics)
    metrics = {k: sum(m[k] for m in history) / len(history) for k in history[0]}
    metrics["train/optimizer_steps"] = float(len(history))
    return Update(data.old_logps, data.token_adv, metrics)
