"""Agents' episodes on a model: the environments of `env` played by multi-turn decoding.

`build_environment(env_cfg)` turns the config's `env` section into an `EnvSetup` (the factory
that builds one environment per episode, the observations' chat role, the guard's timeout, the
tool box to close). `sample_episodes` plays G episodes for each of B records in one batch with
`episodes.decode_episodes` (turn by turn, from the KV cache): each row's `Respond` callback
decodes the model's turn to text, steps the row's environment through the guard (`guard.py`:
a failure ends that episode with a counted error, never the run) and renders the observation as
the chat template would (`chat.ChatFrame`). What comes back, an `EpisodeRollout`, holds the
`Batch` the trainer scores (prompt = the rendered first messages of `reset`; completion = the
trajectory; `completion_mask` = the tokens the model sampled, trained; `completion_attention` =
every real token, the environment's included), each episode's final answer (its last model
turn, for the verifiers), the environment's summed rewards, turns, truncation, errors and the
step's `env/*` metrics.

Rewards (`episode_rewards`): an episode's reward is the verifiers' reward of its final answer
plus `env.reward_weight` times the environment's summed reward; an episode that ran out of
turns or tokens (truncated) gets `env.truncated_reward` instead, since it gave no final answer.
An episode whose environment failed is scored like any other (its error is counted and logged
once per call, with its record, and kept in `errors` for the trainer).

Prompts: the G episodes of a record share one prefill when their environments' first messages
are equal (the usual case); when some differ (a `reset` that draws at random), every row gets
its own prompt (one prefill per row). An episode whose environment could not start is decoded
after a sibling's first message (or the record's prompt, when none started) and ends after
its first turn with the error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...schema.sections_env import EnvConfig
from ..episodes import decode_episodes
from ..rollout import Batch, left_pad
from .chat import ChatFrame, tool_stop_ids
from .episode import Episode
from .guard import describe, failed, guarded_step, open_episode, tally
from .protocol import EnvFactory, StepResult, load_environment

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the setup


@dataclass(frozen=True)
class EnvSetup:
    """What a run builds once from its `env` section."""

    name: str  # the environment, for messages (a built-in's name, a spec, or "tools")
    factory: EnvFactory  # builds one environment per episode
    role: str  # the observations' chat role
    timeout: float | None  # each reset / step call's limit (None: rlsd's own tool environment)
    toolbox: Any = None  # the ToolBox of the tools' workers (closed by `close`), or None

    def close(self) -> None:
        """Stop the tools' worker processes (if any)."""
        if self.toolbox is not None:
            self.toolbox.close()


def build_environment(env: EnvConfig) -> EnvSetup | None:
    """The run's environment from its `env` section (None: no environment, a single-turn run).
    A spec or a tool that cannot be loaded raises ConfigError naming its field."""
    from .tools import ToolBox, load_tools, tool_environment

    if not env.active:
        return None
    if env.environment and ":" in env.environment:  # a user's class: their code, guarded
        role = "user" if env.observation_role == "auto" else env.observation_role
        factory = load_environment(env.environment)
        return EnvSetup(env.environment, factory, role, env.step_timeout)
    if env.environment == "calculator":
        from .calculator import TOOLS

        name, tools = "calculator", list(TOOLS)
    else:
        name, tools = "tools", load_tools(env.tools)
    box = ToolBox(tools, timeout=env.tool_timeout, output_limit=env.tool_output_limit)
    role = "tool" if env.observation_role == "auto" else env.observation_role
    return EnvSetup(name, tool_environment(box, env.max_turns), role, None, box)


# ----------------------------------------------------------------------------- one episode


@dataclass
class Conversation:
    """One episode's environment and what it has said, behind the row's `Respond` callback."""

    env: Any  # None when it could not be built or reset
    frame: ChatFrame
    end_ids: set[int]  # the tokens that end a model turn (stripped from its text)
    timeout: float | None
    results: list[StepResult]  # the reset's first
    messages: list[dict[str, str]] = field(default_factory=list)  # the chat, for logs and SFT

    def respond(self, turn: list[int]) -> tuple[list[int] | None, bool]:
        """The environment's reply to a model turn, as ids, and whether the episode is done.
        Never raises (`decode_episodes`' contract): a failure here ends the episode, counted."""
        try:
            text = self.frame.turn_text(turn, self.end_ids)
            self.messages.append({"role": "assistant", "content": text})
            if self.env is None:  # could not start: the error is already in results
                return None, True
            result = guarded_step(self.env, text, self.timeout)
            self.results.append(result)
            if result.done:
                return None, True
            reply = self.frame.reply_ids(turn, self.end_ids, result.observation)
            if result.observation is not None:
                self.messages.append({"role": self.frame.role, "content": result.observation})
            return reply, False
        except Exception as exc:  # (the tokenizer on odd text: the episode ends, counted)
            self.results.append(failed(f"rendering the reply raised {describe(exc)}"))
            return None, True

    def played(self) -> Episode:
        """The episode as `run_episode` gives one (its final answer, reward and error)."""
        return Episode(tuple(self.messages), tuple(self.results), truncated=False)


def open_conversations(
    setup: EnvSetup, records: Sequence[Any], group: int, frame: ChatFrame, end_ids: set[int]
) -> tuple[list[Conversation], list[str]]:
    """One started conversation per row (r = b * group + g) and each row's first message."""
    conversations, firsts = [], []
    for record in records:
        opened = [open_episode(setup.factory, record, setup.timeout) for _ in range(group)]
        started = [o.result.observation for o in opened if o.env is not None]
        fallback = started[0] if started else str(getattr(record, "prompt", ""))
        for o in opened:
            first = o.result.observation if o.env is not None else fallback
            chat = Conversation(o.env, frame, end_ids, setup.timeout, [o.result])
            chat.messages = frame.messages(first)
            conversations.append(chat)
            firsts.append(first)
    return conversations, firsts


