"""Scoring a group's completions packed behind their prompt, in one row (issue 24).

The shared-prefix path (`rlsd/engine/prefix.py`) runs each distinct prompt once, but it still runs
every completion padded to the longest one of the pass: with completions of 7-64 tokens, most
of the N x T completion positions are padding. Here the rows with the same prompt become one
packed row, [prompt ; completion 1 ; completion 2 ; ...] with no padding inside, under a 4D
attention mask: the prompt is causal, and each completion attends to the prompt and to its own
earlier tokens, never to another completion. Positions continue from the prompt's length in
every completion, as if each were scored whole. The backbone runs on sum(L_u) + sum(len_r)
positions (real prompt and completion tokens only; rows are right-padded to the longest packed
row) in one forward, with no cache, so any gradient checkpointing composes and FSDP2 sees each
layer once.

What it costs instead: the attention of a packed row is dense, S x S for a row of width S,
where the padded layout pays N x T x (P + T). `packing_pays` estimates both (the linear
layers' and the attention's multiply-adds, from the model config) and packs only when packing
is the cheaper and its mask stays under MAX_MASK_ELEMENTS, so long completions of many samples,
where S^2 grows fast, keep the shared-prefix layout.

`packed_hidden` declines (returns None) when no prompt is shared, for attention other than
sdpa or eager (flash attention takes no custom mask), for models with sliding-window or other
non-full attention layers (the mask would not encode the window), and when a completion's mask
has holes (the packed row keeps the valid tokens only, which scores holes differently).
"""

from __future__ import annotations

import torch
from torch import nn

from .prefix import full_attention_only, prompt_groups

MASK_FORMATS = ("sdpa", "eager")  # attention implementations that take a custom 4D mask
MAX_MASK_ELEMENTS = 2**28  # U x S x S: 256 MiB as booleans, 1 GiB as the float mask kernels use


def contiguous_lengths(completion_mask: torch.Tensor) -> torch.Tensor | None:
    """(N, T) -> each row's valid length (N,), or None when a row's valid tokens are not a
    prefix of the row."""
    lengths = completion_mask.long().sum(1)
    cols = torch.arange(completion_mask.shape[1], device=completion_mask.device)
    if not torch.equal(completion_mask.bool(), cols < lengths.unsqueeze(1)):
        return None
    return lengths


def packed_layout(
    prompt_lengths: list[int], lengths: list[int], inverse: list[int]
) -> dict[str, torch.Tensor]:
    """Where everything goes in the packed rows. prompt_lengths (U): each distinct prompt's
    real length; lengths (N): each completion's; inverse (N): each completion's prompt.

    Returns `segment` (U, S): 0 on the prompt, r + 1 on completion r, -1 on padding;
    `positions` (U, S); `token_at` (sum lengths,): the flat column (u * S + column) of each
    completion token, row by row; `predictor_at` (the same length): the flat column whose
    hidden state predicts that token (the prompt's last position for a completion's first)."""
    width = list(prompt_lengths)  # each packed row's width so far
    starts = []
    for row, u in enumerate(inverse):
        starts.append(width[u])
        width[u] += lengths[row]
    s = max(width)
    segment = torch.full((len(prompt_lengths), s), -1, dtype=torch.long)
    positions = torch.zeros((len(prompt_lengths), s), dtype=torch.long)
    for u, length in enumerate(prompt_lengths):
        segment[u, :length] = 0
        positions[u, :length] = torch.arange(length)
    token_at, predictor_at = [], []
    for row, (u, start, n) in enumerate(zip(inverse, starts, lengths)):
        segment[u, start : start + n] = row + 1
        positions[u, start : start + n] = prompt_lengths[u] + torch.arange(n)
        cols = [u * s + start + k for k in range(n)]
        token_at += cols
        if n:
            predictor_at += [u * s + prompt_lengths[u] - 1, *cols[:-1]]
    return {
        "segment": segment,
        "positions": positions,
        "token_at": torch.tensor(token_at, dtype=torch.long),
        "predictor_at": torch.tensor(predictor_at, dtype=torch.long),
    }


