"""What each training method is, in one place: one small object per method.

A method declares (class attributes)
- `name`, `summary` (in `rlsd train --help`) and `description` (in an exported model card);
- `teacher`: who scores the student's samples: None (no teacher), "privileged" (the model itself
  shown the teacher template with its privileged context) or "plain" (an external model shown the
  student's own prompt), and `teacher_modes`, the `teacher.mode` values it can run with;
- `dense`: whether every completion carries a gradient (distillation); otherwise completions with
  zero sequence advantage are skipped before the teacher and the policy pass (exact with no KL);
- `options`: the config keys it reads (dotted, or a section prefix such as "rlsd."); a key of a
  section some method reads is refused under every method that does not list it;
- `config_section`: for a method defined outside rlsd (a plugin, a test) with options of its
  own, the dataclass of its section (fields declared with `rlsd.schema.config.opt`): every
  config then holds it under the method's name (`sections.section_types`); rlsd's own methods
  read the sections declared in `sections_training.py`;
and answers (its object, built from its config section by `from_config`)
- `support`: what the teacher returns besides the sampled tokens' log-probs: None (nothing),
  0 (its whole distribution) or k (its top k), for the exact divergences;
- `divergence_weight` and `reverse_divergence`: the weight of that exact divergence in the loss
  (0: none) and its direction (KL(student || teacher) when True);
- `span_tags`: the tags around the reasoning span it reweights inside (None: no span);
- `option_problem`: a combination of its options it cannot run with;
- `token_advantages`: its per-token credit, and `metrics`: its own statistics of that credit.

The training loop, the update, the diagnostics, the config's checks, the model card and the TRL
bridge never branch on a method's name nor read its config section: they ask its object (or its
class). A subclass that sets its own `name` registers itself (`registry.METHODS`), so adding a
method means adding a class. The objects hold plain values: `from_config` only reads attributes
of its own section, and nothing here imports the config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from .distill import opsd_token_advantages, sampled_forward_token_advantages
from .masking import masked, teacher_gap
from .registry import METHODS, register
from .rlsd import lambda_at, reweighted_tokens, rlsd_credit, rlsd_metrics

SELF_TEACHERS = ("live", "frozen", "sync")  # teacher.mode values of the model itself
DECLARED = ("name", "summary", "description")  # what a registered class sets in its own body


@dataclass(frozen=True)
class Method:
    """GRPO: the verifier's sequence advantage on every token (the base of the others)."""

    name: ClassVar[str] = "grpo"
    summary: ClassVar[str] = "verifier only"
    description: ClassVar[str] = "GRPO (RL from verifiable rewards, group-normalised advantages)"
    teacher: ClassVar[str | None] = None
    dense: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ()
    config_section: ClassVar[type | None] = None
    teacher_modes: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register a subclass that names itself; one that does not is an abstract base."""
        super().__init_subclass__(**kwargs)
        if "name" not in vars(cls):
            return
        missing = [attr for attr in DECLARED if attr not in vars(cls)]
        if missing:
            raise TypeError(f"{cls.__qualname__}: set {', '.join(missing)} in the class body")
        if "config_section" in vars(cls) and f"{cls.name}." not in cls.options:
            raise TypeError(
                f"{cls.__qualname__}.options: list {cls.name + '.'!r}, the section "
                "config_section adds"
            )
        register(cls)

    @classmethod
    def from_config(cls, cfg: Any) -> Method:
        """The method object of a config, built from the method's own section only."""
        return cls()

    @property
    def support(self) -> int | None:
        return None

    @property
    def divergence_weight(self) -> float:
        return 0.0

    @property
    def reverse_divergence(self) -> bool:
        """The exact divergence's direction: True for KL(student || teacher)."""
        return True

    @property
    def span_tags(self) -> tuple[str, str] | None:
        """(open, close): the tags around the reasoning span the method can restrict its
        credit to (found on the decoded text); None when it has no span."""
        return None

    @property
    def reweights(self) -> bool:
        """True when its token credit is the sequence advantage times a multiplier m_t."""
        return False

    @property
    def spans_required(self) -> bool:
        """True when its credit acts only inside the reasoning span, so a step whose
        completions open none trains as plain GRPO (the run's health check counts them)."""
        return False

    @property
    def multiplier_bound(self) -> float | None:
        """For a reweighting method, the most a token's multiplier m_t can move from 1 (the
        credit heat map's full colour); None otherwise."""
        return None

    def option_problem(self, changed: set[str]) -> str | None:
        """Why its options cannot run together (a message naming the field), or None.
        `changed`: the dotted config keys the user set away from their defaults."""
        return None

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


register(Method)


