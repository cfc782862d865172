"""Environments for multi-turn, tool-using episodes (issue 36): the layer below the rollout.

- `protocol.py`: what a user's environment is (`reset(record) -> str`, `step(text) ->
  StepResult`) and `load_environment("file.py:Class")`.
- `guard.py`: calls into an environment that raise, return the wrong types or hang end that
  episode with a counted error (`env/errors`), never the run; `tally` counts a step's results.
- `calls.py`: the one tool-call syntax (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`),
  the tools' prompt, and arguments checked against a tool's JSON schema.
- `tools.py`: tools from typed Python functions, run in worker processes killed on time
  (`ToolBox`), and the environment for a list of tools (`ToolEnv`).
- `episode.py`: one episode played with a Python policy, as chat messages (`run_episode`).
- `calculator.py`: the `calculator` built-in: a safe `calculate` tool, arithmetic tasks and
  expert episodes.

Nothing here is wired into training yet: see docs/agents.md for what works today. A user's
environment needs only `from rlsd.engine.envs import StepResult`.
"""

from .protocol import Environment, StepResult, load_environment

__all__ = ["Environment", "StepResult", "load_environment"]
