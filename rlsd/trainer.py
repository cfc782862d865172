"""The training loop, top to bottom: rollout -> reward -> advantages -> teacher -> loss -> step.

One optimisation pass per rollout batch, so the "old" log-probs of the PPO ratio are the detached
current ones (no extra forward pass). Groups whose rewards are all equal have zero advantage and,
with no KL term, zero gradient: they are skipped before the teacher and the policy forward, which
is exact. The loss is normalised by the token count of the whole step, so gradient accumulation
over micro-batches gives the same update as one big batch.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .algorithms import group_advantages, span_split
from .checkpoint import (check_resumable, latest_checkpoint, load_state, load_trainable,
                         save_checkpoint, set_rng_state)
from .config import (DISTILLATION, Config, ConfigError, ModelConfig, load_config, to_dict,
                     to_yaml)
from .data import (PromptRenderer, PromptStream, Record, check_lengths, load_records,
                   split_heldout)
from .logprobs import TokenScorer
from .models import load_model, pick_device, pick_dtype, stop_token_ids
from .preflight import check_teacher_prompts
from .rewards import build_reward
from .rollout import Batch, left_pad, sample_completions
from .teacher import Teacher
from .update import Rows, optimise, reasoning_span, token_credit
from .tracking import (JsonlWriter, build_trackers, flat_config, peak_memory_mb, read_jsonl,
                       tracker_values)

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
    reference: Teacher | None  # frozen initial policy for the KL penalty (algorithm.kl_coef)
    records: list[Record]
    renderer: PromptRenderer
    reward_fn: Any
    stream: PromptStream
    stop_ids: list[int]
    run_dir: Path
    metrics: JsonlWriter
    samples: JsonlWriter
    history: list[dict] = field(default_factory=list)
    start_step: int = 1
    phase: str = "setup"  # what the current step is doing (named in out-of-memory reports)
    eval_records: list[Record] | None = None  # train.eval_every items, chosen at first use

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def lm(self) -> Any:
        return self.accelerator.unwrap_model(self.scorer).lm


class TrainingStopped(RuntimeError):
    """Training stopped early on purpose (a signal, repeated non-finite gradients); a checkpoint
    of the last completed step was written first."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_dir_for(cfg: Config, resume: bool) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (None for a new run).

    A directory that already holds a run is resumed from its latest checkpoint when `resume` is
    set and the config changes nothing that matters; otherwise it is refused, never overwritten.
    """
    name = cfg.output.run_name or "{}-{}-{}".format(
        cfg.algorithm.name, cfg.data.task if cfg.data.source == "reasoning_gym" else "file",
        datetime.now().strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(cfg.output.dir) / name
    if not (run_dir / "config.yaml").is_file():
        return run_dir, None
    if not resume:
        raise FileExistsError(f"{run_dir}: already holds a run; resume it (drop --no-resume) "
                              "or choose another output.run_name")
    check_resumable(load_config(run_dir / "config.yaml"), cfg, str(run_dir))
    return run_dir, latest_checkpoint(run_dir)  # None: died before its first checkpoint


def load_external_teacher(cfg: Config, tokenizer: Any, device: torch.device) -> TokenScorer:
    """The OPD teacher: another model, frozen, whose tokenizer must equal the student's."""
    lm, teacher_tokenizer = load_model(
        ModelConfig(name=cfg.teacher.model, dtype=cfg.model.dtype, device=cfg.model.device,
                    lora=False), pick_dtype(cfg.model, device))
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"teacher.model: its tokenizer differs from the student's (vocabulary "
                          f"of {len(teacher_tokenizer)} vs {len(tokenizer)} tokens); the teacher "
                          "must score exactly the student's token ids")
    lm = lm.to(device).eval().requires_grad_(False)
    return TokenScorer(lm, temperature=cfg.rollout.temperature)


