"""The training loop, top to bottom: rollout -> reward -> advantages -> teacher -> loss -> step.

What the method is (its teacher, which rows it trains, its token credit) is asked of its object
(`run.method`, from `algorithms/method.py`); nothing here branches on a method's name. By default
one optimisation pass runs per rollout batch, so the "old" log-probs of the PPO ratio are the
detached current ones (no extra forward pass); `train.ppo_epochs` / `train.mini_batches` make
several (see `update.py`). Groups whose rewards are all equal have zero advantage and, with no
KL term, zero gradient: under the verifier-driven methods they are skipped before the teacher
and the policy forward, which is exact. The loss is normalised by the token count of the whole
step, so gradient accumulation over micro-batches gives the same update as one big batch.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from .algorithms import group_advantages, group_outcomes
from .checkpoint import latest_checkpoint
from .config import Config
from .data import Record
from .diagnostics import completion_spans, credit_diagnostics
from .distributed import anywhere, reduce_metrics, shard, world
from .progress import StepDisplay, Watch
from .rollout import Batch, sample_completions
from .run import Run, TrainingStopped, save, setup
from .scoring import remember_step, step_contexts, teacher_pass
from .sharding import gathered, take_gather_seconds
from .tracking import peak_memory_mb, tracker_values
from .update import Rows, optimise

log = logging.getLogger(__name__)


def rollout(run: Run, step: int, recs: list[Record]) -> Batch:
    rank, size = world(run.accelerator)  # resumable sampling stream, one per process
    torch.manual_seed((run.cfg.train.seed * 1_000_003 + step) * size + rank)
    prompts = [run.renderer.student_ids(r) for r in recs]
    with gathered(run):  # FSDP2: whole weights to decode with (train_step gathered them)
        return sample_completions(
            run.lm, prompts, run.cfg.rollout, run.tokenizer.pad_token_id, run.stop_ids, run.device
        )


def score(
    run: Run, recs: list[Record], batch: Batch
) -> tuple[list[str], torch.Tensor, list[bool], dict]:
    group = run.cfg.rollout.num_generations
    rows = [r for r in recs for _ in range(group)]
    texts = run.tokenizer.batch_decode(
        [ids[mask].tolist() for ids, mask in zip(batch.completion_ids, batch.completion_mask)],
        skip_special_tokens=True,
    )
    columns = {
        "answer": [r.answer for r in rows],
        "solution": [r.solution for r in rows],
        "metadata": [r.metadata for r in rows],
    }
    prompts = [run.renderer.student_text(r) for r in rows]
    rewards, correct, metrics = run.reward_fn(prompts, texts, columns)
    # 1.0 when verifiers failed as often as there are completions (one failing on every one)
    metrics["reward/error_frac"] = min(metrics.get("reward/errors", 0.0) / max(len(texts), 1), 1.0)
    return texts, torch.tensor(rewards, dtype=torch.float32), correct, metrics


def trained_rows(run: Run, adv: torch.Tensor) -> torch.Tensor:
    """(N,) rows that carry a gradient: every row for distillation or with a KL penalty, else
    the rows with non-zero advantage.

    Rows of all-equal groups have A = 0 and, with no KL term, exactly zero gradient under
    grpo / rlsd: skipping them before the teacher and the policy forward is exact.
    """
    if run.method.dense or run.cfg.algorithm.kl_coef > 0:
        return torch.ones_like(adv, dtype=torch.bool)
    return adv != 0


def train_step(run: Run, step: int) -> dict[str, Any]:
    cfg, times = run.cfg, {"start": time.perf_counter()}
    recs = shard(
        [run.records[i] for i in run.stream.next(cfg.train.prompts_per_step)],
        *world(run.accelerator),
    )  # this process's prompts (all of them with one)
    with gathered(run):  # FSDP2: whole weights once a step (rollout, teacher, update)
        run.phase = "generation"
        batch = rollout(run, step, recs)
        times["generate"] = time.perf_counter()
        texts, rewards, correct, metrics = score(run, recs, batch)
        run.reward_fn.warn_failures(f"step {step}: ", " this step")  # one line per verifier
        times["reward"] = time.perf_counter()
        return learn(run, step, recs, batch, texts, rewards, correct, metrics, times)


def learn(
    run: Run,
    step: int,
    recs: list[Record],
    batch: Batch,
    texts: list[str],
    rewards: torch.Tensor,
    correct: list[bool],
    metrics: dict[str, float],
    times: dict[str, float],
) -> dict[str, Any]:
    """Everything after the rewards: advantages, teacher, update, metrics, logged samples, the
    memory of successes. Returns the step's metrics, reduced over processes."""
    cfg = run.cfg
    adv, adv_metrics = group_advantages(
        rewards,
        cfg.rollout.num_generations,
        cfg.algorithm.scale_std,
        cfg.algorithm.adv_eps,
        cfg.algorithm.baseline,
        cfg.algorithm.std,
    )
    metrics.update(adv_metrics)
    rows = trained_rows(run, adv)
    data = Rows(batch.select(rows), adv[rows])
    span, answer, span_metrics = completion_spans(cfg, run.method, run.tokenizer, batch)
    metrics.update(span_metrics)
    data.span = None if span is None else span[rows]
    run.phase = "teacher"
    found = step_contexts(run, recs, texts, correct, batch)  # (contexts, keys) per completion
    with gathered(run):  # FSDP2: each process scores its own rows, however many
        metrics.update(teacher_pass(run, step, recs, rows, data, found))
    times["teacher"] = time.perf_counter()
    run.phase = "update"
    update = anywhere(run.accelerator, rows.any())  # some process has rows: all take part
    mask = data.batch.completion_mask
    if update:
        with gathered(run):  # FSDP2: each process trains its own micro-batches, however many
            logps, upd = optimise(run, step, batch, rows, data)
        metrics.update(upd)
    if update and rows.any():
        metrics["policy/entropy"] = -logps[mask].sum().item() / max(mask.sum().item(), 1)
        if data.teacher_logps is not None:
            answer_rows = None if answer is None else answer[rows]
            metrics.update(teacher_metrics(run, step, data, logps, correct, rows, answer_rows))
    metrics["train/skipped_update"] = float(not update)
    if found is not None:
        metrics.update(remember_step(run, step, found[1], texts, rewards, correct, batch))
    times["train"] = time.perf_counter()
    metrics.update(step_metrics(run, step, batch, rewards, correct, times))
    if run.accelerator.is_main_process:  # the main process's completions stand for the step
        credit = data.token_adv if data.teacher_logps is not None else None
        contexts = None if found is None else found[0]
        write_samples(run, step, recs, texts, rewards, correct, adv, batch, rows, credit, contexts)
    return reduce_metrics(run.accelerator, metrics, mask.sum().item())


