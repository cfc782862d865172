"""Sampling completions: batched, left-padded, KV-cached, with rlsd's own decoder (`decode.py`:
one prefill per prompt, finished rows leave the batch; on a static cache, optionally with CUDA
graphs: `decode_static.py`) or transformers' `generate`.

Completions are kept as token ids: teacher and student later score exactly these ids, appended to
their own prompts. A completion ends at its first stop token (included, so the model learns to
stop) or at `max_new_tokens`; what follows is padding with `completion_mask` False.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schema.config import RolloutConfig
from .decode import decode
from .decode_static import decode_static


@dataclass
class Batch:
    """Padded id tensors for one step; rows are grouped: G consecutive rows share a prompt.

    Two masks over the completion, never one: `completion_mask` marks the tokens the model
    sampled, the ones trained and credited (the loss mask of every loss, KL, Delta, multiplier
    and per-token statistic); `completion_attention` marks every real token the model attends
    to, its own and, in an agent's episode, the tool and environment text between its turns.
    None means they are the same tokens (a single completion)."""

    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P) True on real prompt tokens
    completion_ids: torch.Tensor  # (N, T) right-padded
    completion_mask: torch.Tensor  # (N, T) True on the tokens the model sampled (trained)
    completion_attention: torch.Tensor | None = None  # (N, T) every real token; None: the same

    @property
    def attention(self) -> torch.Tensor:
        """(N, T) every real completion token: what a forward pass runs and attends to."""
        return (
            self.completion_mask if self.completion_attention is None else self.completion_attention
        )

    def select(self, rows: torch.Tensor) -> Batch:
        """The batch restricted to the given row indices (or boolean row mask)."""
        attention = self.completion_attention
        return Batch(
            self.prompt_ids[rows],
            self.prompt_mask[rows],
            self.completion_ids[rows],
            self.completion_mask[rows],
            None if attention is None else attention[rows],
        )

    def cut(self, width: int) -> Batch:
        """The batch with its completions cut at `width` columns."""
        attention = self.completion_attention
        return Batch(
            self.prompt_ids,
            self.prompt_mask,
            self.completion_ids[:, :width],
            self.completion_mask[:, :width],
            None if attention is None else attention[:, :width],
        )


def concat_batches(batches: list[Batch], pad_id: int) -> Batch:
    """Batches of different widths stacked row-wise: prompts padded on the left to the widest,
    completions on the right (padding has mask False and id `pad_id`)."""
    p_width = max(b.prompt_ids.shape[1] for b in batches)
    c_width = max(b.completion_ids.shape[1] for b in batches)
    pad = torch.nn.functional.pad

    def left(x: torch.Tensor, value: int | bool) -> torch.Tensor:
        return pad(x, (p_width - x.shape[1], 0), value=value)

    def right(x: torch.Tensor, value: int | bool) -> torch.Tensor:
        return pad(x, (0, c_width - x.shape[1]), value=value)

    separate = any(b.completion_attention is not None for b in batches)
    return Batch(
        torch.cat([left(b.prompt_ids, pad_id) for b in batches]),
        torch.cat([left(b.prompt_mask, False) for b in batches]),
        torch.cat([right(b.completion_ids, pad_id) for b in batches]),
        torch.cat([right(b.completion_mask, False) for b in batches]),
        torch.cat([right(b.attention, False) for b in batches]) if separate else None,
    )


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids -> (ids, mask) tensors, padded on the left to the longest."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = True
    return ids, mask


def completion_mask_from(ids: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """True up to and including the first stop token of each row (all True if none)."""
    is_stop = torch.isin(ids, torch.tensor(stop_ids, device=ids.device))  # (N, T)
    stops_before = is_stop.long().cumsum(-1) - is_stop.long()  # stop tokens strictly before t
    return stops_before == 0


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    prompts: list[list[int]],
    cfg: RolloutConfig,
    pad_id: int,
    stop_ids: list[int],
    device: torch.device,
    greedy: bool = False,
) -> Batch:
    """Sample cfg.num_generations completions per prompt (one, decoded greedily, if `greedy`);
    returns the grouped, padded batch. `rollout.batch_size` caps the sequences decoded at once
    (whole groups at a time with the own decoder)."""
    group = 1 if greedy else cfg.num_generations
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    per_chunk = max((cfg.batch_size or len(prompts) * group) // group, 1)  # prompts at once
    outs = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), per_chunk):
        ids = prompt_ids[start : start + per_chunk].to(device)
        mask = prompt_mask[start : start + per_chunk].to(device)
        outs.append(generate_chunk(model, ids, mask, group, cfg, pad_id, stop_ids, greedy).cpu())
    model.train(was_training)
    width = max(o.shape[1] for o in outs)
    completion_ids = torch.cat(
        [torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad_id) for o in outs]
    )
    completion_mask = completion_mask_from(completion_ids, stop_ids)
    completion_ids = completion_ids.masked_fill(~completion_mask, pad_id)
    return Batch(
        prompt_ids.repeat_interleave(group, 0),
        prompt_mask.repeat_interleave(group, 0),
        completion_ids,
        completion_mask,
    )


def generate_chunk(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    group: int,
    cfg: RolloutConfig,
    pad_id: int,
    stop_ids: list[int],
    greedy: bool,
) -> torch.Tensor:
    """(B*group, T) completion ids for B prompts, with the configured decoder."""
    if cfg.decoder in ("own", "static", "graph"):
        sampler = (greedy, cfg.temperature, cfg.top_k, cfg.top_p)
        args = (model, ids, mask, group, cfg.max_new_tokens, stop_ids, pad_id, *sampler)
        if cfg.decoder == "own":
            return decode(*args)
        return decode_static(*args, graphs=cfg.decoder == "graph")
    sampling = (
        {} if greedy else {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k}
    )  # 0 = off (None would mean generate's 50)
    ids, mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask.long(),
        do_sample=not greedy,
        **sampling,
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=stop_ids,
    )
    return out[:, ids.shape[1] :]


def join(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[prompt ; completion] ids and attention mask (N, P + T) for scoring."""
    return (
        torch.cat([prompt_ids, completion_ids], 1),
        torch.cat([prompt_mask, completion_mask], 1).long(),
    )