def setup(cfg: Config, resume: bool = True) -> Run:
    """Load data and model, build optimizer and teacher, run the preflight, open the run dir;
    restore the latest checkpoint when resuming."""
    run_dir, ckpt = run_dir_for(cfg, resume)  # checked before the slow work
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    torch.manual_seed(cfg.train.seed)
    device = pick_device(cfg.model)
    accelerator = Accelerator(cpu=device.type == "cpu", log_with=build_trackers(
        cfg.output.trackers, cfg.output.project, run_dir) or None)
    records, _ = split_heldout(load_records(cfg.data), cfg.data.heldout_size,
                                     cfg.data.seed)  # held-out records are never trained on
    model, tokenizer = load_model(cfg.model, pick_dtype(cfg.model, accelerator.device))
    renderer = PromptRenderer(cfg.data, tokenizer)
    self_teacher = cfg.algorithm.name != "grpo" and cfg.teacher.mode != "external"
    records, skipped = check_lengths(renderer, records, self_teacher)
    if skipped:
        log.warning("skipped %d of %d records: prompt longer than data.max_prompt_tokens=%d",
                    skipped, skipped + len(records), cfg.data.max_prompt_tokens)
    reward_fn = build_reward(cfg.reward)
    scorer = TokenScorer(model, temperature=cfg.rollout.temperature)
    params = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scorer, optimizer = accelerator.prepare(scorer, optimizer)
    teacher = None
    if cfg.algorithm.name != "grpo":
        external = None
        if cfg.teacher.mode == "external":
            external = load_external_teacher(cfg, tokenizer, accelerator.device)
        else:
            check_teacher_prompts(renderer, tokenizer, records[:8])
        teacher = Teacher(cfg.teacher.mode, accelerator.unwrap_model(scorer), cfg.model.lora,
                          cfg.teacher.batch_size or cfg.train.micro_batch_size,
                          cfg.teacher.sync_every, external)
    reference = None
    if cfg.algorithm.kl_coef > 0:  # the frozen initial policy; shares a frozen teacher's copy
        reference = teacher if teacher is not None and teacher.mode == "frozen" else Teacher(
            "frozen", accelerator.unwrap_model(scorer), cfg.model.lora,
            cfg.teacher.batch_size or cfg.train.micro_batch_size)
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    stream = PromptStream(len(records), cfg.train.seed)
    start = 1
    if ckpt is not None:
        start = restore(ckpt, accelerator.unwrap_model(scorer).lm, optimizer, stream, teacher,
                        cfg.model.lora)
    for name in ("metrics.jsonl", "samples.jsonl"):  # drop lines written after the checkpoint
        truncate_log(run_dir / name, start - 1)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    if cfg.output.trackers:
        accelerator.init_trackers(cfg.output.project, config=flat_config(to_dict(cfg)))
    run = Run(cfg, accelerator, scorer, tokenizer, optimizer, teacher, reference, records,
              renderer, reward_fn, stream, stop_token_ids(model, tokenizer), run_dir,
              JsonlWriter(run_dir / "metrics.jsonl"), JsonlWriter(run_dir / "samples.jsonl"))
    run.start_step = start
    run.history = read_jsonl(run_dir / "metrics.jsonl")
    return run


def restore(ckpt: Path, lm: Any, optimizer: Any, stream: PromptStream, teacher: Teacher | None,
            lora: bool) -> int:
    """Load a checkpoint into the freshly built run; returns the first step still to run.
    The frozen teacher was copied from the initial weights before this, so it stays the
    initial policy."""
    state, optimizer_state, rng, teacher_tensors = load_state(ckpt)
    load_trainable(lm, ckpt, lora)
    optimizer.load_state_dict(optimizer_state)
    stream.load_state_dict(state["data"])
    if teacher is not None:
        teacher.load_state(state.get("teacher_synced_at", 0), teacher_tensors)
    set_rng_state(rng)
    return state["step"] + 1


def truncate_log(path: Path, step: int) -> None:
    """Keep only the lines of steps <= step (atomically): a resumed run rewrites the rest."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def save(run: Run, step: int) -> Path:
    synced_at, tensors = run.teacher.state() if run.teacher is not None else (0, None)
    return save_checkpoint(run.run_dir, step, run.lm, run.optimizer,
                           {"data": run.stream.state_dict(), "teacher_synced_at": synced_at},
                           tensors, run.cfg.output.keep_last)


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


def credit_diagnostics(run: Run, step: int, adv: torch.Tensor, logps: torch.Tensor,
                       teacher_logps: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor,
                       span: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Teacher statistics over every trained token of the step (not means of micro-batch means)."""
    token_adv, metrics = token_credit(run.cfg, step, adv, logps, teacher_logps, mask, span)
    if span is not None and not run.cfg.rlsd.thought_only:  # where did the teacher's credit go?
        signed = adv != 0
        multiplier = token_adv[signed] / adv[signed].unsqueeze(1)
        metrics.update(span_split(multiplier, span[signed], mask[signed]))
    delta = (teacher_logps - logps) * mask
    metrics["teacher/kl"] = -(delta.sum() / mask.sum().clamp(min=1)).item()
    for name, rows in (("correct", correct), ("incorrect", ~correct)):
        count = mask[rows].sum()
        metrics[f"rlsd/delta_mean_{name}"] = (delta[rows].sum() / count).item() if count else 0.0
    return token_adv, metrics