@dataclass(frozen=True)
class RLSD(Method):
    """The verifier sets each completion's direction, the self-teacher each token's share."""

    name: ClassVar[str] = "rlsd"
    summary: ClassVar[str] = "verifier sets the direction, the self-teacher the per-token size"
    description: ClassVar[str] = (
        "RLSD (self-distilled RLVR, arXiv 2604.03128): the verifier sets the sign of each "
        "update, the model itself shown the reference solution sets each token's share"
    )
    teacher: ClassVar[str | None] = "privileged"
    options: ClassVar[tuple[str, ...]] = ("rlsd.",)
    teacher_modes: ClassVar[tuple[str, ...]] = SELF_TEACHERS
    lam: float = 0.5
    eps_w: float = 0.2
    warmup: int = 0
    decay: int = 0
    negative_only: bool = False
    thought_only: bool = False
    thought_open: str = "<think>"
    thought_close: str = "</think>"

    @classmethod
    def from_config(cls, cfg: Any) -> RLSD:
        r = cfg.rlsd
        return cls(
            lam=r.lambda_,
            eps_w=r.eps_w,
            warmup=r.lambda_warmup_steps,
            decay=r.lambda_decay_steps,
            negative_only=r.negative_only,
            thought_only=r.thought_only,
            thought_open=r.thought_open,
            thought_close=r.thought_close,
        )

    @property
    def reweights(self) -> bool:
        return True

    @property
    def span_tags(self) -> tuple[str, str]:
        return self.thought_open, self.thought_close

    @property
    def spans_required(self) -> bool:
        return self.thought_only

    @property
    def multiplier_bound(self) -> float:
        return self.lam * self.eps_w

    def option_problem(self, changed: set[str]) -> str | None:
        if self.thought_only and not (self.thought_open and self.thought_close):
            return "rlsd.thought_open/thought_close: both tags are needed for thought_only"
        return None

    def lambda_at(self, step: int) -> float:
        return lambda_at(step, self.lam, self.warmup, self.decay)

    def _span(self, span: torch.Tensor | None) -> torch.Tensor | None:
        return span if self.thought_only else None

    def credit(
        self,
        step: int,
        seq_adv: torch.Tensor,
        logps: torch.Tensor,
        teacher_logps: torch.Tensor,
        completion_mask: torch.Tensor,
        span: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The token advantages (N, T) and the credit multipliers m_t (N, T; 1 where the
        teacher does not reweight), for callers that report where the credit went."""
        return rlsd_credit(
            seq_adv,
            logps,
            teacher_logps,
            completion_mask,
            self.lambda_at(step),
            self.eps_w,
            self.negative_only,
            self._span(span),
        )

    def token_advantages(self, step, seq_adv, logps, teacher_logps, completion_mask, span=None):
        return self.credit(step, seq_adv, logps, teacher_logps, completion_mask, span)[0]

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
    description: ClassVar[str] = (
        "OPSD (on-policy self-distillation from the model shown the reference)"
    )
    teacher: ClassVar[str | None] = "privileged"
    dense: ClassVar[bool] = True
    options: ClassVar[tuple[str, ...]] = ("opsd.divergence", "opsd.direction", "opsd.topk")
    teacher_modes: ClassVar[tuple[str, ...]] = SELF_TEACHERS
    divergence: str = "sampled"
    direction: str = "reverse"
    topk: int = 32

    @classmethod
    def from_config(cls, cfg: Any) -> OPSD:
        o = cfg.opsd
        return cls(divergence=o.divergence, direction=o.direction, topk=o.topk)

    @property
    def support(self) -> int | None:
        if self.divergence == "sampled":
            return None
        return self.topk if self.divergence == "topk" else 0

    @property
    def divergence_weight(self) -> float:
        return 0.0 if self.divergence == "sampled" else 1.0

    @property
    def reverse_divergence(self) -> bool:
        return self.direction == "reverse"

    def option_problem(self, changed: set[str]) -> str | None:
        if "opsd.topk" in changed and self.divergence != "topk":
            return "opsd.topk: only applies to opsd.divergence=topk"
        return None

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
    description: ClassVar[str] = "GRPO plus an on-policy self-distillation term"
    options: ClassVar[tuple[str, ...]] = ("opsd.",)
    beta: float = 1.0

    @classmethod
    def from_config(cls, cfg: Any) -> GRPO_OPSD:
        return replace(super().from_config(cfg), beta=cfg.opsd.beta)

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
    description: ClassVar[str] = "OPD (on-policy distillation from an external teacher)"
    teacher: ClassVar[str | None] = "plain"
    teacher_modes: ClassVar[tuple[str, ...]] = ("external",)


def method_for(cfg: Any) -> Method:
    """The method object of a config: its class (`algorithm.name`) builds itself from its own
    config section. Raises ValueError naming the field for a method no class registered."""
    kind = METHODS.get(cfg.algorithm.name)
    if kind is None:
        raise ValueError(
            f"algorithm.name: unknown method {cfg.algorithm.name!r} (one of {', '.join(METHODS)})"
        )
    return kind.from_config(cfg)


__all__ = ["GRPO_OPSD", "METHODS", "OPD", "OPSD", "RLSD", "Method", "method_for"]
