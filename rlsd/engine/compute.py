"""What a step costs in compute: tokens generated, scored and trained, and an estimate of FLOPs.

The estimate follows the usual transformer count (Kaplan et al. 2020, arXiv 2001.08361,
section 2.1): a forward pass over one sequence of S tokens costs

    forward(S) = 2 * N * S + 2 * L * d * S**2

where N is the number of weights a token is multiplied by (every parameter except the input
embedding table, which is a lookup, plus the output head, counted even when it is tied to the
embedding), L the number of layers and d the model width: 2 FLOPs per weight per token, and the
causal attention's scores and weighted sums, 4 * L * d FLOPs for each of the S**2 / 2 pairs of
a token and one before it. A backward pass costs twice its forward, so training on a sequence
costs 3 * forward(S). Decoding with a KV cache costs what one forward over the whole sequence
costs (every token attends to its prefix once); a prompt prefilled once for its G samples is
counted once. Left out: layer norms, activations, softmax and the sampler (a few percent at
these sizes), and the savings of shared-prefix scoring (`train.share_prefix`), so the teacher's
and the policy's passes are slight over-estimates. The numbers compare runs of one model; they
are not a hardware measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    """What the FLOP count needs of a model."""

    weights: int  # N: parameters a token is multiplied by (see the module docstring)
    layers: int  # L
    width: int  # d: the hidden size


def forward_flops(shape: Shape, tokens: int) -> float:
    """FLOPs of one forward pass over a sequence of `tokens` tokens."""
    return 2.0 * shape.weights * tokens + 2.0 * shape.layers * shape.width * tokens**2


def generation_flops(shape: Shape, prompt: int, completions: list[int]) -> float:
    """FLOPs of decoding `completions` (their lengths) after one prompt of `prompt` tokens,
    the prompt prefilled once for all of them."""
    base = forward_flops(shape, prompt)
    return base + sum(forward_flops(shape, prompt + c) - base for c in completions)


def training_flops(shape: Shape, lengths: list[int], passes: int = 1) -> float:
    """FLOPs of forward and backward passes over sequences of the given lengths, `passes`
    times (PPO epochs)."""
    return 3.0 * passes * sum(forward_flops(shape, n) for n in lengths)


def scoring_flops(shape: Shape, lengths: list[int]) -> float:
    """FLOPs of forward passes without gradient (teacher, KL reference, old log-probs)."""
    return sum(forward_flops(shape, n) for n in lengths)


def flops_to_step(rows: list[dict[str, Any]], step: int) -> float | None:
    """The estimated training FLOPs of a run up to and including `step` (`compute/flops`),
    or None for a run that did not log them (from before the compute count)."""
    flops = [r["compute/flops"] for r in rows if r["step"] <= step and "compute/flops" in r]
    return sum(flops) if flops and len(flops) == sum(r["step"] <= step for r in rows) else None


def model_shape(lm: Any) -> Shape:
    """The shape of a transformers causal LM (plain, peft-wrapped or sharded): every
    parameter once, less the input embedding, plus the output head."""
    from .models import base_model

    base = base_model(lm)
    config = base.config
    text = getattr(config, "text_config", None) or config
    seen, total = set(), 0
    for param in base.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += _numel(param)
    table = base.get_input_embeddings().weight
    head = base.get_output_embeddings()
    tied = head is None or head.weight is table  # the head multiplies by the table itself
    weights = total - _numel(table) + (_numel(table) if tied else 0)
    return Shape(weights, text.num_hidden_layers, text.hidden_size)


def _numel(param: Any) -> int:
    """Elements of a parameter, whole (a DTensor shard counts its whole tensor)."""
    shape = getattr(param, "shape", None)
    count = 1
    for size in shape:
        count *= int(size)
    return count
