"""The teacher: who scores the student's sampled ids, and with which weights.

Modes (`teacher.mode`):
- `live`: the current policy, shown the privileged context. No extra memory; Delta then measures
  only what the privileged context changes. The reference code's default.
- `frozen`: the initial policy. With LoRA it is the base model with the adapter disabled (no
  copy, no memory); with full fine-tuning a frozen copy of the initial weights is kept.
- `sync`: a frozen snapshot of the policy, refreshed every `sync_every` steps (at steps 1,
  1 + N, 1 + 2N, ...). With LoRA the snapshot is a second copy of the adapter weights, swapped in
  for scoring; with full fine-tuning, a model copy whose weights are overwritten at each refresh.
- `external`: another model (OPD), with the same tokenizer, on the student's plain prompt.

Under FSDP2 (`train.sharding: fsdp`) a model copy and the external model come sharded like the
policy and gathered with it (`sharding.py`).

It scores without autograd. Every method needs the log-probs of the sampled tokens; the exact
divergences of the distillation methods (`opsd.divergence` full or topk) also need the teacher's
distribution at each position (its whole vocabulary, or its top k tokens): `logprobs` returns
both in one `TeacherScores`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .logprobs import TokenScorer
from .rollout import join
from .sharding import distributed_like, is_sharded, refresh_copy, whole


@dataclass
class TeacherScores:
    """What a teacher pass returns for N completions of at most T tokens."""

    logps: torch.Tensor  # (N, T) log-probs of the sampled completion ids
    support_vals: torch.Tensor | None = None  # (N, T, V) or (N, T, k): its distribution
    support_ids: torch.Tensor | None = None  # (N, T, k) the top-k token ids (None: all V)


class Teacher:
    def __init__(
        self,
        mode: str,
        scorer: TokenScorer,
        lora: bool,
        batch_size: int,
        sync_every: int = 0,
        external: TokenScorer | None = None,
        model_copy: TokenScorer | None = None,
    ):
        self.mode, self.lora, self.batch_size = mode, lora, batch_size
        self.scorer, self.sync_every, self.external = scorer, sync_every, external
        self.copy: TokenScorer | None = None  # full fine-tuning: frozen / sync model copy
        self.snapshot: dict[str, torch.Tensor] | None = None  # LoRA sync: adapter copy
        self.synced_at = 0
        if mode in ("frozen", "sync") and not lora:  # FSDP2 passes its sharded copy
            self.copy = model_copy
            if model_copy is None:
                lm = copy.deepcopy(scorer.lm).eval().requires_grad_(False)
                self.copy = TokenScorer(lm, scorer.temperature, scorer.chunk_rows)

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.scorer.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def maybe_sync(self, step: int) -> bool:
        """In sync mode, refresh the snapshot at steps 1, 1 + N, ...; True when it refreshed."""
        if self.mode != "sync" or (step - 1) % self.sync_every:
            return False
        if self.lora:
            self.snapshot = {n: p.detach().clone() for n, p in self._trainable().items()}
        elif is_sharded(self.copy):
            refresh_copy(self.copy, self.scorer)
        else:
            for target, source in zip(self.copy.parameters(), self.scorer.parameters()):
                target.copy_(source)
        self.synced_at = step
        return True

    def state(self) -> tuple[int, dict[str, torch.Tensor] | None]:
        """What a checkpoint must keep: the sync step and the snapshot (adapter or model copy;
        a sharded copy is gathered whole, so every process must call this)."""
        if self.mode != "sync":
            return self.synced_at, None
        if self.lora:
            return self.synced_at, self.snapshot
        return self.synced_at, {n: whole(p) for n, p in self.copy.named_parameters()}

    @torch.no_grad()
    def load_state(self, synced_at: int, tensors: dict[str, torch.Tensor] | None) -> None:
        self.synced_at = synced_at
        if self.mode != "sync" or tensors is None:
            return
        if self.lora:
            self.snapshot = {n: tensors[n].to(p.device) for n, p in self._trainable().items()}
        else:
            for n, p in self.copy.named_parameters():
                p.copy_(distributed_like(tensors[n], p))

    @contextlib.contextmanager
    def _swapped_in(self) -> Iterator[None]:
        """Temporarily load the LoRA snapshot into the policy's adapter weights."""
        params = self._trainable()
        current = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.snapshot[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(current[n])

    @contextlib.contextmanager
    def _weights(self) -> Iterator[TokenScorer]:
        if self.mode == "external":
            yield self.external
        elif self.mode == "frozen" and self.lora:
            with self.scorer.lm.disable_adapter():
                yield self.scorer
        elif self.mode == "sync" and self.lora:
            with self._swapped_in():
                yield self.scorer
        else:
            yield self.copy or self.scorer

    @torch.no_grad()
    def logprobs(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        device: torch.device,
        topk: int | None = None,
        share_prefix: bool = False,
    ) -> TeacherScores:
        """Teacher log-probs (N, T) of the completion ids after the teacher's own prompts.

        With `topk` (0 = the whole vocabulary) also the teacher's distribution at every
        completion position: values (N, T, k or V) and ids (N, T, k) or None. With
        `share_prefix`, the rows of a pass whose teacher prompts are identical run that
        prompt once (`rlsd/engine/prefix.py`).
        """
        outs = []
        with self._weights() as scorer:
            was_training = scorer.training
            scorer.eval()
            for s in range(0, completion_ids.shape[0], self.batch_size):
                rows = slice(s, s + self.batch_size)
                p_ids, p_mask = trim_left(prompt_ids[rows], prompt_mask[rows])
                c_ids, c_mask = completion_ids[rows], completion_mask[rows]
                if topk is None:  # distributions keep every column: no zeros made up for pads
                    c_ids, c_mask = trim_right(c_ids, c_mask)
                ids, mask = join(p_ids, p_mask, c_ids, c_mask)
                args = (ids.to(device), mask.to(device), c_mask.to(device))
                width = completion_ids.shape[1]
                part = [widen(scorer(*args, share_prefix=share_prefix).cpu(), width)]
                if topk is not None:
                    dist = scorer.support(*args, topk, share_prefix=share_prefix)
                    part += [None if x is None else x.cpu() for x in dist]
                outs.append(part)
            scorer.train(was_training)
        logps = torch.cat([o[0] for o in outs])
        if topk is None:
            return TeacherScores(logps)
        vals = torch.cat([o[1] for o in outs])
        ids = None if outs[0][2] is None else torch.cat([o[2] for o in outs])
        return TeacherScores(logps, vals, ids)


def trim_left(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row of a left-padded slice."""
    keep = int(mask.sum(1).max().item())
    return ids[:, ids.shape[1] - keep :], mask[:, mask.shape[1] - keep :]


def trim_right(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row of a right-padded slice (completions:
    a pass runs only as far as its longest completion; at least one column is kept)."""
    keep = used_width(mask)
    return ids[:, :keep], mask[:, :keep]


def used_width(mask: torch.Tensor) -> int:
    """Columns of a right-padded (n, T) mask up to its longest row (at least 1)."""
    return max(int(mask.sum(1).max().item()) if mask.shape[0] else 0, 1)


def widen(x: torch.Tensor, width: int) -> torch.Tensor:
    """(n, w, ...) -> (n, width, ...), zeros after column w: a trimmed pass's per-token values
    (0 at padding, as the scorer gives them) back at the batch's width."""
    if x.shape[1] == width:
        return x
    out = x.new_zeros((x.shape[0], width, *x.shape[2:]))
    out[:, : x.shape[1]] = x
    return out
