"""The training loop, top to bottom: rollout -> reward -> advantages -> teacher -> loss -> step.

One optimisation pass per rollout batch, so the "old" log-probs of the PPO ratio are the detached
current ones (no extra forward pass). Groups whose rewards are all equal have zero advantage and,
with no KL term, zero gradient: they are skipped before the teacher and the policy forward, which
is exact. The loss is normalised by the token count of the whole step, so gradient accumulation
over micro-batches gives the same update as one big batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .algorithms import (clipped_policy_loss, group_advantages, lambda_at, loss_normaliser,
                         opsd_token_advantages, reasoning_span_mask, rlsd_token_advantages)
from .checkpoint import save_checkpoint
from .config import Config, to_yaml
from .data import PromptRenderer, PromptStream, Record, load_records
from .logprobs import TokenScorer
from .models import load_model, pick_device, pick_dtype, stop_token_ids
from .preflight import check_teacher_prompts
from .rewards import build_reward
from .rollout import Batch, join, left_pad, sample_completions
from .teacher import Teacher, trim_left
from .tracking import JsonlWriter, peak_memory_mb

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a training step needs, built once by `setup`."""

    cfg: Config
    accelerator: Accelerator
    scorer: TokenScorer  # the policy, wrapped to return completion log-probs
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    teacher: Teacher | None
    records: list[Record]
    renderer: PromptRenderer
    reward_fn: Any
    stream: PromptStream
    stop_ids: list[int]
    run_dir: Path
    metrics: JsonlWriter
    samples: JsonlWriter
    history: list[dict] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def lm(self) -> Any:
        return self.accelerator.unwrap_model(self.scorer).lm


