"""The step's teacher pass: each completion's privileged context, the teacher's (and the KL
reference's) log-probs of the trained rows, and the memory of successes after the step.

The self-teacher sees, per completion, the context `rlsd/context.py` chooses (`teacher.context`);
a completion without one is not scored, and the update gives it Delta = 0 (uniform credit,
no distillation signal): `Rows.context_rows` marks the rows that have one. The external teacher
(OPD) and the KL reference see the student's own prompt.
"""

from __future__ import annotations

from typing import Any

import torch

from .context import Context, choose_contexts, context_metrics, remember
from .rollout import Batch, left_pad
from .teacher import Teacher, TeacherScores
from .update import Rows


def step_contexts(
    run: Any, recs: list[Any], texts: list[str], correct: list[bool], batch: Batch
) -> tuple[list[Context | None], list[str]] | None:
    """The context of every completion of the step and its prompt's memory key (None when the
    method has no self-teacher)."""
    if run.method.teacher != "privileged":
        return None
    group = run.cfg.rollout.num_generations
    rows = [recs[i // group] for i in range(len(texts))]
    keys = [run.renderer.student_text(r) for r in rows]
    contexts = choose_contexts(
        run.cfg.teacher.context,
        [r.solution or r.answer for r in rows],
        keys,
        texts,
        correct,
        batch.completion_mask.sum(1).tolist(),
        group,
        run.memory,
    )
    return contexts, keys


def scored_by(
    run: Any, scorer: Teacher, prompts: list[list[int]], trained: Batch, topk: int | None = None
) -> TeacherScores:
    """Log-probs (n, T) of `trained`'s completions after the given prompts; with `topk`, also
    the teacher's distribution (see Teacher.logprobs). Rows with identical prompts share
    their prefix (`train.share_prefix`): all G rows of a group with the reference context,
    only those given the same sibling or memory context otherwise."""
    t_ids, t_mask = left_pad(prompts, run.tokenizer.pad_token_id)
    return scorer.logprobs(
        t_ids,
        t_mask,
        trained.completion_ids,
        trained.completion_mask,
        run.device,
        topk,
        run.cfg.train.share_prefix,
    )


def self_teacher_pass(
    run: Any,
    recs: list[Any],
    rows: torch.Tensor,
    data: Rows,
    found: tuple[list[Context | None], list[str]],
) -> dict[str, float]:
    """Score the trained rows that have a context under the self-teacher, into `data`."""
    group, (contexts, keys) = run.cfg.rollout.num_generations, found
    index = rows.nonzero().flatten().tolist()
    chosen = [contexts[i] for i in index]
    has = torch.tensor([c is not None for c in chosen], dtype=torch.bool)  # (n,)
    metrics = context_metrics(chosen, run.cfg.teacher.context)
    if run.memory is not None:
        hits = sum(run.memory.get(keys[i]) is not None for i in index)
        metrics.update(
            {"memory/size": float(len(run.memory)), "memory/hit_frac": hits / len(index)}
        )
    if not has.any():
        width = data.batch.completion_ids.shape[1]
        data.teacher_logps, data.context_rows = torch.zeros(len(index), width), has
        return metrics
    prompts = [
        run.renderer.teacher_ids(recs[i // group], c)
        for i, c in zip(index, chosen)
        if c is not None
    ]
    if has.all():
        scores = scored_by(run, run.teacher, prompts, data.batch, run.method.support)
        data.teacher_logps = scores.logps
        data.support_vals, data.support_ids = scores.support_vals, scores.support_ids
        return metrics
    assert run.method.support is None, "exact divergences need a context for every row"
    scores = scored_by(run, run.teacher, prompts, data.batch.select(has))
    data.teacher_logps = torch.zeros(has.shape[0], scores.logps.shape[1])
    data.teacher_logps[has] = scores.logps
    data.context_rows = has
    return metrics


def teacher_pass(
    run: Any,
    step: int,
    recs: list[Any],
    rows: torch.Tensor,
    data: Rows,
    found: tuple[list[Context | None], list[str]] | None,
) -> dict[str, float]:
    """Score the trained rows under the teacher and the KL reference into `data`; metrics."""
    metrics: dict[str, float] = {}
    group = run.cfg.rollout.num_generations
    plain = [run.renderer.student_ids(recs[i // group]) for i in rows.nonzero().flatten()]
    if run.teacher is not None:
        run.teacher.maybe_sync(step)
        if run.teacher.mode == "sync":
            metrics["teacher/synced_at"] = float(run.teacher.synced_at)
        if found is not None and rows.any():
            metrics.update(self_teacher_pass(run, recs, rows, data, found))
        elif rows.any():  # OPD: the external teacher sees the student's own prompt
            scores = scored_by(run, run.teacher, plain, data.batch, run.method.support)
            data.teacher_logps = scores.logps
            data.support_vals, data.support_ids = scores.support_vals, scores.support_ids
    if run.reference is not None and rows.any():
        data.ref_logps = scored_by(run, run.reference, plain, data.batch).logps
    return metrics


def remember_step(
    run: Any,
    step: int,
    keys: list[str],
    texts: list[str],
    rewards: torch.Tensor,
    correct: list[bool],
    batch: Batch,
) -> dict[str, float]:
    """Offer the step's correct completions (from every process, in rank order, so every
    process keeps the same store) to the memory of successes."""
    if run.memory is None:
        return {}
    offers = list(
        zip(keys, texts, rewards.tolist(), correct, batch.completion_mask.sum(1).tolist())
    )
    if run.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        offers = gather_object(offers)
    stored = remember(run.memory, *(list(column) for column in zip(*offers)), step) if offers else 0
    return {"memory/stored": float(stored)}
