"""Per-token log-probabilities of given completion ids, without a full (N, T, V) log-softmax.

log P(y_t) = z_t[y_t] - logsumexp(z_t), with z_t = lm_head(h_t) / temperature. The backbone runs
once over [prompt ; completion]; the vocabulary projection runs only on the hidden states that
predict real completion tokens (padding and prompt positions are skipped), a chunk of rows at a
time. Under autograd each chunk is checkpointed, so its (rows, V) logits are recomputed in the
backward pass instead of being kept: peak memory is one chunk of logits, not the whole batch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..algorithms.distill import token_divergence
from .models import base_model
from .packing import packed_hidden
from .prefix import shared_prefix_hidden


def _logits(
    hidden: torch.Tensor, weight: torch.Tensor, scale: float, softcap: float
) -> torch.Tensor:
    logits = F.linear(hidden, weight).float() * scale  # (rows, V)
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def _chunk_logps(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float, softcap: float
) -> torch.Tensor:
    logp = torch.log_softmax(_logits(hidden, weight, scale, softcap), dim=-1)  # one fused pass
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (rows,)


def _chunk_logps_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scale: float,
    softcap: float,
    t_vals: torch.Tensor,
    t_ids: torch.Tensor | None,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(_logits(hidden, weight, scale, softcap), dim=-1)  # (rows, V)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked, token_divergence(logp, t_vals, t_ids, reverse)


def gather_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int = 256,
    scale: float = 1.0,
    softcap: float = 0.0,
    teacher: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    reverse: bool = True,
):
    """hidden (M, H), lm-head weight (V, H), targets (M,) -> log-probs (M,) in float32.

    With `teacher` = (values (M, k), ids (M, k) or None), also the per-token KL to it (M,).
    """
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    picked, kls = [], []
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        args = (hidden[rows], weight, targets[rows], scale, softcap)
        if teacher is not None:
            t_ids = None if teacher[1] is None else teacher[1][rows]
            args = (*args, teacher[0][rows], t_ids, reverse)
        fn = _chunk_logps if teacher is None else _chunk_logps_kl
        out = checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args)
        picked.append(out if teacher is None else out[0])
        kls.append(None if teacher is None else out[1])
    empty = hidden.new_zeros(0, dtype=torch.float32)
    logps = torch.cat(picked) if picked else empty
    return logps if teacher is None else (logps, torch.cat(kls) if kls else empty)


@torch.no_grad()
def support_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    topk: int,
    chunk_rows: int = 256,
    scale: float = 1.0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs over the whole vocabulary (topk = 0: (M, V), ids None) or the top-k tokens'
    log-probs and ids ((M, k) each), chunked."""
    vals, ids = [], []
    for start in range(0, hidden.shape[0], chunk_rows):
        logp = torch.log_softmax(
            _logits(hidden[start : start + chunk_rows], weight, scale, softcap), dim=-1
        )
        if topk:
            top = logp.topk(topk, dim=-1)
            vals.append(top.values)
            ids.append(top.indices)
        else:
            vals.append(logp)
    return torch.cat(vals), (torch.cat(ids) if topk else None)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: cumulative sum of the mask minus 1 (pads at 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pads_to_the_right(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column orders (N, L) that move each row's left padding to its end, and back.

    A left-padded row's padding positions attend to no key at all. Their outputs are unused,
    but some attention kernels' backward turns such fully masked rows into NaN gradients for
    every weight (benchmarks/results/study-gpu/NOTE.md: on an H200 in bf16, 14 of the 30
    steps whose completions were 7 or 8 tokens, making 64-token-wide micro-batches, had a NaN
    gradient, and none of 192 others). With the padding at the end, every position attends
    to at least the row's first token."""
    width = attention_mask.shape[1]
    shift = (attention_mask.long().cumsum(-1) == 0).sum(-1, keepdim=True)  # leading pads
    cols = torch.arange(width, device=attention_mask.device)
    return (cols + shift) % width, (cols - shift) % width


class TokenScorer(nn.Module):
    """Wraps a causal LM (plain or peft) so one forward returns completion log-probs.

    A module, not a function, so that a distributed wrapper (DDP via accelerate) sees the
    forward pass that produces the loss.

    `layout` says how rows that share a prompt run it once under `share_prefix`: "auto" packs
    them behind it (`rlsd/engine/packing.py`) when that is estimated cheaper and else runs their
    padded completions against its cached keys and values (`rlsd/engine/prefix.py`); "packed" and
    "cache" force one of the two (where it applies; benchmarks and tests set them).
    """

    layout = "auto"

    def __init__(self, lm: nn.Module, temperature: float = 1.0, chunk_rows: int = 256):
        super().__init__()
        self.lm = lm
        self.temperature = temperature
        self.chunk_rows = chunk_rows

    def _parts(self) -> tuple[nn.Module, nn.Module, float]:
        base = base_model(self.lm)
        softcap = float(getattr(base.config, "final_logit_softcapping", None) or 0.0)
        return base.get_decoder(), base.get_output_embeddings(), softcap

    def _cache_allowed(self) -> bool:
        """Whether the prompt may run as a separate pass whose keys and values the completions
        reuse (`rlsd/engine/prefix.py`)."""
        return True

    def _completion_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_mask: torch.Tensor,
        share_prefix: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (M, H) that predict the valid completion tokens, and those ids (M,).
        With `share_prefix`, rows with the same prompt run it once (`layout`)."""
        decoder = self._parts()[0]
        if share_prefix and self.layout != "cache":
            args = (decoder, input_ids, attention_mask, completion_mask)
            packed = packed_hidden(*args, always=self.layout == "packed")
            if packed is not None:
                return packed
        if share_prefix and self.layout != "packed" and self._cache_allowed():
            shared = shared_prefix_hidden(decoder, input_ids, attention_mask, completion_mask)
            if shared is not None:
                return shared
        prompt_width = input_ids.shape[1] - completion_mask.shape[1]
        order, undo = pads_to_the_right(attention_mask)
        mask = attention_mask.gather(1, order)
        hidden = decoder(
            input_ids=input_ids.gather(1, order),
            attention_mask=mask,
            position_ids=position_ids_for(mask),
            use_cache=False,
        ).last_hidden_state  # (N, P + T, H), pads last
        hidden = hidden.gather(1, undo.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        predicting = hidden[:, prompt_width - 1 : -1]  # (N, T, H): position t predicts token t
        valid = completion_mask.bool()
        return predicting[valid], input_ids[:, prompt_width:][valid]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_mask: torch.Tensor,
        teacher: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        reverse: bool = True,
        share_prefix: bool = False,
    ):
        """input_ids (N, P + T): left-padded prompt, then completion ids whose validity is
        completion_mask (N, T). Returns log-probs (N, T) of the completion ids, 0 where masked.

        With `teacher` = (values (N, T, k), ids (N, T, k) or None) from `support`, also returns
        the per-token KL (N, T) between this model and that teacher distribution. With
        `share_prefix`, the rows that share a prompt run it once (same values).
        """
        _, head, softcap = self._parts()
        hidden, targets = self._completion_hidden(
            input_ids, attention_mask, completion_mask, share_prefix
        )
        valid = completion_mask.bool()
        flat = None
        if teacher is not None:
            flat = (teacher[0][valid], None if teacher[1] is None else teacher[1][valid])
        result = gather_logprobs(
            hidden,
            head.weight,
            targets,
            self.chunk_rows,
            1.0 / self.temperature,
            softcap,
            flat,
            reverse,
        )

        def unflatten(values: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(completion_mask.shape, dtype=torch.float32, device=hidden.device)
            return out.masked_scatter(valid, values)

        if teacher is None:
            return unflatten(result)
        return unflatten(result[0]), unflatten(result[1])

    @torch.no_grad()
    def support(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_mask: torch.Tensor,
        topk: int,
        share_prefix: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per completion position, log-probs over the vocabulary (topk = 0: (N, T, V)) or the
        top-k (values and ids, (N, T, k) each); zeros at masked positions."""
        _, head, softcap = self._parts()
        hidden, _ = self._completion_hidden(
            input_ids, attention_mask, completion_mask, share_prefix
        )
        vals, ids = support_logprobs(
            hidden, head.weight, topk, self.chunk_rows, 1.0 / self.temperature, softcap
        )
        valid = completion_mask.bool()
        full_vals = vals.new_zeros(*completion_mask.shape, vals.shape[-1])
        full_vals[valid] = vals
        if ids is None:
            return full_vals, None
        full_ids = ids.new_zeros(*completion_mask.shape, ids.shape[-1])
        full_ids[valid] = ids
        return full_vals, full_ids


def naive_logprobs(
    lm: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Reference: full logits, full log-softmax, gather. Used by tests and benchmarks."""
    width = completion_mask.shape[1]
    logits = lm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
    ).logits.float()
    logp = torch.log_softmax(logits[:, -width - 1 : -1] / temperature, dim=-1)
    picked = logp.gather(-1, input_ids[:, -width:].unsqueeze(-1)).squeeze(-1)
    return picked * completion_mask
