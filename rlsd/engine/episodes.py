"""Multi-turn decoding from the KV cache: episodes of model turns and environment replies.

An episode is a prompt, then model turns and environment replies in turn. The model's turn ends
at a stop token (included in the turn) or after `max_turn_tokens` tokens; the row's callback
takes the turn's token ids and answers with the environment's reply, already rendered as token
ids (say, the chat template's tool message and the header of the next assistant turn), and
whether the episode is done. The reply is run through the model **from the row's own KV cache**:
one forward of the reply's tokens, never a re-prefill of the episode from its start, so an
episode costs about what one completion of the same total length costs.

The loop is `decode.py`'s: one prefill per prompt shared by its G rows, then one forward a step
for the rows still going, finished rows dropping out of the batch and its cache. A step feeds
each row what it has not yet run: its last sampled token, plus the reply after a turn. Rows fed
replies of different lengths in one step are left-padded to the longest inside that forward, so
the others' cache rows hold masked gaps (as left-padded prompts do): the attention mask hides
them and the positions are explicit, so they change no logit. Sampling is `decode`'s
(`next_tokens`: temperature, top-k, top-p, one uniform draw per row).

Limits, each a documented end:
- `max_turn_tokens` ends a turn (the environment still answers it, as it answers a stop);
- `max_turns`: an episode whose environment is not done after that many turns is truncated;
- `max_tokens` counts everything after the prompt (model and environment tokens): an episode
  whose next model token would pass it is truncated (the environment does not see the cut
  turn), and a reply that does not fit whole with room for one more model token is dropped and
  the episode truncated.

The result keeps two masks, never one: `attention` (every real token, model and environment:
what the model attends to) and `model_mask` (only the tokens the model sampled: what is trained
and credited).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .decode import cache_keyword, next_tokens
from .rollout import left_pad

# A row's environment: the model's turn (token ids) -> (the reply's token ids or None, done).
Respond = Callable[[list[int]], tuple[list[int] | None, bool]]


@dataclass(frozen=True)
class Episodes:
    """What `decode_episodes` returns: N = B*G rows, grouped by prompt (G consecutive rows share
    one), each the trajectory after its prompt, on the CPU."""

    ids: torch.Tensor  # (N, T) model and environment tokens, right-padded with pad_id
    attention: torch.Tensor  # (N, T) bool: every real token (model and environment)
    model_mask: torch.Tensor  # (N, T) bool: the tokens the model sampled (the loss mask)
    turns: torch.Tensor  # (N,) long: the model turns each episode took
    truncated: torch.Tensor  # (N,) bool: ran out of turns or tokens before the env was done


@dataclass(frozen=True)
class Limits:
    """The three limits of an episode (see the module's docstring)."""

    max_turn_tokens: int  # model tokens in one turn
    max_tokens: int  # all tokens after the prompt, model and environment
    max_turns: int  # model turns


@dataclass
class Episode:
    """One row's trajectory so far, in plain lists: the loop's bookkeeping, and where the rules
    that end a turn or an episode live."""

    respond: Respond
    row: int  # the output row, for messages
    ids: list[int] = field(default_factory=list)  # everything after the prompt
    sampled: list[bool] = field(default_factory=list)  # True where the model sampled the id
    turn: list[int] = field(default_factory=list)  # the current turn's ids
    turns: int = 0
    truncated: bool = False

    def take(self, token: int, stops: set[int], limits: Limits) -> list[int] | None:
        """Append a sampled token; returns the ids the model must run next (the token, plus the
        environment's reply when the turn ended), or None when the episode is over."""
        self.ids.append(token)
        self.sampled.append(True)
        self.turn.append(token)
        if token not in stops and len(self.turn) < limits.max_turn_tokens:
            if len(self.ids) >= limits.max_tokens:
                self.truncated = True
                return None
            return [token]
        self.turns += 1
        reply, done = self.ask()
        if done:
            return None
        if self.turns >= limits.max_turns or len(self.ids) + len(reply) >= limits.max_tokens:
            self.truncated = True
            return None
        self.ids += reply
        self.sampled += [False] * len(reply)
        return [token, *reply]

    def ask(self) -> tuple[list[int], bool]:
        """The environment's answer to the turn just ended, checked: (reply ids, done)."""
        answer = self.respond(list(self.turn))
        self.turn = []
        if not (isinstance(answer, tuple) and len(answer) == 2):
            raise TypeError(f"respond[{self.row}] returned {answer!r}: expected (ids, done)")
        reply, done = answer
        try:
            return [operator.index(t) for t in reply or ()], bool(done)
        except TypeError:
            raise TypeError(f"respond[{self.row}] returned non-integer ids: {reply!r}") from None


@torch.no_grad()
def decode_episodes(
    model: torch.nn.Module,
    prompts: list[list[int]],
    group: int,
    respond: Sequence[Respond],
    *,
    max_turn_tokens: int,
    max_tokens: int,
    max_turns: int,
    stop_ids: list[int],
    pad_id: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Episodes:
    """Run `group` episodes for each of the B prompts (token id lists), turn by turn in one
    batch: `respond[r]` is row r's environment (rows grouped by prompt: r = b * group + g),
    called after each of its model's turns; it must not raise (the environment layer turns an
    environment's failure into `(None, True)` and counts it). The caller sets the model's mode
    (eval, as `sample_completions` does). Returns the trajectories and their two masks."""
    limits = Limits(max_turn_tokens, max_tokens, max_turns)
    check(prompts, group, respond, limits)
    device = next(model.parameters()).device
    episodes = [Episode(fn, row) for row, fn in enumerate(respond)]
    stops = set(stop_ids)
    forward = Forward(model, pad_id, device)
    logits, attention, position = forward.prefill(prompts, group)
    alive = list(range(len(episodes)))  # the output row of each batch row
    while True:
        chosen = next_tokens(logits, greedy, temperature, top_k, top_p).tolist()
        fed = [episodes[row].take(t, stops, limits) for row, t in zip(alive, chosen, strict=True)]
        keep = [i for i, ids in enumerate(fed) if ids is not None]
        if not keep:
            break
        if len(keep) < len(alive):
            index = torch.tensor(keep, device=device)
            forward.cache.batch_select_indices(index)
            attention, position = attention[index], position[index]
            alive, fed = [alive[i] for i in keep], [fed[i] for i in keep]
        logits, attention, position = forward.extend(fed, attention, position)
    return collect(episodes, pad_id)


def check(prompts: list[list[int]], group: int, respond: Sequence[Respond], limits: Limits):
    """Refuse arguments the loop cannot run with, naming the one at fault."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("decode_episodes needs at least one prompt, each of one token or more")
    if group < 1:
        raise ValueError(f"group must be 1 or more, not {group}")
    if len(respond) != len(prompts) * group:
        raise ValueError(
            f"respond holds {len(respond)} callbacks: one per row is "
            f"{len(prompts)} prompts x {group} = {len(prompts) * group}"
        )
    for name, value in vars(limits).items():
        if value < 1:
            raise ValueError(f"{name} must be 1 or more, not {value}")


class Forward:
    """The model and its KV cache for one call of `decode_episodes`."""

    def __init__(self, model: torch.nn.Module, pad_id: int, device: torch.device):
        from transformers import DynamicCache

        self.model, self.pad_id, self.device = model, pad_id, device
        self.cache = DynamicCache(config=model.config)
        self.with_cache = {cache_keyword(model): self.cache, "use_cache": True, "logits_to_keep": 1}

    def prefill(self, prompts: list[list[int]], group: int):
        """Run the B prompts once, left-padded, and repeat their cache for the G rows of each:
        returns the rows' (N, V) next-token logits, (N, P) attention and (N, 1) next position."""
        ids, mask = left_pad(prompts, self.pad_id)  # (B, P)
        ids, mask = ids.to(self.device), mask.to(self.device).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, **self.with_cache
        )
        if group > 1:
            self.cache.batch_repeat_interleave(group)
        logits = out.logits[:, -1].repeat_interleave(group, 0)  # (N, V)
        position = positions[:, -1:].repeat_interleave(group, 0) + 1  # (N, 1)
        return logits, mask.repeat_interleave(group, 0), position

    def extend(self, fed: list[list[int]], attention: torch.Tensor, position: torch.Tensor):
        """Run each live row's new ids (its last token, plus a reply after a turn) from the
        cache, left-padded to the longest: returns the next (n, V) logits, the (n, S + W)
        attention and the (n, 1) next positions."""
        if all(len(ids) == 1 for ids in fed):  # mid-turn for every row: the common step
            ids = torch.tensor(fed, device=self.device)  # (n, 1)
            new = torch.ones_like(ids)
        else:
            ids, mask = left_pad(fed, self.pad_id)  # (n, W)
            ids, new = ids.to(self.device), mask.to(self.device).long()
        positions = position + (new.cumsum(-1) - 1).clamp(min=0)  # (n, W)
        attention = torch.cat([attention, new], 1)  # (n, S + W)
        out = self.model(
            input_ids=ids, attention_mask=attention, position_ids=positions, **self.with_cache
        )
        return out.logits[:, -1], attention, position + new.sum(-1, keepdim=True)


def collect(episodes: list[Episode], pad_id: int) -> Episodes:
    """The finished rows as one right-padded record."""
    width = max(len(e.ids) for e in episodes)
    ids = torch.full((len(episodes), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(episodes), width), dtype=torch.bool)
    model_mask = torch.zeros((len(episodes), width), dtype=torch.bool)
    for row, episode in enumerate(episodes):
        length = len(episode.ids)
        ids[row, :length] = torch.tensor(episode.ids, dtype=torch.long)
        attention[row, :length] = True
        model_mask[row, :length] = torch.tensor(episode.sampled, dtype=torch.bool)
    return Episodes(
        ids=ids,
        attention=attention,
        model_mask=model_mask,
        turns=torch.tensor([e.turns for e in episodes], dtype=torch.long),
        truncated=torch.tensor([e.truncated for e in episodes], dtype=torch.bool),
    )
