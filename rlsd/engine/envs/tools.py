"""Tools from typed Python functions, run in worker processes that are killed on time, and the
environment rlsd provides for a list of them.

A tool is a plain module-level function with type hints and a Google-style docstring (the form
TRL's `tools=` and transformers' chat templates take); `transformers.utils.get_json_schema`
builds its JSON schema, which the model is shown (`calls.tool_prompt`) and the arguments of each
call are checked against (`calls.check_arguments`). The call syntax is in `calls.py`.

`ToolBox` runs the calls. Arguments the model chose reach the tool only after the check, in a
worker process of the verifiers' pool (`rewards.isolation.VerifierPool`, unconfined as a user's
verifier is: a tool is the user's code): started once, reused, each call limited to `timeout`
seconds of wall time (past it the worker is killed, not abandoned, and replaced), with the pool's
memory and CPU-time limits. The worker loads each tool by 'module:function' (or
'file.py:function' for a tool defined in a file loaded by path, or in the main script), so a tool
must be a module-level function. What comes back is text only: a result that is not a str is
shown as JSON (or its repr) with a note, and one longer than `output_limit` characters is cut,
with a note, before it leaves the worker. A call that raises, times out, kills its worker, is
malformed, names an unknown tool or has arguments that do not fit the schema becomes an error
result the model reads ("Error: ..."), counted in the step's info (`tool_errors`,
`tool_timeouts`), never an exception in the trainer.

`ToolEnv` is the environment for a ToolBox: `reset` shows the tools and the syntax before the
task's prompt; `step` runs the turn's calls and returns their results; a turn without a call is
the final answer and ends the episode, as does a turn with calls once `max_turns` model turns
have been taken (marked `truncated`: its calls are not run).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from signal import SIGXCPU
from typing import Any

from ...schema.config import ConfigError
from ..rewards import worker
from ..rewards.isolation import STARTUP_ALLOWANCE, VerifierPool
from ..rewards.loading import load_callable
from .calls import (
    Malformed,
    ToolCall,
    check_arguments,
    parse_tool_calls,
    render_results,
    tool_prompt,
)
from .guard import describe
from .protocol import StepResult

OUTPUT_LIMIT = 2000  # characters of a tool's result shown to the model
TOOLS_FIELD = "env.tools"


@dataclass(frozen=True)
class Tool:
    """A tool: its name, how a worker process loads it, and its JSON schema."""

    name: str
    spec: str  # 'module:function' or '/abs/path/file.py:function'
    schema: dict[str, Any]


def tool_spec(fn: Callable) -> str:
    """How a worker process finds `fn`: 'module:function' when its module is importable under
    that name, else 'file.py:function' (a file loaded by path, a main script). Raises
    ConfigError for a function a worker cannot load (a lambda, a nested function)."""
    name = getattr(fn, "__name__", None)
    if not inspect.isfunction(fn) or name == "<lambda>" or fn.__qualname__ != name:
        raise ConfigError(
            f"{TOOLS_FIELD}: {fn!r} is not a module-level function (tools run in worker "
            "processes, which load each one by 'module:function' or 'file.py:function')"
        )
    module = sys.modules.get(fn.__module__)
    if fn.__module__ != "__main__" and getattr(module, name, None) is fn:
        return f"{fn.__module__}:{name}"
    source = inspect.getsourcefile(fn)
    if source is None:
        raise ConfigError(f"{TOOLS_FIELD}: cannot find the file that defines {name!r}")
    return f"{os.path.abspath(source)}:{name}"


def tool_from_function(fn: Callable) -> Tool:
    """A Tool from a typed, documented function; ConfigError (naming the function and where it
    is defined) when transformers cannot build its schema (a missing type hint, an argument the
    docstring does not describe)."""
    from transformers.utils import get_json_schema

    spec = tool_spec(fn)
    try:
        schema = get_json_schema(fn)
    except Exception as exc:  # (DocstringParsingException, TypeHintParsingException)
        raise ConfigError(
            f"{TOOLS_FIELD}: tool {fn.__name__!r} ({spec}): no JSON schema from its signature "
            f"and docstring: {exc}"
        ) from None
    return Tool(fn.__name__, spec, schema)


def load_tools(specs: list[str]) -> list[Tool]:
    """The tools named by 'module:function' / 'file.py:function' specs (the config's form)."""
    tools = []
    for spec in specs:
        try:
            fn = load_callable(spec)
        except ConfigError as exc:
            raise ConfigError(
                f"{TOOLS_FIELD}: {str(exc).removeprefix('reward.verifiers: ')}"
            ) from None
        tools.append(tool_from_function(fn))
    return tools


# ----------------------------------------------------------------------------- the worker side


def as_text(value: Any, limit: int) -> str:
    """A tool's result as the text the model reads: a str as it is, anything else as JSON (or
    its repr) with a note; cut to `limit` characters with a note saying how long it was."""
    if isinstance(value, str):
        text = value
    else:
        try:
            shown = json.dumps(value)
        except (TypeError, ValueError):
            shown = repr(value)
        text = f"{shown}\n[note: the tool returned {type(value).__name__}, shown as text]"
    if len(text) > limit:
        text = f"{text[:limit]}\n[note: output cut to {limit} of {len(text)} characters]"
    return text


def run_tool(spec: str, arguments: dict[str, Any], limit: int) -> tuple[str, str]:
    """One call, in a worker process: ('ok', text) or ('error', 'Type: message'). Never raises:
    only a short tuple of strings goes back to the trainer."""
    try:
        if "cpu" in worker._WORKER:  # (in a pool's worker) this call's CPU-time allowance
            worker._reset_cpu_limit()
        fn = worker._WORKER["fns"].get(spec) or load_callable(spec)
        value = fn(**arguments)
        if inspect.isawaitable(value):
            value = asyncio.run(value)
        return ("ok", as_text(value, limit))
    except BaseException as exc:  # (SystemExit and MemoryError too)
        return ("error", describe(exc))


# ----------------------------------------------------------------------------- the trainer side


@dataclass(frozen=True)
class ToolResult:
    """One call's outcome: the text the model reads, and whether it was ok, an error or a
    timeout."""

    text: str
    status: str  # "ok", "error" or "timeout"


def _error(message: str) -> ToolResult:
    return ToolResult(f"Error: {message}", "error")


class ToolBox:
    """Tools and the worker processes that run their calls (started at the first call; `close()`
    stops them). One ToolBox serves every episode of a run."""

    def __init__(
        self,
        tools: list[Tool] | list[Callable],
        timeout: float = 10.0,
        output_limit: int = OUTPUT_LIMIT,
        max_calls: int = 4,
        workers: int = 2,
        memory_mb: int = 1024,
    ):
        built = [t if isinstance(t, Tool) else tool_from_function(t) for t in tools]
        names = [t.name for t in built]
        if len(set(names)) != len(names):
            raise ConfigError(f"{TOOLS_FIELD}: two tools have the same name: {names}")
        self.tools = {t.name: t for t in built}
        self.timeout, self.output_limit, self.max_calls = timeout, output_limit, max_calls
        specs = [t.spec for t in built]
        self.pool = VerifierPool(specs, timeout, memory_mb, workers, confine=False)

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema for t in self.tools.values()]

    def prompt(self) -> str:
        """The tools and the call syntax, as the model is shown them."""
        return tool_prompt(self.schemas)

    def run(self, calls: list[ToolCall | Malformed]) -> list[ToolResult]:
        """The results of a turn's calls, in order: checked calls run in the workers (at the
        same time, up to `workers`); the rest are errors. Past `max_calls`, calls are not run."""
        pending: list[Any] = []
        for i, call in enumerate(calls):
            pending.append(self._start(call) if i < self.max_calls else None)
        out = []
        for i, (call, item) in enumerate(zip(calls, pending)):
            if i >= self.max_calls:
                out.append(_error(f"not run: at most {self.max_calls} tool calls per turn"))
            elif isinstance(item, ToolResult):
                out.append(item)
            else:
                out.append(self._finish(call.name, item))
        return out

    def _start(self, call: ToolCall | Malformed) -> Any:
        """A ToolResult for a call that cannot run, else the future of its run."""
        if isinstance(call, Malformed):
            return _error(f"malformed tool call: {call.reason}: {call.text}")
        tool = self.tools.get(call.name)
        if tool is None:
            return _error(f"unknown tool {call.name!r} (tools: {', '.join(self.tools)})")
        problem = check_arguments(tool.schema, call.arguments)
        if problem is not None:
            return _error(f"{call.name}: {problem}")
        try:
            args = (tool.spec, call.arguments, self.output_limit)
            return self.pool.schedule(run_tool, args, self.timeout)
        except Exception as exc:  # (the pool cannot start: the call fails, not the run)
            return _error(f"{call.name}: the tool workers could not start: {describe(exc)}")

    def _finish(self, name: str, future: Any) -> ToolResult:
        from pebble import ProcessExpired

        timed_out = ToolResult(
            f"Error: {name} did not finish within {self.timeout:g} s and was stopped", "timeout"
        )
        try:  # pebble kills the worker at `timeout`; the wait's own limit is a backstop
            status, text = future.result(timeout=self.timeout + STARTUP_ALLOWANCE)
        except FutureTimeout:
            future.cancel()
            return timed_out
        except ProcessExpired as exc:
            if exc.exitcode == -SIGXCPU:  # (its CPU-time limit: a busy loop)
                return timed_out
            return _error(f"{name}: the tool's process died (exit code {exc.exitcode})")
        except Exception as exc:  # (a broken pool: this call fails, not the run)
            return _error(f"{name}: tool worker: {describe(exc)}")
        return ToolResult(text, "ok") if status == "ok" else _error(f"{name} raised {text}")

    def close(self) -> None:
        """Stop the workers (killing any still busy)."""
        self.pool.close()


