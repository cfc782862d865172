"""What a user's environment is: one instance per episode, `reset(record)` and `step(text)`.

This is the shape the field already uses (TRL's `environment_factory`, OpenEnv, verifiers'
`MultiTurnEnv`, rLLM, Tinker): the trainer builds one instance of the user's class per episode
(with no arguments), `reset(record)` returns the first user message (and may keep state on the
instance), and each model turn goes to `step(text)`, which returns a `StepResult`: the next
observation (None: nothing is appended), whether the episode is over, an optional reward and
optional info. The episode's final answer (its last model turn) is scored by the run's
verifiers; a reward the environment returns is added to theirs when training is wired.

`load_environment("file.py:Class")` or `load_environment("package.module:Class")` finds the
class with the verifiers' loader (`rewards.loading.load_callable`) and checks its shape, so
that a mistake is reported at start-up with the spec named, not at the first episode.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ...schema.config import ConfigError
from ..rewards.loading import load_callable

FIELD = "env.environment"  # the config field a spec comes from (named in every error)


@dataclass(frozen=True)
class StepResult:
    """What an environment returns for one model turn.

    observation: the text appended for the model next (a tool result, the environment's reply),
        or None for nothing; ignored once `done`.
    done: whether the episode is over (the model's turn just taken is its last).
    reward: an optional reward for this turn (a finite number), summed over the episode.
    info: free-form details (counts, hidden state for the teacher); the guard puts a failure in
        `info["error"]`, the tool environment its counts in `tool_calls` / `tool_errors` /
        `tool_timeouts` and `truncated` when it ran out of turns.
    """

    observation: str | None
    done: bool
    reward: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """One episode's environment (the class is built with no arguments, once per episode)."""

    def reset(self, record: Any) -> str:
        """The first user message for this record (an `rlsd.engine.data.Record`)."""
        ...

    def step(self, text: str) -> StepResult:
        """The model's turn in; the next observation, done, reward and info out."""
        ...


EnvFactory = Callable[[], Environment]  # a class, or anything that builds one per episode


def load_environment(spec: str, field_name: str = FIELD) -> type:
    """The environment class named by `spec` ('file.py:Class' or 'package.module:Class').

    Raises ConfigError naming `field_name` and the spec when the spec has no ':', the file or
    module cannot be loaded, the name is missing or not a class, the class lacks a callable
    `reset` or `step`, or it cannot be built without arguments (one instance per episode).
    """
    if ":" not in spec:
        raise ConfigError(
            f"{field_name}: {spec!r} is not 'file.py:Class' or 'package.module:Class'"
        )
    try:
        found = load_callable(spec)
    except ConfigError as exc:  # (its message names the verifiers' field: name ours instead)
        message = str(exc).removeprefix("reward.verifiers: ")
        raise ConfigError(
            f"{field_name}: {message.replace(' has no function ', ' has no class ')}"
        ) from None
    if not inspect.isclass(found):
        raise ConfigError(
            f"{field_name}: {spec!r} is a {type(found).__name__}, not a class (an environment "
            "is a class with reset(record) -> str and step(text) -> StepResult)"
        )
    missing = [name for name in ("reset", "step") if not callable(getattr(found, name, None))]
    if missing:
        raise ConfigError(
            f"{field_name}: {spec!r} has no method {' or '.join(missing)} (an environment "
            "needs reset(record) -> str and step(text) -> StepResult)"
        )
    try:
        inspect.signature(found).bind()
    except TypeError as exc:
        raise ConfigError(
            f"{field_name}: {spec!r} cannot be built without arguments ({exc}); rlsd builds "
            "one instance per episode with none"
        ) from None
    except ValueError:  # (no signature to read, e.g. a class implemented in C: try it later)
        pass
    return found
