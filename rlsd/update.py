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
from dataclasses import dataclass
from typing import Any

import torch

from .algorithms import aggregate, clipped_policy_loss, loss_normaliser
from .distributed import anywhere, total
from .rollout import Batch, join
from .teacher import trim_left, used_width, widen


@dataclass
class Rows:
    """The rows of a step that carry a gradient, with everything their loss needs."""

    batch: Batch
    adv: torch.Tensor  # (n,) sequence advantages
    teacher_logps: torch.Tensor | None = None  # (n, T)
    ref_logps: torch.Tensor | None = None  # (n, T) frozen initial policy, for the KL penalty
    old_logps: torch.Tensor | None = None  # (n, T) only with several passes per batch
    span: torch.Tensor | None = None  # (n, T) reasoning span (rlsd)
    support_vals: torch.Tensor | None = None  # (n, T, k or V) teacher log-probs (full / topk)
    support_ids: torch.Tensor | None = None  # (n, T, k) their token ids (topk)
    token_adv: torch.Tensor | None = None  # (n, T) the step's credit, computed once
    context_rows: torch.Tensor | None = None  # (n,) rows whose teacher saw a context (None: all)

    def select(self, idx: torch.Tensor) -> Rows:
        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[idx]

        return Rows(
            self.batch.select(idx),
            self.adv[idx],
            pick(self.teacher_logps),
            pick(self.ref_logps),
            pick(self.old_logps),
            pick(self.span),
            pick(self.support_vals),
            pick(self.support_ids),
            pick(self.token_adv),
            pick(self.context_rows),
        )

    def cut(self, width: int) -> Rows:
        """The rows with every per-token field cut at `width` completion columns."""

        def cols(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[:, :width]

        b = self.batch
        return Rows(
            Batch(b.prompt_ids, b.prompt_mask, cols(b.completion_ids), cols(b.completion_mask)),
            self.adv,
            cols(self.teacher_logps),
            cols(self.ref_logps),
            cols(self.old_logps),
            cols(self.span),
            cols(self.support_vals),
            cols(self.support_ids),
            cols(self.token_adv),
            self.context_rows,
        )


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference) on sampled tokens (>= 0)."""
    r = ref_logps - logps
    return torch.exp(r) - r - 1.0


def _scoring_inputs(batch: Batch, rows: slice, device: torch.device, width: int | None = None):
    """A pass's inputs: prompts trimmed of shared left padding, completions cut at `width`
    columns (None: all)."""
    p_ids, p_mask = trim_left(batch.prompt_ids[rows], batch.prompt_mask[rows])
    c_ids, c_mask = batch.completion_ids[rows, :width], batch.completion_mask[rows, :width]
    ids, attn = join(p_ids, p_mask, c_ids, c_mask)
    return ids.to(device), attn.to(device), c_mask.to(device)


@torch.no_grad()
def current_logps(run: Any, batch: Batch) -> torch.Tensor:
    """Log-probs (n, T) under the current policy, without gradient (the PPO "old" log-probs).
    Through the unwrapped model: DDP's forward broadcasts buffers, a collective that a process
    with fewer rows (or none) would not join."""
    out, mb, share = [], run.cfg.train.micro_batch_size, run.cfg.train.share_prefix
    scorer = run.accelerator.unwrap_model(run.scorer)
    for s in range(0, batch.completion_ids.shape[0], mb):
        rows, width = slice(s, s + mb), batch.completion_ids.shape[1]
        args = _scoring_inputs(batch, rows, run.device, used_width(batch.completion_mask[rows]))
        out.append(widen(scorer(*args, share_prefix=share).cpu(), width))
    return torch.cat(out) if out else torch.zeros(0, batch.completion_ids.shape[1])


def idle_loss(run: Any) -> torch.Tensor:
    """A zero loss through the policy, for a process with no trained rows this update: its
    backward joins the other processes' gradient all-reduce with zero gradients."""
    pad = run.tokenizer.pad_token_id
    ids = torch.full((1, 2), pad, dtype=torch.long, device=run.device)
    mask = torch.ones(1, 1, dtype=torch.bool, device=run.device)
    return run.scorer(ids, torch.ones_like(ids), mask).sum() * 0.0