# ----------------------------------------------------------------------------- the batch


@dataclass(frozen=True)
class EpisodeRollout:
    """A step's episodes: N = B*G rows grouped by record (G consecutive rows share one)."""

    batch: Batch  # prompt and trajectory ids, completion_mask (model) and attention (all)
    finals: tuple[str, ...]  # each episode's last model turn (what the verifiers score)
    env_rewards: tuple[float, ...]  # each episode's summed environment reward
    turns: tuple[int, ...]  # model turns taken
    truncated: tuple[bool, ...]  # ran out of turns or tokens
    errors: tuple[str | None, ...]  # the failure that ended the episode, if one did
    messages: tuple[tuple[dict[str, str], ...], ...]  # each episode's chat (shown turns only)
    metrics: dict[str, float]  # env/turns_mean, env/truncated_frac, env/errors, env/tool_*


def sample_episodes(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Any],
    setup: EnvSetup,
    group: int,
    env: EnvConfig,
    *,
    stop_ids: list[int],
    pad_id: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    system_prompt: str = "",
) -> EpisodeRollout:
    """Play `group` episodes of `setup`'s environment on each record with `model` (see the
    module docstring); `stop_ids` end a model turn (with `</tool_call>` when it is one token).
    The model is put in eval mode for the call and given back in its mode. On the CPU."""
    frame = ChatFrame.of(tokenizer, setup.role, system_prompt)
    end_ids = set(stop_ids)
    chats, firsts = open_conversations(setup, records, group, frame, end_ids)
    shared = all(len(set(firsts[b * group : (b + 1) * group])) == 1 for b in range(len(records)))
    per_prompt = group if shared else 1
    prompts = [frame.prompt_ids(first) for first in firsts[::per_prompt]]
    was_training = model.training
    model.eval()
    try:
        episodes = decode_episodes(
            model,
            prompts,
            per_prompt,
            [chat.respond for chat in chats],
            max_turn_tokens=env.max_turn_tokens,
            max_tokens=env.max_tokens,
            max_turns=env.max_turns,
            stop_ids=sorted(end_ids | set(tool_stop_ids(tokenizer))),
            pad_id=pad_id,
            greedy=greedy,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )
    finally:
        model.train(was_training)
    rows = [p for p in prompts for _ in range(per_prompt)]
    prompt_ids, prompt_mask = left_pad(rows, pad_id)  # (N, P)
    batch = Batch(prompt_ids, prompt_mask, episodes.ids, episodes.model_mask, episodes.attention)
    truncated = tuple(
        bool(cut) or any(r.info.get("truncated") for r in chat.results)
        for cut, chat in zip(episodes.truncated.tolist(), chats)
    )
    played = [chat.played() for chat in chats]
    report_errors(setup, records, played, group)
    return EpisodeRollout(
        batch=batch,
        finals=tuple(episode.final for episode in played),
        env_rewards=tuple(episode.reward for episode in played),
        turns=tuple(episodes.turns.tolist()),
        truncated=truncated,
        errors=tuple(episode.error for episode in played),
        messages=tuple(tuple(shown(chat.messages)) for chat in chats),
        metrics=episode_metrics(chats, episodes.turns.tolist(), truncated),
    )


def shown(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The chat as the model saw it: an observation after the last model turn was never shown
    (the episode was cut before its reply fitted)."""
    end = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return messages[: end + 1] if end >= 0 else messages


def episode_metrics(
    chats: Sequence[Conversation], turns: Sequence[int], truncated: Sequence[bool]
) -> dict[str, float]:
    """The step's `env/*` metrics: turns per episode, the truncated fraction, and the guard's
    counts over every result (errors, tool calls, tool errors, tool time-outs)."""
    counts = tally(r for chat in chats for r in chat.results)
    counts.pop("env/truncated")  # (the fraction below counts the decoder's cuts too)
    n = max(len(chats), 1)
    return {"env/turns_mean": sum(turns) / n, "env/truncated_frac": sum(truncated) / n, **counts}


def report_errors(
    setup: EnvSetup, records: Sequence[Any], played: Sequence[Episode], group: int
) -> None:
    """Log a call's environment failures once: how many, and the first with its record."""
    failing = [(row, episode.error) for row, episode in enumerate(played) if episode.error]
    if not failing:
        return
    row, error = failing[0]
    prompt = str(getattr(records[row // group], "prompt", ""))[:80]
    log.warning(
        "env %s: %d of %d episodes ended on an error; the first (record %r): %s",
        setup.name,
        len(failing),
        len(played),
        prompt,
        error,
    )


def episode_rewards(
    verifier_rewards: Sequence[float], rollout: EpisodeRollout, env: EnvConfig
) -> list[float]:
    """Each episode's scalar reward for the group advantage: the verifiers' reward of its final
    answer plus env.reward_weight x the environment's reward; env.truncated_reward for an
    episode that was truncated."""
    if len(verifier_rewards) != len(rollout.finals):
        raise ValueError(
            f"{len(verifier_rewards)} verifier rewards for {len(rollout.finals)} episodes"
        )
    return [
        env.truncated_reward if cut else float(score) + env.reward_weight * own
        for score, own, cut in zip(verifier_rewards, rollout.env_rewards, rollout.truncated)
    ]
