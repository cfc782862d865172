"""Where a step's credit went: the completions' spans, the teacher statistics of the credit, and
the logged samples with their per-token credit.

The token credit itself is computed once per step, by the update (`update.credit`), and returned
in its `Update` record; everything here only reads it. Two token spans are found on the decoded
text of each completion (`algorithms.spans`), so a tag is found however its tokens came out:
- the reasoning span (between `rlsd.thought_open` and `rlsd.thought_close`): it restricts the
  credit under `rlsd.thought_only` and splits the multiplier statistics in every RLSD run;
- the final-answer tokens (from the last answer marker, `\\boxed{` or `<answer>`, as
  `reward.extract` finds the answer, to the end), which split the Delta statistics.
"""

from __future__ import annotations

from typing import Any

import torch

from ..algorithms import credit_split, span_split
from ..algorithms.masking import teacher_gap
from ..algorithms.method import Method
from ..algorithms.spans import answer_span_mask, reasoning_span_mask, token_pieces
from ..engine.data import PromptRenderer
from ..engine.rewards.builtin import answer_anchor
from ..engine.rollout import Batch
from ..schema.config import Config
from .records import Contexts, Credit, Rollout, Rows, Update


def completion_spans(
    cfg: Config, method: Method, tokenizer: Any, batch: Batch
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, float]]:
    """(N, T) reasoning-span and final-answer masks of every completion of the step (None where
    the method does not reweight tokens, or the extraction has no anchor), and the fraction of
    completions that open a reasoning span (`rlsd/span_frac`, for reweighting methods). The
    reasoning span's tags are the method's (`Method.span_tags`); the answer's anchor is
    `reward.extract`'s."""
    anchor = answer_anchor(cfg.reward.extract, cfg.reward.answer_marker)
    if not method.reweights and not anchor:
        return None, None, {}
    width = batch.completion_ids.shape[1]
    pieces = token_pieces(tokenizer, batch.completion_ids, batch.completion_mask)
    answer = answer_span_mask(pieces, anchor, width) if anchor else None
    if not method.reweights or method.span_tags is None:
        return None, answer, {}
    open_tag, close_tag = method.span_tags
    span = reasoning_span_mask(pieces, open_tag, close_tag, width)
    opened = [open_tag in "".join(parts) for parts in pieces]
    return span, answer, {"rlsd/span_frac": sum(opened) / max(len(opened), 1)}


def credit_diagnostics(
    method: Method,
    step: int,
    adv: torch.Tensor,
    logps: torch.Tensor,
    teacher_logps: torch.Tensor,
    token_adv: torch.Tensor,
    mask: torch.Tensor,
    correct: torch.Tensor,
    span: torch.Tensor | None,
    answer: torch.Tensor | None,
) -> dict[str, float]:
    """Teacher statistics over every trained token of the step (not means of micro-batch means),
    from the step's own credit `token_adv` (n, T): the method's metrics, the teacher-student KL,
    Delta and (rlsd) clip fractions split by correct / incorrect completions and by final-answer
    tokens / the other tokens, and (rlsd) the mean multiplier inside / outside the reasoning
    span."""
    metrics = method.metrics(step, adv, logps, teacher_logps, token_adv, mask, span)
    if span is not None and method.reweights:  # where did the teacher's credit go?
        signed = adv != 0
        multiplier = token_adv[signed] / adv[signed].unsqueeze(1)
        metrics.update(span_split(multiplier, span[signed], mask[signed]))
    delta = teacher_gap(teacher_logps, logps, mask)  # (n, T), 0 at pads
    tokens = mask.bool()
    metrics["teacher/kl"] = -(delta.sum() / tokens.sum().clamp(min=1)).item()
    groups = {"correct": tokens & correct.unsqueeze(1), "incorrect": tokens & ~correct.unsqueeze(1)}
    if answer is not None:
        groups.update(answer_tokens=tokens & answer, other_tokens=tokens & ~answer)
    metrics.update(credit_split(delta, groups, method.clip_bounds(adv, mask, span)))
    return metrics


def trained_diagnostics(
    method: Method, step: int, rollout: Rollout, credit: Credit, rows: Rows, update: Update
) -> dict[str, float]:
    """The policy's entropy on the trained tokens and, when a teacher scored them, the credit
    diagnostics over the trained rows whose teacher saw a context."""
    mask = rows.batch.completion_mask
    metrics = {"policy/entropy": -update.logps[mask].sum().item() / max(mask.sum().item(), 1)}
    if rows.teacher_logps is None:
        return metrics
    keep = rows.context_rows
    if keep is None:
        keep = torch.ones(rows.adv.shape[0], dtype=torch.bool)
    if not keep.any():
        return metrics

    def pick(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[keep]

    correct = torch.tensor(rollout.correct)[credit.rows]
    answer = None if credit.answer is None else credit.answer[credit.rows]
    metrics.update(
        credit_diagnostics(
            method,
            step,
            rows.adv[keep],
            update.logps[keep],
            rows.teacher_logps[keep],
            update.token_adv[keep],
            mask[keep],
            correct[keep],
            pick(rows.span),
            pick(answer),
        )
    )
    return metrics


def sample_lines(
    step: int,
    rollout: Rollout,
    credit: Credit,
    token_adv: torch.Tensor | None,
    contexts: Contexts | None,
    renderer: PromptRenderer,
    reweights: bool,
    limit: int,
) -> list[dict[str, Any]]:
    """The step's completions (the first `limit`, 0: all) as samples.jsonl lines, with their
    rewards; trained rows with a teacher also get per-token credit (the token advantages
    `token_adv` (n, T), and for a reweighting method the multipliers m_t) and, for a
    self-teacher, the prompt it saw with its context's kind (`none`: no context, uniform
    credit)."""
    batch, texts = rollout.batch, rollout.texts
    credit_row = {row: k for k, row in enumerate(credit.index)}
    lines = []
    for i in range(min(limit or len(texts), len(texts))):
        record = rollout.record_of(i)
        ids = batch.completion_ids[i][batch.completion_mask[i]].tolist()
        adv = credit.adv[i]
        sample = {
            "step": step,
            "index": i,
            "prompt": record.prompt,
            "answer": record.answer,
            "completion": texts[i],
            "reward": rollout.rewards[i].item(),
            "correct": rollout.correct[i],
            "advantage": adv.item(),
            "token_ids": ids,
        }
        if token_adv is not None and i in credit_row:
            row_adv = token_adv[credit_row[i]][: len(ids)]
            sample["token_advantage"] = [round(v, 5) for v in row_adv.tolist()]
            if contexts is not None:
                context = contexts.chosen[i]
                sample["teacher_context_kind"] = context.kind if context else "none"
                if context is not None:
                    sample["teacher_prompt"] = renderer.teacher_text(record, context)
            if reweights and adv != 0:
                sample["credit_multiplier"] = [round(v, 4) for v in (row_adv / adv).tolist()]
        lines.append(sample)
    return lines
