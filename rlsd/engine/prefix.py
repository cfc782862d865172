"""Scoring completions that share a prompt with the prompt processed once (issue 24).

A step scores B x G rows [prompt ; completion], and the G rows of a group share their prompt.
Here the rows of a batch are grouped by identical prompt ids (whatever their order: the
teacher's prompts under `teacher.context` sibling or memory differ per completion, and only the
rows with the same teacher prompt share one). Each distinct prompt runs through the decoder
once (U x P, its padding moved to the end, its keys and values kept in a cache); then all N
completions run against those keys and values (N x T, right-padded, positions continuing from
each prompt's length, an attention mask covering prefix and completion). The last prompt
position's hidden state predicts the first completion token. The backbone thus runs on
U.P + N.T tokens instead of N.(P + T): the FLOPs of the linear layers drop by about
(P + G.T) / (G.(P + T)).

Under autograd the gradient reaches the prefix through the cached keys and values and that
last hidden state; the backward of their expansion to the N rows sums the contributions of the
rows that share them. Values and gradients equal the unshared path (`TokenScorer.
_completion_hidden`) up to floating-point reassociation (tested in float64).

The cache: transformers' `DynamicLayer.update` concatenates the new keys onto the stored ones
in place, so a cache filled by the prefix cannot serve the replay of a checkpointed layer (the
replay would append a second time). Two small layer classes replace it: `_Recorded` (the
prefix pass) keeps the keys and values it is given, overwriting, and `_Extended` (the
completion pass) returns [prefix ; completion] keys without storing anything. Both give the
same result when a layer is replayed, which is what gradient checkpointing needs; the layers'
`_can_checkpoint_with_cache` flag is set while they run so transformers keeps the cache under
checkpointing. Only non-reentrant checkpointing composes (rlsd enables that one): reentrant
checkpointing runs the forward without autograd, so the prefix's keys would carry no gradient,
and the path then declines. The expansion to N rows is a view (`expand`) when the rows come as
equal runs of consecutive rows per prompt, as a step's groups do, and an index otherwise; the
one copy is the concatenation the attention needs anyway.

`shared_prefix_hidden` declines (returns None, and the caller runs the unshared path) when no
two rows share a prompt, for models with sliding-window or other non-full attention layers,
and under reentrant checkpointing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .decode import cache_keyword


def prompt_groups(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (N, P) -> the first row of each distinct prompt (U,), in order of first
    occurrence, and each row's prompt index (N,). Prompts are equal when their real tokens are
    (padding ignored, so the same prompt padded differently is one prompt)."""
    n = prompt_ids.shape[0]
    key = prompt_ids.masked_fill(~prompt_mask.bool(), -1)  # (N, P)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)  # sorted order
    count = int(inverse.max()) + 1 if n else 0
    rows = torch.arange(n, device=prompt_ids.device)
    first = torch.full((count,), n, dtype=torch.long, device=prompt_ids.device)
    first = first.scatter_reduce(0, inverse, rows, "amin")  # (U,) first row per prompt
    by_first = first.argsort()
    rank = torch.empty_like(by_first)
    rank[by_first] = torch.arange(count, device=prompt_ids.device)
    return first[by_first], rank[inverse]