def packed_mask(segment: torch.Tensor) -> torch.Tensor:
    """(U, S) segments -> (U, 1, S, S) boolean mask, True where query i may attend key j: j <= i
    and key j is on the prompt or on the query's own completion. A padding query sees the
    prompt (it attends somewhere, so no kernel turns its row into NaN)."""
    s = segment.shape[1]
    cols = torch.arange(s, device=segment.device)
    causal = cols.unsqueeze(1) >= cols.unsqueeze(0)  # (S, S) query i, key j
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)  # (U, S, 1), (U, 1, S)
    allowed = causal & ((key == 0) | ((key == query) & (key > 0)))
    return allowed.unsqueeze(1)


def layer_costs(config) -> tuple[float, float]:
    """Multiply-adds per layer: per position through the linear layers, and per attention score
    (query-key product and value sum over every head)."""
    h, f = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or h // heads
    return float(h * d * (2 * heads + 2 * kv) + 3 * h * f), float(2 * heads * d)


def packing_pays(config, segment: torch.Tensor, prompt_width: int, width: int, rows: int) -> bool:
    """Whether the packed rows `segment` (U, S) cost at most the shared-prefix layout's
    estimated multiply-adds: U prompts of padded width P run once, then `rows` completions
    padded to width T, each attending to its prompt and itself. Never when the mask would hold
    more than MAX_MASK_ELEMENTS (the cache layout's mask is N x T x (P + T) at most)."""
    per_position, per_score = layer_costs(config)
    u, s = segment.shape
    if u * s * s > MAX_MASK_ELEMENTS:
        return False
    packed = per_position * int((segment >= 0).sum()) + per_score * u * s * s
    shared = per_position * (u * prompt_width + rows * width) + per_score * (
        u * prompt_width**2 + rows * width * (prompt_width + width)
    )
    return packed <= shared


def supports_packing(decoder: nn.Module) -> bool:
    """Every layer is full attention, run by an implementation that takes a custom 4D mask."""
    config = decoder.config.get_text_config(decoder=True)
    implementation = getattr(config, "_attn_implementation", None)
    return implementation in MASK_FORMATS and full_attention_only(decoder)


def packed_hidden(
    decoder: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    always: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """As `TokenScorer._completion_hidden`, with the rows of each distinct prompt packed into one
    row: input_ids (N, P + T) left-padded prompts then completions, completion_mask (N, T) ->
    hidden states (M, H) that predict the valid completion tokens, and those ids (M,). None
    when the path declines (module docstring) or, unless `always`, when `packing_pays` says
    the shared-prefix layout is cheaper."""
    width = completion_mask.shape[1]
    prompt_width = input_ids.shape[1] - width
    if width == 0 or prompt_width == 0 or not supports_packing(decoder):
        return None
    lengths = contiguous_lengths(completion_mask)
    prompt_ids, prompt_mask = input_ids[:, :prompt_width], attention_mask[:, :prompt_width]
    first, inverse = prompt_groups(prompt_ids, prompt_mask)
    if lengths is None or first.shape[0] == input_ids.shape[0]:
        return None
    prompt_lengths = prompt_mask[first].long().sum(1)
    layout = packed_layout(prompt_lengths.tolist(), lengths.tolist(), inverse.tolist())
    config = decoder.config.get_text_config(decoder=True)
    segment = layout["segment"].to(input_ids.device)
    if not always and not packing_pays(config, segment, prompt_width, width, len(lengths)):
        return None
    u, s = segment.shape
    ids = torch.full((u * s,), 0, dtype=input_ids.dtype, device=input_ids.device)
    for row, p in enumerate(first.tolist()):  # each prompt's real tokens at its row's start
        real = prompt_ids[p][prompt_mask[p].bool()]
        ids[row * s : row * s + real.shape[0]] = real
    completions = input_ids[:, prompt_width:]
    valid = completion_mask.bool()
    targets = completions[valid]  # (M,) row by row, as `token_at` lists them
    ids[layout["token_at"].to(ids.device)] = targets
    mask = packed_mask(segment)
    if config._attn_implementation == "eager":  # additive: 0 where allowed
        dtype = decoder.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    hidden = decoder(
        input_ids=ids.view(u, s),
        attention_mask=mask,
        position_ids=layout["positions"].to(ids.device),
        use_cache=False,
    ).last_hidden_state  # (U, S, H)
    flat = hidden.reshape(u * s, hidden.shape[-1])
    return flat.index_select(0, layout["predictor_at"].to(flat.device)), targets