def make_run_dir(cfg: Config) -> Path:
    name = cfg.output.run_name or "{}-{}-{}".format(
        cfg.algorithm.name, cfg.data.task if cfg.data.source == "reasoning_gym" else "file",
        datetime.now().strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(cfg.output.dir) / name
    if (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"{run_dir}: already holds a run; choose another output.run_name")
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return run_dir


def setup(cfg: Config) -> Run:
    """Load data and model, build optimizer and teacher, run the preflight, open the run dir."""
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    torch.manual_seed(cfg.train.seed)
    device = pick_device(cfg.model)
    accelerator = Accelerator(cpu=device.type == "cpu")
    records = load_records(cfg.data)
    model, tokenizer = load_model(cfg.model, pick_dtype(cfg.model, accelerator.device))
    renderer = PromptRenderer(cfg.data, tokenizer)
    reward_fn = build_reward(cfg.reward)
    scorer = TokenScorer(model, temperature=cfg.rollout.temperature)
    params = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scorer, optimizer = accelerator.prepare(scorer, optimizer)
    teacher = None
    if cfg.algorithm.name != "grpo":
        check_teacher_prompts(renderer, tokenizer, records[:8])
        teacher = Teacher(cfg.teacher.mode, accelerator.unwrap_model(scorer), cfg.model.lora,
                          cfg.teacher.batch_size or cfg.train.micro_batch_size)
    run_dir = make_run_dir(cfg)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return Run(cfg, accelerator, scorer, tokenizer, optimizer, teacher, records, renderer,
               reward_fn, PromptStream(len(records), cfg.train.seed),
               stop_token_ids(model, tokenizer), run_dir,
               JsonlWriter(run_dir / "metrics.jsonl"), JsonlWriter(run_dir / "samples.jsonl"))


def rollout(run: Run, step: int, recs: list[Record]) -> Batch:
    torch.manual_seed(run.cfg.train.seed * 1_000_003 + step)  # resumable sampling stream
    prompts = [run.renderer.student_ids(r) for r in recs]
    return sample_completions(run.lm, prompts, run.cfg.rollout, run.tokenizer.pad_token_id,
                              run.stop_ids, run.device)


def score(run: Run, recs: list[Record], batch: Batch) -> tuple[list[str], torch.Tensor,
                                                               list[bool], dict]:
    group = run.cfg.rollout.num_generations
    rows = [r for r in recs for _ in range(group)]
    texts = run.tokenizer.batch_decode(
        [ids[mask].tolist() for ids, mask in zip(batch.completion_ids, batch.completion_mask)],
        skip_special_tokens=True)
    columns = {"answer": [r.answer for r in rows], "solution": [r.solution for r in rows],
               "metadata": [r.metadata for r in rows]}
    prompts = [run.renderer.student_text(r) for r in rows]
    rewards, correct, metrics = run.reward_fn(prompts, texts, columns)
    return texts, torch.tensor(rewards, dtype=torch.float32), correct, metrics


def token_credit(run: Run, step: int, adv: torch.Tensor, logps: torch.Tensor,
                 teacher_logps: torch.Tensor | None, mask: torch.Tensor,
                 span: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token advantages (N, T) of the configured method, and its credit metrics."""
    method = run.cfg.algorithm.name
    if method == "grpo":
        return adv.unsqueeze(1) * mask, {}
    if method == "rlsd":
        r = run.cfg.rlsd
        lam = lambda_at(step, r.lambda_, r.lambda_warmup_steps, r.lambda_decay_steps)
        return rlsd_token_advantages(adv, logps, teacher_logps, mask, lam, r.eps_w,
                                     r.negative_only, span)
    distill, metrics = opsd_token_advantages(logps, teacher_logps, mask)
    if method == "opsd":
        return distill, metrics
    return adv.unsqueeze(1) * mask + run.cfg.opsd.beta * distill, metrics  # grpo_opsd


def policy_update(run: Run, step: int, batch: Batch, adv: torch.Tensor,
                  teacher_logps: torch.Tensor | None, normaliser: float,
                  span: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Accumulate gradients over micro-batches of `batch`, step the optimizer.

    `normaliser` is the loss denominator of the whole step (skipped rows included).
    Returns the detached log-probs (N, T) and metrics.
    """
    cfg, device = run.cfg, run.device
    n, mb = adv.shape[0], cfg.train.micro_batch_size
    all_logps, loss_sum, clipped = [], 0.0, 0.0
    run.scorer.train()
    for s in range(0, n, mb):
        rows = slice(s, s + mb)
        p_ids, p_mask = trim_left(batch.prompt_ids[rows], batch.prompt_mask[rows])
        c_mask = batch.completion_mask[rows].to(device)
        ids, attn = join(p_ids, p_mask, batch.completion_ids[rows], batch.completion_mask[rows])
        logps = run.scorer(ids.to(device), attn.to(device), c_mask)  # (mb, T)
        t_logps = None if teacher_logps is None else teacher_logps[rows].to(device)
        token_adv, _ = token_credit(run, step, adv[rows].to(device), logps, t_logps, c_mask,
                                    None if span is None else span[rows].to(device))
        loss, m = clipped_policy_loss(logps, logps.detach(), token_adv, c_mask,
                                      cfg.algorithm.eps_low, cfg.algorithm.eps_high,
                                      cfg.algorithm.loss_agg, normaliser)
        run.accelerator.backward(loss)
        loss_sum += loss.item()
        clipped += m["policy/clip_frac"] * c_mask.sum().item()
        all_logps.append(logps.detach().cpu())
    grad_norm = 0.0
    if cfg.train.max_grad_norm > 0:
        params = [p for p in run.scorer.parameters() if p.requires_grad]
        grad_norm = float(run.accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    tokens = max(batch.completion_mask.sum().item(), 1)  # clip fraction over trained tokens
    return torch.cat(all_logps), {"loss/policy": loss_sum, "policy/grad_norm": grad_norm,
                                  "policy/clip_frac": clipped / tokens}


def credit_diagnostics(run: Run, step: int, adv: torch.Tensor, logps: torch.Tensor,
                       teacher_logps: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor,
                       span: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Teacher statistics over every trained token of the step (not means of micro-batch means)."""
    token_adv, metrics = token_credit(run, step, adv, logps, teacher_logps, mask, span)
    delta = (teacher_logps - logps) * mask
    metrics["teacher/kl"] = -(delta.sum() / mask.sum().clamp(min=1)).item()
    for name, rows in (("correct", correct), ("incorrect", ~correct)):
        count = mask[rows].sum()
        metrics[f"rlsd/delta_mean_{name}"] = (delta[rows].sum() / count).item() if count else 0.0
    return token_adv, metrics


def span_mask_for(run: Run, batch: Batch) -> torch.Tensor | None:
    """The reasoning-span mask when rlsd.thought_only is set (tags matched as token ids)."""
    r = run.cfg.rlsd
    if run.cfg.algorithm.name != "rlsd" or not r.thought_only:
        return None
    tags = [run.tokenizer(t, add_special_tokens=False)["input_ids"]
            for t in (r.thought_open, r.thought_close)]
    return reasoning_span_mask(batch.completion_ids, batch.completion_mask, *tags)


def trained_rows(run: Run, adv: torch.Tensor) -> torch.Tensor:
    """(N,) rows that carry a gradient: every row for distillation, else non-zero advantages.

    Rows of all-equal groups have A = 0 and, with no KL term, exactly zero gradient under
    grpo / rlsd: skipping them before the teacher and the policy forward is exact.
    """
    if run.cfg.algorithm.name in ("opsd", "grpo_opsd"):
        return torch.ones_like(adv, dtype=torch.bool)
    return adv != 0


def teacher_pass(run: Run, recs: list[Record], rows: torch.Tensor, trained: Batch,
                 ) -> torch.Tensor | None:
    """Teacher log-probs (n, T) of the trained rows' completions after the teacher prompts."""
    if run.teacher is None or not rows.any():
        return None
    group = run.cfg.rollout.num_generations
    prompts = [run.renderer.teacher_ids(recs[i // group]) for i in rows.nonzero().flatten()]
    t_ids, t_mask = left_pad(prompts, run.tokenizer.pad_token_id)
    return run.teacher.logprobs(t_ids, t_mask, trained.completion_ids, trained.completion_mask,
                                run.device)


def train_step(run: Run, step: int) -> dict[str, Any]:
    cfg, times = run.cfg, {"start": time.perf_counter()}
    recs = [run.records[i] for i in run.stream.next(cfg.train.prompts_per_step)]
    batch = rollout(run, step, recs)
    times["generate"] = time.perf_counter()
    texts, rewards, correct, metrics = score(run, recs, batch)
    adv, adv_metrics = group_advantages(rewards, cfg.rollout.num_generations,
                                        cfg.algorithm.scale_std, cfg.algorithm.adv_eps,
                                        cfg.algorithm.baseline)
    metrics.update(adv_metrics)
    times["reward"] = time.perf_counter()
    rows = trained_rows(run, adv)
    trained = batch.select(rows)
    teacher_logps = teacher_pass(run, recs, rows, trained)
    times["teacher"] = time.perf_counter()
    credit = None
    if rows.any():
        span = span_mask_for(run, trained)
        normaliser = loss_normaliser(cfg.algorithm.loss_agg, batch.completion_mask,
                                     cfg.rollout.max_new_tokens)
        logps, upd = policy_update(run, step, trained, adv[rows], teacher_logps, normaliser, span)
        metrics.update(upd)
        mask = trained.completion_mask.float()
        metrics["policy/entropy"] = -(logps * mask).sum().item() / max(mask.sum().item(), 1)
        if teacher_logps is not None:
            credit, teacher_metrics = credit_diagnostics(
                run, step, adv[rows], logps, teacher_logps, mask, torch.tensor(correct)[rows],
                span)
            metrics.update(teacher_metrics)
    metrics["train/skipped_update"] = float(not rows.any())
    times["train"] = time.perf_counter()
    metrics.update(step_metrics(run, step, batch, rewards, correct, times))
    write_samples(run, step, recs, texts, rewards, correct, adv, batch, rows, credit)
    return metrics


def step_metrics(run: Run, step: int, batch: Batch, rewards: torch.Tensor, correct: list[bool],
                 times: dict[str, float]) -> dict[str, float]:
    lengths = batch.completion_mask.sum(1).float()
    gen_seconds = times["generate"] - times["start"]
    return {
        "step": step,
        "reward/mean": rewards.mean().item(), "reward/std": rewards.std(unbiased=False).item(),
        "reward/accuracy": sum(correct) / len(correct),
        "completion/length_mean": lengths.mean().item(),
        "completion/length_max": lengths.max().item(),
        "completion/truncated_frac": 1.0 - stopped(batch, run.stop_ids).float().mean().item(),
        "perf/generate_seconds": gen_seconds,
        "perf/reward_seconds": times["reward"] - times["generate"],
        "perf/teacher_seconds": times["teacher"] - times["reward"],
        "perf/train_seconds": times["train"] - times["teacher"],
        "perf/step_seconds": times["train"] - times["start"],
        "perf/completion_tokens_per_second": lengths.sum().item() / max(gen_seconds, 1e-9),
        "perf/peak_mem_mb": peak_memory_mb(run.device),
    }


def stopped(batch: Batch, stop_ids: list[int]) -> torch.Tensor:
    """(N,) True where the completion ended with a stop token (not cut at max_new_tokens)."""
    return (torch.isin(batch.completion_ids, torch.tensor(stop_ids))
            & batch.completion_mask).any(1)


def write_samples(run: Run, step: int, recs: list[Record], texts: list[str],
                  rewards: torch.Tensor, correct: list[bool], adv: torch.Tensor, batch: Batch,
                  active: torch.Tensor, credit: torch.Tensor | None) -> None:
    """Log completions with their rewards; trained rows with a teacher also get per-token credit
    (the token advantages, and for RLSD the multipliers m_t)."""
    group = run.cfg.rollout.num_generations
    limit = run.cfg.output.log_samples or len(texts)
    credit_row = {int(row): k for k, row in enumerate(active.nonzero().flatten())}
    for i in range(min(limit, len(texts))):
        record = recs[i // group]
        ids = batch.completion_ids[i][batch.completion_mask[i]].tolist()
        sample = {"step": step, "index": i, "prompt": record.prompt, "answer": record.answer,
                  "completion": texts[i], "reward": rewards[i].item(), "correct": correct[i],
                  "advantage": adv[i].item(), "token_ids": ids}
        if credit is not None and i in credit_row:
            token_adv = credit[credit_row[i]][: len(ids)]
            sample["token_advantage"] = [round(v, 5) for v in token_adv.tolist()]
            if run.cfg.algorithm.name == "rlsd" and adv[i] != 0:
                sample["credit_multiplier"] = [round(v, 4) for v in (token_adv / adv[i]).tolist()]
        run.samples.write(sample)


def progress_bar(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                    TextColumn("reward {task.fields[reward]:.3f}  accuracy {task.fields[acc]:.3f} "
                               "(last 5 steps)  {task.fields[sps]:.1f} s/step"),
                    TimeRemainingColumn(),
                    disable=not enabled)


def train(cfg: Config) -> Path:
    """Run the whole training job; returns the run directory."""
    run = setup(cfg)
    steps = cfg.train.steps
    try:
        with progress_bar(cfg.output.progress) as bar:
            task = bar.add_task("train", total=steps, reward=0.0, acc=0.0, sps=0.0)
            for step in range(1, steps + 1):
                metrics = train_step(run, step)
                run.metrics.write(metrics)
                run.history.append(metrics)
                recent = run.history[-5:]  # single steps are noisy: show a moving average
                bar.update(task, advance=1,
                           reward=sum(m["reward/mean"] for m in recent) / len(recent),
                           acc=sum(m["reward/accuracy"] for m in recent) / len(recent),
                           sps=metrics["perf/step_seconds"])
                every = cfg.output.save_every
                if step == steps or (every and step % every == 0):
                    save_checkpoint(run.run_dir, step, run.lm, run.optimizer,
                                    {"data": run.stream.state_dict()})
    finally:
        run.metrics.close()
        run.samples.close()
    return run.run_dir
