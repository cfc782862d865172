"""What each training method is, in one place: one small object per method.

A method declares
- `teacher`: who scores the student's samples: None (no teacher), "privileged" (the model itself
  shown the teacher template with its privileged context) or "plain" (an external model shown the
  student's own prompt);
- `dense`: whether every completion carries a gradient (distillation); otherwise completions with
  zero sequence advantage are skipped before the teacher and the policy pass (exact with no KL);
- `support`: what the teacher returns besides the sampled tokens' log-probs: None (nothing),
  0 (its whole distribution) or k (its top k), for the exact divergences;
- `divergence_weight`: the weight of that exact divergence in the loss (0: none);
- `options`: the config keys that apply to it (any other `rlsd.*` / `opsd.*` key is refused);
- `token_advantages`: its per-token credit, and `metrics`: its own statistics of that credit.

The training loop and the update never branch on a method's name: they ask its object. Adding a
method means adding a class here and an entry to `METHODS`. The objects hold plain numbers (built
from a config by `method_for`, which only reads attributes: nothing here imports the config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .distill import opsd_token_advantages, sampled_forward_token_advantages
from .masking import masked, teacher_gap
from .rlsd import lambda_at, reweighted_tokens, rlsd_credit, rlsd_metrics

SELF_TEACHERS = ("live", "frozen", "sync")  # teacher.mode values of the model itself


@dataclass(frozen=True)
class Method:
    """GRPO: the verifier's sequence advantage on every token (the base of the others)."""

    name: ClassVar[str] = "grpo"
    summary: ClassVar[str] = "verifier only"
    teacher: ClassVar[str | None] = None
    dense: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ()
    teacher_modes: ClassVar[tuple[str, ...]] = ()

    @property
    def support(self) -> int | None:
        return None

    @property
    def divergence_weight(self) -> float:
        return 0.0

    @property
    def reweights(self) -> bool:
        """True when its token credit is the sequence advantage times a multiplier m_t."""
        return False

    def token_advantages(
        self,
        step: int,
        seq_adv: torch.Tensor,
        logps: torch.Tensor,
        teacher_logps: torch.Tensor | None,
        completion_mask: torch.Tensor,
        span: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N,) sequence advantages and (N, T) log-probs -> (N, T) token advantages."""
        return masked(
            seq_adv.unsqueeze(1).expand_as(completion_mask).to(logps.dtype), completion_mask
        )

    def metrics(
        self,
        step: int,
        seq_adv: torch.Tensor,
        logps: torch.Tensor,
        teacher_logps: torch.Tensor,
        token_adv: torch.Tensor,
        completion_mask: torch.Tensor,
        span: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """The method's own statistics of a step's credit (all trained rows at once)."""
        return {}

    def clip_bounds(
        self, seq_adv: torch.Tensor, completion_mask: torch.Tensor, span: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """For a reweighting method, (seq_adv, the reweighted tokens (N, T), eps_w): what the
        per-group clip fractions of `credit_split` need; None otherwise."""
        return None


@dataclass(frozen=True)
class RLSD(Method):
    """The verifier sets each completion's direction, the self-teacher each token's share."""

    name: ClassVar[str] = "rlsd"
    summary: ClassVar[str] = "verifier sets the direction, the self-teacher the per-token size"
    teacher: ClassVar[str | None] = "privileged"
    options: ClassVar[tuple[str, ...]] = ("rlsd.",)
    teacher_modes: ClassVar[tuple[str, ...]] = SELF_TEACHERS
    lam: float = 0.5
    eps_w: float = 0.2
    warmup: int = 0
    decay: int = 0
    negative_only: bool = False
    thought_only: bool = False

    @property
    def reweights(self) -> bool:
        return True

    def lambda_at(self, step: int) -> float:
        return lambda_at(step, self.lam, self.warmup, self.decay)

    def _span(self, span: torch.Tensor | None) -> torch.Tensor | None:
        return span if self.thought_only else None

    def token_advantages(self, step, seq_adv, logps, teacher_logps, completion_mask, span=None):
        token_adv, _ = rlsd_credit(
            seq_adv,
            logps,
            teacher_logps,
            completion_mask,
            self.lambda_at(step),
            self.eps_w,
            self.negative_only,
            self._span(span),
        )
        return token_adv

    def reweighted(
        self, seq_adv: torch.Tensor, completion_mask: torch.Tensor, span: torch.Tensor | None
    ) -> torch.Tensor:
        """(N, T) the tokens whose credit the teacher sets."""
        return reweighted_tokens(seq_adv, completion_mask, self.negative_only, self._span(span))

    def clip_bounds(self, seq_adv, completion_mask, span=None):
        return seq_adv, self.reweighted(seq_adv, completion_mask, span), self.eps_w

    def metrics(self, step, seq_adv, logps, teacher_logps, token_adv, completion_mask, span=None):
        delta = teacher_gap(teacher_logps, logps, completion_mask)
        return rlsd_metrics(
            seq_adv,
            delta,
            token_adv,
            completion_mask,
            self.reweighted(seq_adv, completion_mask, span),
            self.lambda_at(step),
            self.eps_w,
        )


@dataclass(frozen=True)
class OPSD(Method):
    """Self-distillation only: the student moves towards its privileged self on its samples."""

    name: ClassVar[str] = "opsd"
    summary: ClassVar[str] = "self-distillation only"
    teacher: ClassVar[str | None] = "privileged"
    dense: ClassVar[bool] = True
    options: ClassVar[tuple[str, ...]] = ("opsd.divergence", "opsd.direction", "opsd.topk")
    teacher_modes: ClassVar[tuple[str, ...]] = SELF_TEACHERS
    divergence: str = "sampled"
    direction: str = "reverse"
    topk: int = 32

    @property
    def support(self) -> int | None:
        if self.divergence == "sampled":
            return None
        return self.topk if self.divergence == "topk" else 0

    @property
    def divergence_weight(self) -> float:
        return 0.0 if self.divergence == "sampled" else 1.0

    def distill_advantages(
        self, logps: torch.Tensor, teacher_logps: torch.Tensor, completion_mask: torch.Tensor
    ) -> torch.Tensor:
        """The sampled estimate's token advantages (0 when the exact divergence is the loss)."""
        if self.divergence != "sampled":
            return torch.zeros_like(masked(logps.detach(), completion_mask))
        if self.direction == "forward":
            return sampled_forward_token_advantages(logps, teacher_logps, completion_mask)
        return opsd_token_advantages(logps, teacher_logps, completion_mask)[0]

    def token_advantages(self, step, seq_adv, logps, teacher_logps, completion_mask, span=None):
        return self.distill_advantages(logps, teacher_logps, completion_mask)

    def metrics(self, step, seq_adv, logps, teacher_logps, token_adv, completion_mask, span=None):
        return opsd_token_advantages(logps, teacher_logps, completion_mask)[1]