def credit(run: Any, step: int, data: Rows, logps: torch.Tensor) -> torch.Tensor:
    """The rows' token advantages (n, T) under the run's method, from detached log-probs."""
    device = logps.device

    def to_dev(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(device)

    teacher = to_dev(data.teacher_logps)
    if teacher is not None and data.context_rows is not None:  # no context: Delta = 0
        teacher = torch.where(data.context_rows.to(device).unsqueeze(1), teacher, logps.detach())
    return run.method.token_advantages(
        step,
        data.adv.to(device),
        logps.detach(),
        teacher,
        data.batch.completion_mask.to(device),
        to_dev(data.span),
    )


def micro_batch_loss(
    run: Any, step: int, part: Rows, normaliser: float, sums: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of one micro-batch (its share of the step's loss), its log-probs and its token
    advantages (computed here from the detached log-probs unless the rows already hold them);
    adds its KL terms and clip counts to `sums`. The pass runs only as far as the micro-batch's
    longest completion; the log-probs and advantages come back at the batch's width."""
    cfg, device, alg, method = run.cfg, run.device, run.cfg.algorithm, run.method
    full = part.batch.completion_ids.shape[1]
    part = part.cut(used_width(part.batch.completion_mask))
    ids, attn, c_mask = _scoring_inputs(part.batch, slice(None), device)
    exact_kl, share = None, cfg.train.share_prefix
    if part.support_vals is None:
        logps = run.scorer(ids, attn, c_mask, share_prefix=share)  # (mb, T)
    else:  # opsd.divergence full / topk: the exact per-token KL from the same pass
        support = (
            part.support_vals.to(device),
            None if part.support_ids is None else part.support_ids.to(device),
        )
        reverse = cfg.opsd.direction == "reverse"
        logps, exact_kl = run.scorer(ids, attn, c_mask, support, reverse, share_prefix=share)
    old = logps.detach() if part.old_logps is None else part.old_logps.to(device)
    token_adv = (
        credit(run, step, part, old) if part.token_adv is None else part.token_adv.to(device)
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
        kl = aggregate(k3_kl(logps, part.ref_logps.to(device)), c_mask, alg.loss_agg, normaliser)
        loss = loss + alg.kl_coef * kl
        sums["policy/kl_ref"] += kl.item()
    tokens = c_mask.sum().item()
    sums["clipped"] += m["policy/clip_frac"] * tokens
    sums["dual_clipped"] += m["policy/dual_clip_frac"] * tokens
    return loss, widen(logps, full), widen(token_adv, full)


def policy_update(
    run: Any, step: int, data: Rows, normaliser: float
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One optimizer step: accumulate gradients over micro-batches of `data`, then step.

    `normaliser` is the loss denominator of the rows this step covers (skipped rows included),
    summed over processes and divided by their number. Gradients are all-reduced once, at the
    last micro-batch; a process with no rows joins with a zero loss.
    Returns the detached log-probs (n, T), the token advantages used (n, T) and metrics.
    """
    cfg, acc, mb, n = run.cfg, run.accelerator, run.cfg.train.micro_batch_size, data.adv.shape[0]
    all_logps, all_adv = [], []
    sums = {"loss/policy": 0.0, "policy/kl_ref": 0.0, "clipped": 0.0, "dual_clipped": 0.0}
    run.scorer.train()
    starts = list(range(0, n, mb)) or [None]
    for i, s in enumerate(starts):
        last = i == len(starts) - 1
        with contextlib.nullcontext() if last else acc.no_sync(run.scorer):
            if s is None:
                loss = idle_loss(run)
            else:
                part = data.select(torch.arange(s, min(s + mb, n)))
                loss, logps, token_adv = micro_batch_loss(run, step, part, normaliser, sums)
                all_logps.append(logps.detach().cpu())
                all_adv.append(token_adv.cpu())
            acc.backward(loss)
        sums["loss/policy"] += loss.item()
    params = [p for p in run.scorer.parameters() if p.requires_grad]
    grad_norm = float(
        acc.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"))
    )  # inf: measure, do not clip
    finite = math.isfinite(grad_norm) and not anywhere(acc, not math.isfinite(sums["loss/policy"]))
    if finite:  # a NaN or infinite gradient is never applied (the same decision everywhere)
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
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
    return (
        torch.cat(all_logps) if all_logps else empty,
        torch.cat(all_adv) if all_adv else empty,
        metrics,
    )


def optimise(
    run: Any, step: int, batch: Batch, rows: torch.Tensor, data: Rows
) -> tuple[torch.Tensor, dict[str, float]]:
    """All optimizer steps of one rollout batch: `ppo_epochs` passes over `mini_batches` parts.

    `batch` is the whole step's batch, `rows` (N,) marks the rows in `data`. Mini-batches split
    the whole batch in order; each one's loss denominator counts all its rows, trained or not.
    The token credit is computed once per rollout batch and kept in `data.token_adv`: from the
    single pass's own detached log-probs, or, with several passes, from the old log-probs before
    the first, so it stays fixed across them.
    Returns the log-probs (n, T) the credit was computed from, and metrics averaged over updates.
    """
    cfg = run.cfg
    mode, max_new = cfg.algorithm.loss_agg, cfg.rollout.max_new_tokens
    epochs, parts = cfg.train.ppo_epochs, cfg.train.mini_batches
    size = run.accelerator.num_processes

    def normaliser(mask: torch.Tensor) -> float:  # the global denominator's share per process
        return total(run.accelerator, loss_normaliser(mode, mask, max_new)) / size

    if epochs == 1 and parts == 1:
        logps, data.token_adv, metrics = policy_update(
            run, step, data, normaliser(batch.completion_mask)
        )
        return logps, metrics
    if data.adv.numel() > 0:
        data.old_logps = current_logps(run, data.batch)
        data.token_adv = credit(run, step, data, data.old_logps)
    else:  # no trained row here (no teacher scores either): it joins each step with a zero loss
        data.old_logps = data.token_adv = torch.zeros(0, data.batch.completion_ids.shape[1])
    position = rows.long().cumsum(0) - 1  # where each row of the batch sits in `data`
    history = []
    for _ in range(epochs):
        for chunk in torch.arange(rows.shape[0]).tensor_split(parts):
            chosen = chunk[rows[chunk]]
            if anywhere(run.accelerator, chosen.numel() > 0):  # every process, or none, steps
                norm = normaliser(batch.completion_mask[chunk])
                history.append(policy_update(run, step, data.select(position[chosen]), norm)[2])
    metrics = {k: sum(m[k] for m in history) / len(history) for k in history[0]}
    metrics["train/optimizer_steps"] = float(len(history))
    return data.old_logps, metrics
