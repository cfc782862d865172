"""The step's teacher pass: each completion's privileged context, the teacher's (and the KL
reference's) log-probs of the trained rows, and the memory of successes after the step.

The self-teacher sees, per completion, the context `rlsd/engine/context.py` chooses
(`teacher.context`); a completion without one is not scored, and the update gives it Delta = 0
(uniform credit, no distillation signal): `Teaching.context_rows` marks the trained rows that
have one. The external teacher (OPD) and the KL reference see the student's own prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..algorithms.method import Method
from ..engine.context import ContextMemory, choose_contexts, context_metrics, remember
from ..engine.data import PromptRenderer
from ..engine.rollout import Batch, left_pad
from ..engine.teacher import Teacher, TeacherScores
from .records import Contexts, Credit, Rollout, Teaching


@dataclass(frozen=True)
class Scorers:
    """Who scores the trained rows, and how their prompts are rendered and run."""

    teacher: Teacher | None  # the method's teacher (None: GRPO)
    reference: Teacher | None  # the frozen initial policy, for the KL penalty (algorithm.kl_coef)
    renderer: PromptRenderer  # student and teacher prompts
    pad_id: int
    device: torch.device
    share_prefix: bool  # train.share_prefix: rows with identical prompts run them once


def find_contexts(
    sources: list[str], renderer: PromptRenderer, memory: ContextMemory | None, rollout: Rollout
) -> Contexts:
    """The context of every completion of the step (`teacher.context`'s sources, in order) and
    its prompt's memory key."""
    rows = [rollout.record_of(i) for i in range(len(rollout.texts))]
    keys = [renderer.student_text(r) for r in rows]
    chosen = choose_contexts(
        sources,
        [r.solution or r.answer for r in rows],
        keys,
        rollout.texts,
        rollout.correct,
        rollout.batch.completion_mask.sum(1).tolist(),
        rollout.group,
        memory,
    )
    return Contexts(chosen, keys)


def contexts_metrics(
    contexts: Contexts, sources: list[str], memory: ContextMemory | None, index: list[int]
) -> dict[str, float]:
    """Which context the trained rows (`index`) got, and how often the memory had their prompt."""
    metrics = context_metrics([contexts.chosen[i] for i in index], sources)
    if memory is not None and index:
        hits = sum(memory.get(contexts.keys[i]) is not None for i in index)
        metrics.update({"memory/size": float(len(memory)), "memory/hit_frac": hits / len(index)})
    return metrics


def scored_by(
    scorers: Scorers,
    teacher: Teacher,
    prompts: list[list[int]],
    trained: Batch,
    topk: int | None = None,
) -> TeacherScores:
    """Log-probs (n, T) of `trained`'s completions after the given prompts; with `topk`, also
    the teacher's distribution (see Teacher.logprobs). Rows with identical prompts share
    their prefix (`train.share_prefix`): all G rows of a group with the reference context,
    only those given the same sibling or memory context otherwise."""
    t_ids, t_mask = left_pad(prompts, scorers.pad_id)
    return teacher.logprobs(
        t_ids,
        t_mask,
        trained.completion_ids,
        trained.attention,  # every real token: an episode's tool text is attended, not trained
        scorers.device,
        topk,
        scorers.share_prefix,
    )


def self_teacher_scores(
    scorers: Scorers, method: Method, rollout: Rollout, index: list[int], contexts: Contexts
) -> Teaching:
    """The trained rows (`index`) that have a context, scored by the self-teacher shown it."""
    chosen = [contexts.chosen[i] for i in index]
    has = torch.tensor([c is not None for c in chosen], dtype=torch.bool)  # (n,)
    trained = rollout.batch.select(torch.tensor(index, dtype=torch.long))
    if not has.any():
        width = trained.completion_ids.shape[1]
        return Teaching(teacher_logps=torch.zeros(len(index), width), context_rows=has)
    prompts = [
        scorers.renderer.teacher_ids(rollout.record_of(i), c)
        for i, c in zip(index, chosen)
        if c is not None
    ]
    scored = sequence_lengths(prompts, trained.select(has))
    if has.all():
        scores = scored_by(scorers, scorers.teacher, prompts, trained, method.support)
        return Teaching(scores.logps, None, scores.support_vals, scores.support_ids, scored=scored)
    assert method.support is None, "exact divergences need a context for every row"
    scores = scored_by(scorers, scorers.teacher, prompts, trained.select(has))
    logps = torch.zeros(has.shape[0], scores.logps.shape[1])  # (n, T)
    logps[has] = scores.logps
    return Teaching(teacher_logps=logps, context_rows=has, scored=scored)


def sequence_lengths(prompts: list[list[int]], completions: Batch) -> tuple[int, ...]:
    """The length of each [prompt ; completion] a pass forwards (for the compute count)."""
    lengths = completions.attention.sum(1).tolist()  # an episode's tool text is forwarded too
    return tuple(len(p) + c for p, c in zip(prompts, lengths))


def teach(
    scorers: Scorers,
    method: Method,
    step: int,
    rollout: Rollout,
    credit: Credit,
    contexts: Contexts | None,
) -> Teaching:
    """The trained rows scored by the method's teacher and by the KL reference, with the
    teacher's metrics (and the sync teacher refreshed first when due)."""
    teaching, metrics = Teaching(), {}
    index = credit.index
    trained = rollout.batch.select(credit.rows)
    plain = [ids[mask].tolist() for ids, mask in zip(trained.prompt_ids, trained.prompt_mask)]
    teacher = scorers.teacher
    if teacher is not None:
        teacher.maybe_sync(step)
        if teacher.mode == "sync":
            metrics["teacher/synced_at"] = float(teacher.synced_at)
        if contexts is not None and index:
            teaching = self_teacher_scores(scorers, method, rollout, index, contexts)
        elif index:  # OPD: the external teacher sees the student's own prompt
            scores = scored_by(scorers, teacher, plain, trained, method.support)
            scored = sequence_lengths(plain, trained)
            teaching = Teaching(
                scores.logps, None, scores.support_vals, scores.support_ids, scored=scored
            )
    ref_logps, scored = None, teaching.scored
    if scorers.reference is not None and index:
        ref_logps = scored_by(scorers, scorers.reference, plain, trained).logps
        scored += sequence_lengths(plain, trained)
    return replace(teaching, ref_logps=ref_logps, metrics=metrics, scored=scored)


def remember_step(
    memory: ContextMemory, accelerator: Any, step: int, contexts: Contexts, rollout: Rollout
) -> dict[str, float]:
    """Offer the step's correct completions (from every process, in rank order, so every
    process keeps the same store) to the memory of successes."""
    lengths = rollout.batch.completion_mask.sum(1).tolist()
    offers = list(
        zip(contexts.keys, rollout.texts, rollout.rewards.tolist(), rollout.correct, lengths)
    )
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        offers = gather_object(offers)
    stored = remember(memory, *(list(column) for column in zip(*offers)), step) if offers else 0
    return {"memory/stored": float(stored)}