@dataclass(frozen=True)
class GRPO_OPSD(OPSD):
    """The GRPO loss plus beta times the OPSD loss (the paper's naive combination)."""

    name: ClassVar[str] = "grpo_opsd"
    summary: ClassVar[str] = "GRPO loss + opsd.beta x OPSD loss"
    options: ClassVar[tuple[str, ...]] = ("opsd.",)
    beta: float = 1.0

    @property
    def divergence_weight(self) -> float:
        return 0.0 if self.divergence == "sampled" else self.beta

    def token_advantages(self, step, seq_adv, logps, teacher_logps, completion_mask, span=None):
        grpo = Method.token_advantages(self, step, seq_adv, logps, None, completion_mask)
        return grpo + self.beta * self.distill_advantages(logps, teacher_logps, completion_mask)


@dataclass(frozen=True)
class OPD(OPSD):
    """Distillation from an external teacher shown the student's own prompt."""

    name: ClassVar[str] = "opd"
    summary: ClassVar[str] = "distillation from an external teacher"
    teacher: ClassVar[str | None] = "plain"
    teacher_modes: ClassVar[tuple[str, ...]] = ("external",)


METHODS: dict[str, type[Method]] = {m.name: m for m in (Method, RLSD, OPSD, GRPO_OPSD, OPD)}


def method_for(cfg: Any) -> Method:
    """The method object of a config (reads `algorithm.name` and the `rlsd` / `opsd` sections)."""
    kind = METHODS[cfg.algorithm.name]
    if kind is RLSD:
        r = cfg.rlsd
        return RLSD(
            r.lambda_,
            r.eps_w,
            r.lambda_warmup_steps,
            r.lambda_decay_steps,
            r.negative_only,
            r.thought_only,
        )
    if issubclass(kind, OPSD):
        o = cfg.opsd
        extra = {"beta": o.beta} if kind is GRPO_OPSD else {}
        return kind(divergence=o.divergence, direction=o.direction, topk=o.topk, **extra)
    return kind()