class ToolEnv:
    """The environment for a ToolBox, one instance per episode (see the module docstring)."""

    def __init__(self, toolbox: ToolBox, max_turns: int = 8):
        self.toolbox, self.max_turns = toolbox, max_turns
        self.turns, self.done = 0, False

    def reset(self, record: Any) -> str:
        return f"{self.toolbox.prompt()}\n\n{record.prompt}"

    def step(self, text: str) -> StepResult:
        if self.done:
            return StepResult(None, True, None, {"error": "step() after the episode ended"})
        self.turns += 1
        calls = parse_tool_calls(text)
        if not calls:
            self.done = True
            return StepResult(None, True, None, {"turns": self.turns})
        if self.turns >= self.max_turns:
            self.done = True
            return StepResult(None, True, None, {"turns": self.turns, "truncated": True})
        results = self.toolbox.run(calls)
        info = {
            "turns": self.turns,
            "tool_calls": len(results),
            "tool_errors": sum(r.status == "error" for r in results),
            "tool_timeouts": sum(r.status == "timeout" for r in results),
            "tool_results": [r.text for r in results],
        }
        return StepResult(render_results([r.text for r in results]), False, None, info)


def tool_environment(toolbox: ToolBox, max_turns: int = 8) -> Callable[[], ToolEnv]:
    """The per-episode factory of ToolEnv for `toolbox` (what `open_episode` takes)."""

    def make() -> ToolEnv:
        return ToolEnv(toolbox, max_turns)

    make.__name__ = "ToolEnv"
    return make
