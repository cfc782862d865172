"""The training loop, top to bottom: rollout -> reward -> advantages -> teacher -> loss -> step.

Each stage returns a typed record that the next one takes (`records.py`): `draw` (`sampling.py`:
one round of prompts, or dynamic sampling's rounds) gives the step's `Rollout`, `assign_credit`
its `Credit` (group advantages and the rows that carry a gradient), `find_contexts` the self-
teacher's `Contexts`, `teach` the teacher's `Teaching`, `optimise` the `Update`. What the method
is (its teacher, which rows it trains, its token credit) is asked of its object (`run.method`,
from `algorithms/method.py`); nothing here branches on a method's name. By default one
optimisation pass runs per rollout batch, so the "old" log-probs of the PPO ratio are the
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

from ..algorithms import group_advantages
from ..algorithms.method import Method
from ..engine.checkpoint import latest_checkpoint
from ..engine.compute import Shape, scoring_flops, training_flops
from ..engine.distributed import anywhere, reduce_metrics
from ..engine.rollout import Batch
from ..engine.sharding import gathered, take_gather_seconds
from ..schema.config import Config
from .diagnostics import completion_spans, sample_lines, trained_diagnostics
from .progress import StepDisplay, Watch
from .records import Credit, Rollout, Rows, Teaching, Update
from .run import Run, TrainingStopped, save, setup
from .sampling import draw
from .scoring import contexts_metrics, find_contexts, remember_step, teach
from .tracking import peak_memory_mb, tracker_values
from .update import optimise

log = logging.getLogger(__name__)


def train_step(run: Run, step: int) -> dict[str, Any]:
    """One step: this process's prompts, sampled and graded (`draw`), then `learn`. Returns
    its metrics."""
    times = {"start": time.perf_counter()}
    with gathered(*run.models):  # FSDP2: whole weights once a step (rollout, teacher, update)
        run.phase = "generation"
        rollout = draw(run, step, times)
        return learn(run, step, rollout, times)


def learn(run: Run, step: int, rollout: Rollout, times: dict[str, float]) -> dict[str, Any]:
    """Everything after the rewards: advantages, teacher, update, metrics, logged samples, the
    memory of successes. Returns the step's metrics, reduced over processes."""
    cfg, method = run.cfg, run.method
    credit = assign_credit(cfg, method, run.tokenizer, rollout)
    run.phase = "teacher"
    contexts = None
    if method.teacher == "privileged":
        contexts = find_contexts(cfg.teacher.context, run.renderer, run.memory, rollout)
    with gathered(*run.models):  # FSDP2: each process scores its own rows, however many
        teaching = teach(run.scorers, method, step, rollout, credit, contexts)
    times["teacher"] = time.perf_counter()
    run.phase = "update"
    rows = Rows.of(rollout.batch, credit, teaching)
    update = None
    if anywhere(run.accelerator, credit.rows.any()):  # some process has rows: all take part
        with gathered(*run.models):  # FSDP2: each process trains its own micro-batches
            update = optimise(run.policy, method, cfg, step, rollout.batch, credit.rows, rows)
    remembered = {}
    if contexts is not None and run.memory is not None:
        remembered = remember_step(run.memory, run.accelerator, step, contexts, rollout)
    times["train"] = time.perf_counter()
    metrics = {**rollout.metrics, **credit.metrics, **teaching.metrics}
    if contexts is not None and credit.rows.any():
        metrics.update(contexts_metrics(contexts, cfg.teacher.context, run.memory, credit.index))
    if update is not None:
        metrics.update(update.metrics)
        if credit.rows.any():
            metrics.update(trained_diagnostics(method, step, rollout, credit, rows, update))
    metrics["train/skipped_update"] = float(update is None)
    metrics.update(training_cost(cfg, run.shape, rows, teaching, update))
    metrics["compute/flops"] = sum(  # a rollout not made by `grade` brings no generation cost
        metrics.get(f"compute/{part}_flops", 0.0) for part in ("generation", "teacher", "policy")
    )
    metrics.update({**remembered, **step_metrics(run, step, rollout, times)})
    if run.accelerator.is_main_process:  # the main process's completions stand for the step
        token_adv = None if update is None or teaching.teacher_logps is None else update.token_adv
        for line in sample_lines(
            step,
            rollout,
            credit,
            token_adv,
            contexts,
            run.renderer,
            method.reweights,
            cfg.output.log_samples,
        ):
            run.samples.write(line)
    return reduce_metrics(run.accelerator, metrics, rows.batch.completion_mask.sum().item())


