"""The records one training step passes down, each returned by one stage and read by the next.

    sample + grade -> Rollout      what the policy wrote and what the verifiers said (N rows)
    advantages     -> Credit       group advantages, the rows that carry a gradient, token spans
    contexts       -> Contexts     each completion's privileged context (self-teacher only)
    teach          -> Teaching     the teacher's and the KL reference's scores of the trained rows
    Rows.of(...)   -> Rows         the trained rows with everything their loss needs
    optimise       -> Update       the log-probs and the token credit the update used, its metrics

N = B prompts x G samples, laid out group by group (row i belongs to prompt i // G); n = the
trained rows (`Credit.rows`), T = the batch's completion width. Nothing here is filled in place:
a stage that adds to a record returns a new one (`dataclasses.replace`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from ..engine.context import Context
from ..engine.data import Record
from ..engine.rollout import Batch, concat_batches


@dataclass(frozen=True)
class Rollout:
    """The step's samples and their verdicts."""

    records: list[Record]  # (B,) this process's prompts
    batch: Batch  # prompt (N, P) and completion (N, T) ids and masks
    texts: list[str]  # (N,) the decoded completions
    rewards: torch.Tensor  # (N,) float
    correct: list[bool]  # (N,) the verifiers' verdicts
    group: int  # G: consecutive rows that share a prompt
    metrics: dict[str, float] = field(default_factory=dict)  # reward/*: the verifiers' counts

    def record_of(self, row: int) -> Record:
        return self.records[row // self.group]

    def take_groups(self, keep: torch.Tensor) -> Rollout:
        """The rollout of the groups where `keep` (B,) is True, in order."""
        rows = keep.repeat_interleave(self.group)  # (N,)
        index = rows.nonzero().flatten().tolist()
        return replace(
            self,
            records=[r for r, k in zip(self.records, keep.tolist()) if k],
            batch=self.batch.select(rows),
            texts=[self.texts[i] for i in index],
            rewards=self.rewards[rows],
            correct=[self.correct[i] for i in index],
        )

    @staticmethod
    def merge(parts: list[Rollout], pad_id: int) -> Rollout:
        """Several rounds' rollouts as one (their groups in order; see `merge_reward_metrics`)."""
        return Rollout(
            [r for part in parts for r in part.records],
            concat_batches([part.batch for part in parts], pad_id),
            [t for part in parts for t in part.texts],
            torch.cat([part.rewards for part in parts]),
            [c for part in parts for c in part.correct],
            parts[0].group,
            merge_reward_metrics([(part.metrics, len(part.texts)) for part in parts]),
        )


def merge_reward_metrics(parts: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """The verifiers' metrics of several rounds, each given with its number of completions:
    counts (`reward/errors`, `reward/timeouts`, `reward/unjudged`) add up, per-verifier means
    (`reward/<name>/mean`) are weighted by completions, and `reward/error_frac` is recomputed."""
    n = sum(count for _, count in parts)
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for metrics, _ in parts for k in metrics):
        values = [(metrics[key], count) for metrics, count in parts if key in metrics]
        if key.endswith("/mean"):
            out[key] = sum(v * c for v, c in values) / max(sum(c for _, c in values), 1)
        else:
            out[key] = sum(v for v, _ in values)
    if "reward/error_frac" in out:
        out["reward/error_frac"] = min(out.get("reward/errors", 0.0) / max(n, 1), 1.0)
    return out


@dataclass(frozen=True)
class Credit:
    """The verifier's credit: group advantages, the rows that carry a gradient, and the token
    spans the teacher's statistics are split by."""

    adv: torch.Tensor  # (N,) sequence advantages
    rows: torch.Tensor  # (N,) bool: rows that carry a gradient (trained)
    span: torch.Tensor | None  # (N, T) reasoning span (reweighting methods), else None
    answer: torch.Tensor | None  # (N, T) final-answer tokens (answer marker found), else None
    metrics: dict[str, float] = field(default_factory=dict)  # adv/*, rlsd/span_frac

    @property
    def index(self) -> list[int]:
        """The trained rows' positions in the step's N rows."""
        return self.rows.nonzero().flatten().tolist()


@dataclass(frozen=True)
class Contexts:
    """Each completion's privileged context (None: its teacher sees none, uniform credit) and its
    prompt's key in the memory of successes."""

    chosen: list[Context | None]  # (N,)
    keys: list[str]  # (N,) the student prompt's text


@dataclass(frozen=True)
class Teaching:
    """The teacher pass over the trained rows (all None for a method without a teacher)."""

    teacher_logps: torch.Tensor | None = None  # (n, T) 0 on rows without a context
    context_rows: torch.Tensor | None = None  # (n,) rows whose teacher saw a context (None: all)
    support_vals: torch.Tensor | None = None  # (n, T, k or V) teacher log-probs (full / topk)
    support_ids: torch.Tensor | None = None  # (n, T, k) their token ids (topk)
    ref_logps: torch.Tensor | None = None  # (n, T) frozen initial policy, for the KL penalty
    metrics: dict[str, float] = field(default_factory=dict)  # teacher/*, memory/*
    scored: tuple[int, ...] = ()  # the length of every sequence the teacher passes forwarded


@dataclass(frozen=True)
class Rows:
    """The rows of a step that carry a gradient, with everything their loss needs. Immutable:
    `select`, `cut` and `replace` return new rows."""

    batch: Batch
    adv: torch.Tensor  # (n,) sequence advantages
    teacher_logps: torch.Tensor | None = None  # (n, T)
    ref_logps: torch.Tensor | None = None  # (n, T) frozen initial policy, for the KL penalty
    old_logps: torch.Tensor | None = None  # (n, T) only with several passes per batch
    span: torch.Tensor | None = None  # (n, T) reasoning span (rlsd)
    support_vals: torch.Tensor | None = None  # (n, T, k or V) teacher log-probs (full / topk)
    support_ids: torch.Tensor | None = None  # (n, T, k) their token ids (topk)
    token_adv: torch.Tensor | None = None  # (n, T) the step's credit, when fixed beforehand
    context_rows: torch.Tensor | None = None  # (n,) rows whose teacher saw a context (None: all)

    @classmethod
    def of(cls, batch: Batch, credit: Credit, teaching: Teaching) -> Rows:
        """The trained rows of a step's batch, with their advantages, span and teacher scores."""
        rows = credit.rows
        return cls(
            batch.select(rows),
            credit.adv[rows],
            teaching.teacher_logps,
            teaching.ref_logps,
            span=None if credit.span is None else credit.span[rows],
            support_vals=teaching.support_vals,
            support_ids=teaching.support_ids,
            context_rows=teaching.context_rows,
        )

    def _map(self, fn, per_token_only: bool) -> Rows:
        """Apply `fn` to every tensor field (per-token fields only with `per_token_only`)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if (
                f.name == "batch"
                or value is None
                or (per_token_only and f.name in ("adv", "context_rows"))
            ):
                out[f.name] = value
            else:
                out[f.name] = fn(value)
        return replace(self, **out)

    def select(self, idx: torch.Tensor) -> Rows:
        """The given rows (indices or a boolean mask)."""
        return replace(self._map(lambda x: x[idx], False), batch=self.batch.select(idx))

    def cut(self, width: int) -> Rows:
        """The rows with every per-token field cut at `width` completion columns."""
        return replace(self._map(lambda x: x[:, :width], True), batch=self.batch.cut(width))


@dataclass(frozen=True)
class Update:
    """What the policy update returns."""

    logps: torch.Tensor  # (n, T) detached log-probs the credit was computed from
    token_adv: torch.Tensor  # (n, T) the token advantages the loss used
    metrics: dict[str, float]  # loss/*, policy/*, train/*
