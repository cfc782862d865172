"""Agents' episodes on a model (issue 36): the `env` config section, and the adapter between the
environments (`rlsd.engine.envs`) and multi-turn decoding (`rlsd.engine.episodes`):
`rlsd.engine.envs.rollout`. The token alignment is checked against the chat template's
rendering of the whole conversation; the two masks against what the model and the environment
wrote; failures and truncations against the counts."""

from __future__ import annotations

import pytest

from rlsd.schema.config import ConfigError, load_config

# ----------------------------------------------------------------------------- the env section


def test_the_env_section_defaults_to_no_environment():
    cfg = load_config(None, {})
    assert not cfg.env.active and cfg.env.environment == "" and cfg.env.tools == []


def test_a_built_in_or_a_spec_loads():
    cfg = load_config(None, {"env.environment": "calculator", "env.max_turns": "4"})
    assert cfg.env.active and cfg.env.max_turns == 4
    cfg = load_config(None, {"env.tools": "[tools.py:lookup, pkg.mod:f]"})
    assert cfg.env.tools == ["tools.py:lookup", "pkg.mod:f"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"env.environment": "calculator", "env.tools": "[a.py:f]"}, "env.environment"),
        ({"env.environment": "no_such_builtin"}, "env.environment"),
        ({"env.environment": "file.py:"}, "env.environment"),
        ({"env.tools": "[just_a_name]"}, "env.tools[0]"),
        ({"env.tools": "[a.py:f, a.py:f]"}, "env.tools"),
        ({"env.environment": "calculator", "env.max_turns": "0"}, "env.max_turns"),
        ({"env.environment": "calculator", "env.max_turns": "100000"}, "env.max_turns"),
        ({"env.environment": "calculator", "env.max_tokens": "0"}, "env.max_tokens"),
        ({"env.environment": "calculator", "env.max_turn_tokens": "600"}, "env.max_turn_tokens"),
        ({"env.environment": "calculator", "env.tool_timeout": "0"}, "env.tool_timeout"),
        ({"env.environment": "calculator", "env.tool_output_limit": "0"}, "env.tool_output_limit"),
        ({"env.environment": "calculator", "env.step_timeout": "-1"}, "env.step_timeout"),
        ({"env.environment": "calculator", "env.observation_role": "bot"}, "env.observation_role"),
        ({"env.max_turns": "4"}, "env.max_turns"),  # no environment: the key does nothing
    ],
)
def test_invalid_env_values_are_refused_naming_the_field(overrides, named):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    message = str(caught.value)
    assert named in message.split(":")[0] or message.startswith(f"command line: {named}:")