def training_cost(
    cfg: Config, shape: Shape, rows: Rows, teaching: Teaching, update: Update | None
) -> dict[str, float]:
    """Tokens forwarded by the teacher (and the KL reference) and forwarded and backpropagated
    by the policy, and their FLOPs; the step's total FLOPs add the generation's."""
    batch = rows.batch
    lengths = (batch.prompt_mask.sum(1) + batch.attention.sum(1)).tolist()
    passes = cfg.train.ppo_epochs if update is not None else 0
    old = update is not None and (cfg.train.ppo_epochs > 1 or cfg.train.mini_batches > 1)
    policy = training_flops(shape, lengths, passes) + (scoring_flops(shape, lengths) if old else 0)
    return {
        "compute/teacher_tokens": float(sum(teaching.scored)),
        "compute/teacher_flops": scoring_flops(shape, list(teaching.scored)),
        "compute/policy_tokens": float(sum(lengths) * passes),
        "compute/policy_flops": policy,
    }


def trained_rows(method: Method, kl_coef: float, adv: torch.Tensor) -> torch.Tensor:
    """(N,) rows that carry a gradient: every row for distillation or with a KL penalty, else
    the rows with non-zero advantage.

    Rows of all-equal groups have A = 0 and, with no KL term, exactly zero gradient under
    grpo / rlsd: skipping them before the teacher and the policy forward is exact.
    """
    if method.dense or kl_coef > 0:
        return torch.ones_like(adv, dtype=torch.bool)
    return adv != 0


def assign_credit(cfg: Config, method: Method, tokenizer: Any, rollout: Rollout) -> Credit:
    """The verifier's credit: group advantages, the trained rows, the completions' spans."""
    alg = cfg.algorithm
    adv, metrics = group_advantages(
        rollout.rewards, rollout.group, alg.scale_std, alg.adv_eps, alg.baseline, alg.std
    )
    span, answer, span_metrics = completion_spans(cfg, method, tokenizer, rollout.batch)
    rows = trained_rows(method, alg.kl_coef, adv)
    return Credit(adv, rows, span, answer, {**metrics, **span_metrics})


def step_metrics(
    run: Run, step: int, rollout: Rollout, times: dict[str, float]
) -> dict[str, float]:
    batch = rollout.batch
    lengths = batch.completion_mask.sum(1).float()
    gen_seconds = times["generate"] - times["start"]
    return {
        "step": step,
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
        **take_gather_seconds(run.scorer),  # FSDP2: gathering whole weights since the last step
    }


TOTALS = ("compute/flops", "compute/generated_tokens")  # logged per step and as running totals


def running_totals(history: list[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, float]:
    """`<name>_total`: the run's compute so far, this step included (from the last logged
    step's total, so a resumed run continues it; a run from before these metrics starts at 0)."""
    last = history[-1] if history else {}
    return {f"{k}_total": last.get(f"{k}_total", 0.0) + metrics.get(k, 0.0) for k in TOTALS}


def stopped(batch: Batch, stop_ids: list[int]) -> torch.Tensor:
    """(N,) True where the completion ended with a stop token (not cut at max_new_tokens)."""
    return (torch.isin(batch.completion_ids, torch.tensor(stop_ids)) & batch.completion_mask).any(1)


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
            with gathered(*run.models):  # FSDP2: every process gathers, the main one evaluates
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
                metrics.update(running_totals(run.history, metrics))
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
        if run.env is not None:
            run.env.close()  # the tools' worker processes
        for tracker in run.accelerator.trackers:  # not end_training: it ends the process group
            tracker.finish()
    return run.run_dir