def run_length(inverse: torch.Tensor, count: int) -> int:
    """G when the rows are `count` runs of G consecutive rows, one per prompt in order; else 0."""
    n = inverse.shape[0]
    if count == 0 or n % count:
        return 0
    runs = torch.arange(count, device=inverse.device).repeat_interleave(n // count)
    return n // count if torch.equal(inverse, runs) else 0


def _extend(prefix: torch.Tensor, new: torch.Tensor, rows: torch.Tensor, group: int):
    """[prefix of each row's prompt ; the row's own] keys or values: (U, h, P, d) and
    (N, h, T, d) -> (N, h, P + T, d)."""
    if group:  # equal consecutive runs: the prefix expanded (a view), one concatenation
        u = prefix.shape[0]
        wide = prefix.unsqueeze(1).expand(u, group, *prefix.shape[1:])
        return torch.cat([wide, new.unflatten(0, (u, group))], -2).flatten(0, 1)
    return torch.cat([prefix.index_select(0, rows), new], -2)


def _layer_classes():
    from transformers.cache_utils import DynamicLayer

    class Recorded(DynamicLayer):
        """The prefix pass: keeps the keys and values it is given (a replay overwrites)."""

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states

    class Extended(DynamicLayer):
        """The completion pass: the prefix's keys and values before the completions', stored
        nowhere (a replay returns the same)."""

        def __init__(self, keys, values, rows, group):
            super().__init__()
            self.keys, self.values, self.rows, self.group = keys, values, rows, group
            self.device, self.is_initialized = keys.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            return (
                _extend(self.keys, key_states, self.rows, self.group),
                _extend(self.values, value_states, self.rows, self.group),
            )

    return Recorded, Extended


def full_attention_only(decoder: nn.Module) -> bool:
    """Every layer is full attention: no sliding window, linear or shared-cache layers (False
    for an older or unusual config, which then takes the unshared path)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, _ = get_layer_types_and_kwargs(decoder.config.get_text_config(decoder=True))
    except Exception:
        return False
    return all(t == "full_attention" for t in types)


def supports_shared_prefix(decoder: nn.Module) -> bool:
    """Every layer is full attention, and checkpointing, if on and active, is the
    non-reentrant kind."""
    if not full_attention_only(decoder):
        return False
    for layer in _checkpointed(decoder):
        keywords = getattr(layer._gradient_checkpointing_func, "keywords", {})
        if keywords.get("use_reentrant", True) is not False:
            return False
    return True


def _checkpointed(decoder: nn.Module) -> list[nn.Module]:
    """The layers that transformers will checkpoint in this forward (training with autograd)."""
    if not torch.is_grad_enabled():
        return []
    return [
        m
        for m in decoder.modules()
        if getattr(m, "gradient_checkpointing", False)
        and m.training
        and hasattr(m, "_can_checkpoint_with_cache")
    ]


@contextlib.contextmanager
def _cache_kept(decoder: nn.Module) -> Iterator[None]:
    """Let checkpointed layers keep the (replay-safe) cache while the two passes run."""
    layers = _checkpointed(decoder)
    for layer in layers:
        layer._can_checkpoint_with_cache = True  # an instance attribute over the class's
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache


def shared_prefix_hidden(
    decoder: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """As `TokenScorer._completion_hidden`, with each distinct prompt processed once: input_ids
    (N, P + T) left-padded prompts then completions, completion_mask (N, T) -> hidden states
    (M, H) that predict the valid completion tokens, and those ids (M,); None when no prompt
    is shared or the model does not support it (see the module docstring)."""
    from transformers.cache_utils import Cache

    width = completion_mask.shape[1]
    prompt_width = input_ids.shape[1] - width
    if width == 0 or prompt_width == 0:
        return None
    prompt_ids, prompt_mask = input_ids[:, :prompt_width], attention_mask[:, :prompt_width]
    first, inverse = prompt_groups(prompt_ids, prompt_mask)
    if first.shape[0] == input_ids.shape[0] or not supports_shared_prefix(decoder):
        return None
    recorded, extended = _layer_classes()
    # the distinct prompts, their padding moved to the end: every position attends to a key
    p_mask = prompt_mask[first].long()  # (U, P)
    pads = (p_mask == 0).sum(1, keepdim=True)  # (U, 1) each prompt's left padding
    order = (torch.arange(prompt_width, device=p_mask.device) + pads) % prompt_width
    p_ids, p_mask = prompt_ids[first].gather(1, order), p_mask.gather(1, order)
    lengths = p_mask.sum(1)  # (U,)
    keyword, cache = cache_keyword(decoder), Cache(layer_class_to_replicate=recorded)
    c_mask = completion_mask.long()  # (N, T)
    with _cache_kept(decoder):
        prefix = decoder(
            input_ids=p_ids,
            attention_mask=p_mask,
            position_ids=(p_mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            **{keyword: cache},
        ).last_hidden_state  # (U, P, H)
        group = run_length(inverse, first.shape[0])
        layers = [extended(la.keys, la.values, inverse, group) for la in cache.layers]
        hidden = decoder(
            input_ids=input_ids[:, prompt_width:],
            attention_mask=torch.cat([p_mask.index_select(0, inverse), c_mask], 1),
            position_ids=lengths[inverse].unsqueeze(1) + (c_mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            **{keyword: Cache(layers=layers)},
        ).last_hidden_state  # (N, T, H)
    last = prefix[torch.arange(prefix.shape[0], device=prefix.device), lengths - 1]  # (U, H)
    predicting = torch.cat([last.index_select(0, inverse).unsqueeze(1), hidden[:, :-1]], 1)
    valid = completion_mask.bool()  # (N, T): position t predicts token t
    return predicting[valid], input_ids[:, prompt_width:][valid]
