"""Calling a user's environment without letting it crash or hang the trainer.

Every call into a user's environment (building it, `reset`, `step`) goes through here. A call
that raises, returns the wrong type, or does not return within `timeout` seconds ends that
episode: the guard returns `StepResult(None, done=True, info={"error": "..."})`, whose message
names the class, the method and what went wrong, and `tally` counts it as `env/errors`. The
trainer goes on with the other episodes.

How a hang is handled: an environment holds its state in the trainer's process, so its calls
run there, each in a daemon thread that is waited for `timeout` seconds. A thread cannot be
killed: a call still running at the timeout is abandoned (its thread keeps running in the
background, and dies with the process; being a daemon it never holds up the exit), its instance
is never called again, and the episode ends with the error. An environment that can hang for
good should put the work that hangs in a tool (tools run in worker processes that are killed
on time, `tools.py`) or give its own calls a timeout. With `timeout=None` calls run directly in
the caller's thread: exceptions are still caught, hangs are not.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .protocol import EnvFactory, StepResult

ERROR = "error"  # the info key of a failure
COUNTED = ("tool_calls", "tool_errors", "tool_timeouts")  # info counts summed by `tally`


@dataclass(frozen=True)
class Opened:
    """An episode started by `open_episode`: its environment (None when starting it failed)
    and the reset's result (the first user message as the observation, or the error)."""

    env: Any
    result: StepResult


def failed(message: str) -> StepResult:
    """The result that ends an episode on an environment's failure."""
    return StepResult(None, True, None, {ERROR: message})


def describe(exc: BaseException) -> str:
    """'Type: message', short, for an exception raised by user code (whose str() may raise)."""
    try:
        text = str(exc)
    except Exception:
        text = "(its message could not be read)"
    return f"{type(exc).__name__}: {text[:500]}" if text else type(exc).__name__


def call(fn: Callable, args: tuple, timeout: float | None) -> tuple[Any, str | None]:
    """`(fn(*args), None)`, or `(None, what went wrong)` when it raised or ran past `timeout`
    seconds (then abandoned in its daemon thread: see the module docstring). KeyboardInterrupt
    is let through when the call runs in the caller's thread."""
    if timeout is None:
        try:
            return fn(*args), None
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # (SystemExit too: a user's sys.exit() ends the episode)
            return None, f"raised {describe(exc)}"
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="rlsd-env-call", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return None, f"did not return within {timeout:g} s (abandoned: a thread cannot be killed)"
    if "error" in box:
        return None, f"raised {describe(box['error'])}"
    return box.get("value"), None


def _name(env: Any) -> str:
    return type(env).__name__


def open_episode(factory: EnvFactory, record: Any, timeout: float | None = None) -> Opened:
    """Build one environment and reset it on `record`, guarded (one call, one timeout): the
    first user message comes back as the observation of a result that is not done."""
    stage = [f"{getattr(factory, '__name__', type(factory).__name__)}()"]  # what is running

    def start() -> tuple[Any, Any]:
        env = factory()
        stage[0] = f"{_name(env)}.reset(record)"
        return env, env.reset(record)

    value, error = call(start, (), timeout)
    if error is not None:
        return Opened(None, failed(f"{stage[0]} {error}"))
    env, first = value
    if not isinstance(first, str):
        return Opened(None, failed(f"{_name(env)}.reset returned {type(first).__name__}, not str"))
    return Opened(env, StepResult(first, False))


def guarded_step(env: Any, text: str, timeout: float | None = None) -> StepResult:
    """`env.step(text)`, guarded and checked (`check_step`): a failure ends the episode."""
    value, error = call(env.step, (text,), timeout)
    if error is not None:
        return failed(f"{_name(env)}.step {error}")
    problem = check_step(value)
    if problem is not None:
        return failed(f"{_name(env)}.step returned {problem}")
    return value


def check_step(value: Any) -> str | None:
    """What is wrong with a step's return value, or None when it is a well-typed StepResult:
    observation str or None, done a bool, reward None or a finite number, info a dict."""
    if not isinstance(value, StepResult):
        return f"{type(value).__name__}, not StepResult"
    if value.observation is not None and not isinstance(value.observation, str):
        return f"an observation of type {type(value.observation).__name__}, not str or None"
    if not isinstance(value.done, bool):
        return f"done of type {type(value.done).__name__}, not bool"
    reward = value.reward
    if reward is not None:
        if isinstance(reward, bool) or not isinstance(reward, (int, float)):
            return f"a reward of type {type(reward).__name__}, not a number or None"
        if not math.isfinite(reward):
            return f"a reward of {reward}, not a finite number"
    if not isinstance(value.info, dict):
        return f"info of type {type(value.info).__name__}, not dict"
    return None


def tally(results: Iterable[StepResult]) -> dict[str, float]:
    """The counts over some step results (of any episodes), for the step's metrics:
    `env/errors` (results carrying info['error']: a failed environment, or one that reported an
    error itself), `env/truncated` (results marked truncated), and `env/tool_calls`,
    `env/tool_errors`, `env/tool_timeouts` summed from the tool environment's info."""
    out = dict.fromkeys(("env/errors", "env/truncated", *(f"env/{k}" for k in COUNTED)), 0.0)
    for result in results:
        info = result.info if isinstance(result.info, dict) else {}
        out["env/errors"] += ERROR in info
        out["env/truncated"] += bool(info.get("truncated"))
        for key in COUNTED:
            count = info.get(key, 0)
            out[f"env/{key}"] += count if isinstance(count, int) else 0
    return out