def trained_rows(run: Run, adv: torch.Tensor) -> torch.Tensor:
    """(N,) rows that carry a gradient: every row for distillation or with a KL penalty, else
    the rows with non-zero advantage.

    Rows of all-equal groups have A = 0 and, with no KL term, exactly zero gradient under
    grpo / rlsd: skipping them before the teacher and the policy forward is exact.
    """
    if run.cfg.algorithm.name in DISTILLATION or run.cfg.algorithm.kl_coef > 0:
        return torch.ones_like(adv, dtype=torch.bool)
    return adv != 0


def support_size(cfg: Config) -> int | None:
    """The teacher distribution the exact divergences need: None (sampled tokens only),
    0 (the whole vocabulary) or k (the top k)."""
    if cfg.algorithm.name not in DISTILLATION or cfg.opsd.divergence == "sampled":
        return None
    return cfg.opsd.topk if cfg.opsd.divergence == "topk" else 0


def scored_by(run: Run, scorer: Teacher | None, plain_prompt: bool, recs: list[Record],
              rows: torch.Tensor, trained: Batch, topk: int | None = None):
    """Log-probs (n, T) of the trained rows' completions under a teacher or the reference, after
    the teacher prompt (privileged context) or the student's plain prompt; with `topk`, also
    the teacher's distribution (see Teacher.logprobs)."""
    if scorer is None or not rows.any():
        return None
    group = run.cfg.rollout.num_generations
    render = run.renderer.student_ids if plain_prompt else run.renderer.teacher_ids
    prompts = [render(recs[i // group]) for i in rows.nonzero().flatten()]
    t_ids, t_mask = left_pad(prompts, run.tokenizer.pad_token_id)
    return scorer.logprobs(t_ids, t_mask, trained.completion_ids, trained.completion_mask,
                           run.device, topk)


def train_step(run: Run, step: int) -> dict[str, Any]:
    cfg, times = run.cfg, {"start": time.perf_counter()}
    recs = [run.records[i] for i in run.stream.next(cfg.train.prompts_per_step)]
    run.phase = "generation"
    batch = rollout(run, step, recs)
    times["generate"] = time.perf_counter()
    texts, rewards, correct, metrics = score(run, recs, batch)
    adv, adv_metrics = group_advantages(rewards, cfg.rollout.num_generations,
                                        cfg.algorithm.scale_std, cfg.algorithm.adv_eps,
                                        cfg.algorithm.baseline)
    metrics.update(adv_metrics)
    times["reward"] = time.perf_counter()
    rows = trained_rows(run, adv)
    data = Rows(batch.select(rows), adv[rows])
    run.phase = "teacher"
    if run.teacher is not None:
        run.teacher.maybe_sync(step)
        if run.teacher.mode == "sync":
            metrics["teacher/synced_at"] = float(run.teacher.synced_at)
        external = run.teacher.mode == "external"  # OPD's teacher sees the plain prompt
        scored = scored_by(run, run.teacher, external, recs, rows, data.batch, support_size(cfg))
        if isinstance(scored, tuple):
            data.teacher_logps, data.support_vals, data.support_ids = scored
        else:
            data.teacher_logps = scored
    data.ref_logps = scored_by(run, run.reference, True, recs, rows, data.batch)
    times["teacher"] = time.perf_counter()
    credit = None
    run.phase = "update"
    if rows.any():
        data.span = reasoning_span(cfg, run.tokenizer, data.batch)
        logps, upd = optimise(run, step, batch, rows, data)
        metrics.update(upd)
        mask = data.batch.completion_mask.float()
        metrics["policy/entropy"] = -(logps * mask).sum().item() / max(mask.sum().item(), 1)
        if data.teacher_logps is not None:
            credit, teacher_metrics = credit_diagnostics(
                run, step, data.adv, logps, data.teacher_logps, mask,
                torch.tensor(correct)[rows], data.span)
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
            if run.teacher is not None and run.teacher.mode != "external":
                sample["teacher_prompt"] = run.renderer.teacher_text(record)
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


def evaluate_now(run: Run) -> dict[str, float]:
    """Greedy accuracy on the held-out items (chosen once, as `rlsd eval` chooses them)."""
    from .evaluate import eval_items, evaluate

    if run.eval_records is None:
        run.eval_records = eval_items(run.cfg, run.cfg.train.eval_items)[0]
    start = time.perf_counter()
    result = evaluate(run.cfg, run.lm, run.tokenizer, run.eval_records, run.stop_ids, run.device)
    return {"eval/pass@1": result["pass@1"], "eval/lenient@1": result["lenient@1"],
            "eval/items": float(result["n_items"]), "eval/seconds": time.perf_counter() - start}


def is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or \
        "can't allocate memory" in text


def oom_message(run: Run, step: int) -> str:
    """Which phase ran out of memory, with which sizes, and what to lower."""
    cfg, phase = run.cfg, run.phase
    sizes = (f"{cfg.train.prompts_per_step} prompts x {cfg.rollout.num_generations} samples, "
             f"max_new_tokens {cfg.rollout.max_new_tokens}")
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
    return (f"out of memory during {phase} at step {step} ({sizes}); {kept}. Try {hint}, then "
            f"rlsd train --resume {run.run_dir}")


def guarded_step(run: Run, step: int) -> dict[str, Any]:
    """One training step, plus the periodic evaluation; out of memory becomes a clear stop."""
    try:
        metrics = train_step(run, step)
        every = run.cfg.train.eval_every
        if every and step % every == 0:
            run.phase = "evaluation"
            metrics.update(evaluate_now(run))
        return metrics
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
        raise TrainingStopped(oom_message(run, step), 1) from None


def train(cfg: Config, resume: bool = True) -> Path:
    """Run (or resume) the whole training job; returns the run directory.

    SIGINT / SIGTERM finish the current step, write a checkpoint and raise TrainingStopped;
    so do `train.max_nonfinite_steps` consecutive steps with a NaN or infinite gradient.
    """
    run = setup(cfg, resume)
    steps, every = cfg.train.steps, cfg.output.save_every
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    nonfinite = 0
    try:
        with progress_bar(cfg.output.progress) as bar:
            task = bar.add_task("train", total=steps, completed=run.start_step - 1, reward=0.0,
                                acc=0.0, sps=0.0)
            for step in range(run.start_step, steps + 1):
                metrics = guarded_step(run, step)
                run.metrics.write(metrics)
                run.accelerator.log(tracker_values(metrics), step=step)
                run.history.append(metrics)
                recent = run.history[-5:]  # single steps are noisy: show a moving average
                bar.update(task, advance=1,
                           reward=sum(m["reward/mean"] for m in recent) / len(recent),
                           acc=sum(m["reward/accuracy"] for m in recent) / len(recent),
                           sps=metrics["perf/step_seconds"])
                nonfinite = nonfinite + 1 if metrics.get("train/nonfinite") else 0
                stop = caught or nonfinite >= cfg.train.max_nonfinite_steps
                if step == steps or (every and step % every == 0) or stop:
                    save(run, step)
                if caught:
                    raise TrainingStopped(
                        f"stopped by signal {signal.Signals(caught[0]).name} after step {step}; "
                        f"checkpoint written, resume with: rlsd train --resume {run.run_dir}",
                        128 + caught[0])
                if stop:
                    raise TrainingStopped(
                        f"stopped after {nonfinite} consecutive steps with a NaN or infinite "
                        f"gradient (step {step}, skipped); checkpoint written in {run.run_dir}. "
                        "Lower train.lr or check the reward and data", 1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        run.metrics.close()
        run.samples.close()
        for tracker in run.accelerator.trackers:  # not end_training: it ends the process group
            tracker.finish()
    return run.run_dir
