"""One episode played out turn by turn with a policy written in Python, as chat messages.

`run_episode` is the reference loop (the batched rollout on a model is wired later, and must
agree with it): open the environment on a record (guarded), then, until it is done or
`max_turns` model turns have been taken, ask the policy for the next assistant turn given the
messages so far and step the environment with it (guarded). It serves the expert episodes of
the built-in environments (`rlsd sft` data), the tests, and any scripted check of an
environment a user writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .guard import guarded_step, open_episode
from .protocol import EnvFactory, StepResult

Policy = Callable[[list[dict[str, str]]], str]  # the messages so far -> the next assistant turn


@dataclass(frozen=True)
class Episode:
    """A played episode: its chat messages (the first user message, then assistant turns and
    the observations in `observation_role` messages), every StepResult (the reset's first), and
    whether it ran out of turns."""

    messages: tuple[dict[str, str], ...]
    results: tuple[StepResult, ...]
    truncated: bool

    @property
    def final(self) -> str:
        """The last assistant turn: the text the verifiers score ('' if there was none)."""
        turns = [m["content"] for m in self.messages if m["role"] == "assistant"]
        return turns[-1] if turns else ""

    @property
    def reward(self) -> float:
        """The sum of the rewards the environment returned (0.0 when it returned none)."""
        return float(sum(r.reward for r in self.results if r.reward is not None))

    @property
    def error(self) -> str | None:
        """The failure that ended the episode, if one did."""
        last = self.results[-1].info
        return last.get("error") if isinstance(last, dict) else None


def run_episode(
    factory: EnvFactory,
    record: Any,
    policy: Policy,
    max_turns: int = 16,
    timeout: float | None = None,
    observation_role: str = "user",
) -> Episode:
    """Play one episode of `factory`'s environment on `record` with `policy` (see the module
    docstring); `timeout` bounds each call into the environment (`guard.py`)."""
    opened = open_episode(factory, record, timeout)
    results = [opened.result]
    if opened.env is None:
        return Episode((), tuple(results), False)
    messages = [{"role": "user", "content": opened.result.observation or ""}]
    for _ in range(max_turns):
        text = policy(list(messages))
        messages.append({"role": "assistant", "content": text})
        result = guarded_step(opened.env, text, timeout)
        results.append(result)
        if result.done:
            return Episode(tuple(messages), tuple(results), bool(result.info.get("truncated")))
        if result.observation is not None:
            messages.append({"role": observation_role, "content": result.observation})
    return Episode(tuple(messages), tuple(results), True)
