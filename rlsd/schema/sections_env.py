"""The config schema, agents' side: the `env` section (issue 36), each field declared once with
its help text (`opt`), and `env_problem`, the checks `config.validate` runs on it.

An empty `env.environment` and no `env.tools` (the defaults) mean no environment: a single-turn
run, as before the section existed. Like the rest of the schema, this loads no torch: the
environment and the tools themselves are loaded by `rlsd.engine.envs` when the run starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .sections_training import opt

BUILTIN_ENVIRONMENTS = ("calculator",)  # names `rlsd.engine.envs.rollout.build_environment` knows
OBSERVATION_ROLES = ("auto", "user", "tool")
MAX_TURNS = 256  # the most model turns an episode may be given
MAX_EPISODE_TOKENS = 1_000_000  # the most tokens after the prompt (a sanity bound)


@dataclass
class EnvConfig:
    environment: str = opt(
        "",
        "The environment of a multi-turn run: 'file.py:Class' or 'package.module:Class' (a class "
        "with reset(record) -> str and step(text) -> StepResult, built once per episode), or a "
        f"built-in ({', '.join(BUILTIN_ENVIRONMENTS)}). Empty, with no env.tools: no "
        "environment, one completion per prompt (see docs/agents.md).",
    )
    tools: list = opt(
        [],
        "The tools shortcut: 'file.py:function' or 'module:function' specs of typed, documented "
        "functions; rlsd provides the environment (shows the tools, runs the calls, the first "
        "turn without a call is the final answer). Not with env.environment.",
    )
    max_turns: int = opt(8, "The most model turns in an episode (past them: truncated).", low=1)
    max_turn_tokens: int = opt(
        128, "The most tokens the model writes in one turn (then the turn ends).", low=1
    )
    max_tokens: int = opt(
        512,
        "The most tokens of an episode after its prompt, model and environment tokens together "
        "(past them: truncated). At least env.max_turn_tokens.",
        low=1,
        high=MAX_EPISODE_TOKENS,
    )
    tool_timeout: float = opt(
        10.0, "Seconds of wall time one tool call may run before its worker is killed.", low=0.01
    )
    tool_output_limit: int = opt(
        2000, "Characters of a tool's result shown to the model (the rest is cut).", low=1
    )
    step_timeout: float = opt(
        30.0,
        "Seconds one call of a user environment's reset or step may take before the episode "
        "ends with an error (env/errors); the call is abandoned, not killed. The tools' own "
        "environment is rlsd's code and is bounded by env.tool_timeout instead.",
        low=0.01,
    )
    reward_weight: float = opt(
        1.0,
        "The weight of the environment's own reward (the sum of its steps' rewards), added to "
        "the verifiers' weighted reward of the episode's final answer (its last model turn).",
    )
    truncated_reward: float = opt(
        0.0,
        "The reward of an episode that ran out of turns or tokens (env/truncated_frac), in "
        "place of the verifiers' and the environment's: it gave no final answer.",
    )
    observation_role: str = opt(
        "auto",
        "The chat role of the environment's replies: auto = tool for env.tools and the "
        "built-ins (their replies are tool results), user for an environment class.",
        choices=OBSERVATION_ROLES,
    )

    @property
    def active(self) -> bool:
        """Whether the run has an environment (an environment or tools)."""
        return bool(self.environment or self.tools)


def env_problem(env: EnvConfig, changed: set[str] = frozenset()) -> str | None:
    """What is wrong with the env section as a whole (its fields' ranges are checked with the
    others'), naming the field; None when nothing is. `changed`: the dotted keys the user set
    to something other than the default (an env.* key without an environment is refused).
    Loads nothing: a spec's file, module and class are checked when the run starts
    (`rlsd.engine.envs.protocol.load_environment`)."""
    if env.environment and env.tools:
        return "env.environment: give an environment or env.tools, not both"
    spec = env.environment
    if spec and spec not in BUILTIN_ENVIRONMENTS and not _is_spec(spec):
        return (
            f"env.environment: {spec!r} is not 'file.py:Class', 'package.module:Class' or a "
            f"built-in ({', '.join(BUILTIN_ENVIRONMENTS)})"
        )
    for i, tool in enumerate(env.tools):
        if not isinstance(tool, str) or not _is_spec(tool):
            return f"env.tools[{i}]: {tool!r} is not 'file.py:function' or 'module:function'"
    if len(set(env.tools)) != len(env.tools):
        return f"env.tools: a tool is listed twice: {env.tools}"
    unused = sorted(k for k in changed if k.startswith("env.") and not env.active)
    if unused:
        return f"{unused[0]}: only applies with env.environment or env.tools set"
    if env.max_turns > MAX_TURNS:
        return f"env.max_turns: must be <= {MAX_TURNS}, got {env.max_turns}"
    if env.max_turn_tokens > env.max_tokens:
        return (
            f"env.max_turn_tokens: {env.max_turn_tokens} is more than the episode's "
            f"env.max_tokens ({env.max_tokens})"
        )
    return None


def _is_spec(spec: Any) -> bool:
    """'left:right' with both sides non-empty (a Windows drive letter is no module)."""
    left, _, right = str(spec).rpartition(":")
    return bool(left.strip()) and bool(right.strip()) and right.strip().isidentifier()