def teacher_metrics(
    run: Run,
    step: int,
    data: Rows,
    logps: torch.Tensor,
    correct: list[bool],
    rows: torch.Tensor,
    answer: torch.Tensor | None,
) -> dict[str, float]:
    """The credit diagnostics over the trained rows whose teacher saw a context."""
    keep = data.context_rows
    if keep is None:
        keep = torch.ones(data.adv.shape[0], dtype=torch.bool)
    if not keep.any():
        return {}

    def pick(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[keep]

    return credit_diagnostics(
        run.method,
        step,
        data.adv[keep],
        logps[keep],
        data.teacher_logps[keep],
        data.token_adv[keep],
        data.batch.completion_mask[keep],
        torch.tensor(correct)[rows][keep],
        pick(data.span),
        pick(answer),
    )


def step_metrics(
    run: Run,
    step: int,
    batch: Batch,
    rewards: torch.Tensor,
    correct: list[bool],
    times: dict[str, float],
) -> dict[str, float]:
    lengths = batch.completion_mask.sum(1).float()
    gen_seconds = times["generate"] - times["start"]
    groups = group_outcomes(torch.tensor(correct), run.cfg.rollout.num_generations)
    return {
        "step": step,
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std(unbiased=False).item(),
        "reward/accuracy": sum(correct) / len(correct),
        "reward/all_correct_group_frac": groups["all_correct"],  # nothing left to learn
        "reward/all_wrong_group_frac": groups["all_wrong"],  # no advantage, no RLSD credit
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
        "perf/peak_mem_scope": run.mem_scope,  # "process": may include an earlier run's peak
        **take_gather_seconds(run),  # FSDP2: gathering whole weights since the last step
    }


def stopped(batch: Batch, stop_ids: list[int]) -> torch.Tensor:
    """(N,) True where the completion ended with a stop token (not cut at max_new_tokens)."""
    return (torch.isin(batch.completion_ids, torch.tensor(stop_ids)) & batch.completion_mask).any(1)


def write_samples(
    run: Run,
    step: int,
    recs: list[Record],
    texts: list[str],
    rewards: torch.Tensor,
    correct: list[bool],
    adv: torch.Tensor,
    batch: Batch,
    active: torch.Tensor,
    credit: torch.Tensor | None,
    contexts: list[Any] | None = None,
) -> None:
    """Log completions with their rewards; trained rows with a teacher also get per-token credit
    (the token advantages, and for RLSD the multipliers m_t) and, for a self-teacher, the
    prompt it saw with its context's kind (`none`: no context, uniform credit)."""
    group = run.cfg.rollout.num_generations
    limit = run.cfg.output.log_samples or len(texts)
    credit_row = {int(row): k for k, row in enumerate(active.nonzero().flatten())}
    for i in range(min(limit, len(texts))):
        record = recs[i // group]
        ids = batch.completion_ids[i][batch.completion_mask[i]].tolist()
        sample = {
            "step": step,
            "index": i,
            "prompt": record.prompt,
            "answer": record.answer,
            "completion": texts[i],
            "reward": rewards[i].item(),
            "correct": correct[i],
            "advantage": adv[i].item(),
            "token_ids": ids,
        }
        if credit is not None and i in credit_row:
            token_adv = credit[credit_row[i]][: len(ids)]
            sample["token_advantage"] = [round(v, 5) for v in token_adv.tolist()]
            if contexts is not None:
                context = contexts[i]
                sample["teacher_context_kind"] = context.kind if context else "none"
                if context is not None:
                    sample["teacher_prompt"] = run.renderer.teacher_text(record, context)
            if run.method.reweights and adv[i] != 0:
                sample["credit_multiplier"] = [round(v, 4) for v in (token_adv / adv[i]).tolist()]
        run.samples.write(sample)


def evaluate_now(run: Run, step: int) -> dict[str, float]:
    """Greedy accuracy on the held-out items (chosen once, as `rlsd eval` chooses them)."""
    from .evaluate import eval_items, evaluate

    if run.eval_records is None:
        run.eval_records = eval_items(run.cfg, run.cfg.train.eval_items)[0]
    start = time.perf_counter()
    result = evaluate(run.cfg, run.lm, run.tokenizer, run.eval_records, run.stop_ids, run.device)
    items = result["items"]
    run.evals.write(
        {
            "step": step,
            "correct": [bool(i["correct"][0]) for i in items],
            "lenient": [bool(i["lenient"][0]) for i in items],
            "answers": [i["answer"] for i in items],
            "completions": [i["completions"][0] for i in items],
        }
    )
    return {
        "eval/pass@1": result["pass@1"],
        "eval/lenient@1": result["lenient@1"],
        "eval/items": float(result["n_items"]),
        "eval/seconds": time.perf_counter() - start,
    }


def is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (
        isinstance(exc, torch.OutOfMemoryError)
        or "out of memory" in text
        or "can't allocate memory" in text
    )


def oom_message(run: Run, step: int) -> str:
    """Which phase ran out of memory, with which sizes, and what to lower."""
    cfg, phase = run.cfg, run.phase
    sizes = (
        f"{cfg.train.prompts_per_step} prompts x {cfg.rollout.num_generations} samples, "
        f"max_new_tokens {cfg.rollout.max_new_tokens}"
    )
    if phase == "generation":
        rows = cfg.rollout.batch_size or cfg.train.prompts_per_step * cfg.rollout.num_generations
        hint = f"--rollout.batch_size {max(rows // 2, 1)}"
    elif phase == "teacher":
        rows = cfg.teacher.batch_size or cfg.train.micro_batch_size
        hint = f"--teacher.batch_size {max(rows // 2, 1)}"
    else:
        hint = f"--train.micro_batch_size {max(cfg.train.micro_batch_size // 2, 1)}"
    last = latest_checkpoint(run.run_dir)
    kept = f"the last checkpoint ({last.name}) is kept" if last else "no checkpoint yet"
    return (
        f"out of memory during {phase} at step {step} ({sizes}); {kept}. Try {hint}, then "
        f"rlsd train --resume {run.run_dir}"
    )


def guarded_step(run: Run, step: int) -> dict[str, Any]:
    """One training step, plus the periodic evaluation; out of memory becomes a clear stop."""
    try:
        metrics = train_step(run, step)
        every = run.cfg.train.eval_every
        if every and step % every == 0:
            run.phase = "evaluation"
            with gathered(run):  # FSDP2: every process gathers, the main one evaluates
                if run.accelerator.is_main_process:
                    metrics.update(evaluate_now(run, step))
        return metrics
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
        raise TrainingStopped(oom_message(run, step), 1) from None


def train(cfg: Config, resume: bool = True) -> Path:
    """Run (or resume) the whole training job; returns the run directory.

    SIGINT / SIGTERM finish the current step, write a checkpoint and raise TrainingStopped; so
    do the conditions `progress.Watch` counts (NaN gradients, steps that cannot learn, a
    verifier that always fails, thought_only steps without a reasoning span).
    """
    if cfg.output.progress and int(os.environ.get("RANK", "0")) == 0:
        print(f"rlsd: loading {cfg.model.name} and the data ...", flush=True)
    run = setup(cfg, resume)
    steps, every = cfg.train.steps, cfg.output.save_every
    caught: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    watch = Watch(cfg, run.method, run.reward_fn)
    try:
        shown = cfg.output.progress and run.accelerator.is_main_process
        with StepDisplay(shown, steps, run.start_step - 1) as display:
            for step in range(run.start_step, steps + 1):
                metrics = guarded_step(run, step)
                run.metrics.write(metrics)
                run.accelerator.log(tracker_values(metrics), step=step)
                run.history.append(metrics)
                display.update(step, run.history)
                signalled = anywhere(run.accelerator, bool(caught))  # on any process
                reason = watch.stop_reason(step, metrics)
                if step == steps or (every and step % every == 0) or signalled or reason:
                    save(run, step)
                if signalled:
                    signum = caught[0] if caught else signal.SIGTERM
                    raise TrainingStopped(
                        f"stopped by signal {signal.Signals(signum).name} after step {step}; "
                        f"checkpoint written, resume with: rlsd train --resume {run.run_dir}",
                        128 + signum,
                    )
                if reason:
                    what, hint = reason
                    raise TrainingStopped(f"{what}; checkpoint written in {run.run_dir}. {hint}", 1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        run.metrics.close()
        run.samples.close()
        run.evals.close()
        run.reward_fn.close()  # the verifier pool's worker processes
        for tracker in run.accelerator.trackers:  # not end_training: it ends the process group
            tracker.finish()
    return run.run_dir
