"""Tools run in worker processes: errors, hangs (killed), huge and non-text results, malformed
and unknown calls, wrong arguments, several calls in a turn, the tool environment's end of
episode, tools refused at load time, and the calculator's expert episodes on 50 tasks."""

import os
import textwrap
import time
from pathlib import Path

import pytest

from rlsd.engine.data import Record
from rlsd.engine.envs import StepResult
from rlsd.engine.envs.calculator import TOOLS, calculator_records, expert_episode
from rlsd.engine.envs.calls import render_call, response_texts
from rlsd.engine.envs.episode import run_episode
from rlsd.engine.envs.guard import open_episode, tally
from rlsd.engine.envs.tools import (
    ToolBox,
    ToolEnv,
    as_text,
    load_tools,
    run_tool,
    tool_environment,
    tool_from_function,
)
from rlsd.engine.rewards.builtin import numeric
from rlsd.engine.rewards.isolation import wait_gone
from rlsd.schema.config import ConfigError

TOOL_FILE = '''
import os
import sys
import time


def echo(text: str, times: int = 1) -> str:
    """Repeat a text.

    Args:
        text: The text.
        times: How many times.
    """
    return text * times


def boom(reason: str) -> str:
    """Fail.

    Args:
        reason: Why.
    """
    raise RuntimeError(f"boom: {reason}")


def hang(path: str) -> str:
    """Write the worker's pid to a file, then sleep for a minute.

    Args:
        path: Where to write the pid.
    """
    with open(path, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(60)
    return "woke up"


def spin() -> str:
    """Loop for ever."""
    while True:
        pass


def huge() -> str:
    """Ten megabytes of text."""
    return "x" * (10 * 2**20)


def number() -> int:
    """A number, not a string."""
    return 42


def mapping() -> dict:
    """A dict."""
    return {"a": [1, 2]}


def opaque():
    """An object that is not JSON."""
    return object()


def exits() -> str:
    """Calls sys.exit."""
    sys.exit(3)


def dies() -> str:
    """Ends its own process."""
    os._exit(7)
'''
NAMES = ["echo", "boom", "hang", "spin", "huge", "number", "mapping", "opaque", "exits", "dies"]
TIMEOUT = 1.5


@pytest.fixture(scope="module")
def toolbox(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "mytools.py"
    path.write_text(TOOL_FILE)
    box = ToolBox(load_tools([f"{path}:{n}" for n in NAMES]), timeout=TIMEOUT, max_calls=3)
    yield box
    box.close()


def call(name: str, **arguments) -> str:
    return render_call(name, arguments)


def one(toolbox: ToolBox, text: str):
    """The observation and info of one turn in a fresh tool environment."""
    env = ToolEnv(toolbox, max_turns=4)
    env.reset(Record("task", ""))
    result = env.step(text)
    assert not result.done
    return response_texts(result.observation), result.info


def test_a_call_runs_in_a_worker(toolbox):
    texts, info = one(toolbox, call("echo", text="ab", times=3))
    assert texts == ["ababab"] and info["tool_results"] == ["ababab"]
    assert (info["tool_calls"], info["tool_errors"], info["tool_timeouts"]) == (1, 0, 0)
    assert toolbox.pool.worker_pids() and os.getpid() not in toolbox.pool.worker_pids()


@pytest.mark.parametrize(
    "text, error",
    [
        (call("boom", reason="bad"), "Error: boom raised RuntimeError: boom: bad"),
        (call("exits"), "Error: exits raised SystemExit: 3"),
        (call("dies"), "Error: dies: the tool's process died (exit code 7)"),
        ("<tool_call>{not json}</tool_call>", "Error: malformed tool call: the call is not valid"),
        ('<tool_call>\n{"name": "echo", "argum', "Error: malformed tool call: <tool_call> is"),
        (call("search", q="x"), "Error: unknown tool 'search' (tools: echo, boom, hang"),
        (call("echo", text=5), "Error: echo: argument 'text': expected string, got integer"),
        (call("echo", text="a", times="2"), "argument 'times': expected integer, got string"),
        (call("echo"), "Error: echo: missing argument 'text'"),
        (call("echo", text="a", colour="red"), "Error: echo: unknown argument 'colour'"),
    ],
)
def test_failures_become_error_results(toolbox, text, error):
    texts, info = one(toolbox, text)
    assert len(texts) == 1 and error in texts[0], texts
    assert (info["tool_calls"], info["tool_errors"], info["tool_timeouts"]) == (1, 1, 0)


def test_a_hanging_tool_is_killed_on_time(toolbox, tmp_path):
    pid_file = tmp_path / "pid"
    start = time.monotonic()
    texts, info = one(toolbox, call("hang", path=str(pid_file)))
    assert time.monotonic() - start < TIMEOUT + 5
    assert texts == [f"Error: hang did not finish within {TIMEOUT:g} s and was stopped"]
    assert (info["tool_errors"], info["tool_timeouts"]) == (0, 1)
    assert wait_gone([int(pid_file.read_text())])  # killed, not left sleeping
    assert one(toolbox, call("echo", text="after"))[0] == ["after"]  # a new worker serves


def test_a_busy_loop_is_killed_on_time(toolbox):
    texts, info = one(toolbox, call("spin"))
    assert "did not finish within" in texts[0] and info["tool_timeouts"] == 1


def test_a_huge_result_is_cut_in_the_worker(toolbox):
    (text,), _ = one(toolbox, call("huge"))
    assert text.startswith("x" * 2000 + "\n")
    assert text.endswith(f"[note: output cut to 2000 of {10 * 2**20} characters]")
    assert len(text) < 2100


@pytest.mark.parametrize(
    "name, shown",
    [
        ("number", "42\n[note: the tool returned int, shown as text]"),
        ("mapping", '{"a": [1, 2]}\n[note: the tool returned dict, shown as text]'),
        ("opaque", "<object object at "),
    ],
)
def test_non_text_results_are_shown_as_text_with_a_note(toolbox, name, shown):
    (text,), info = one(toolbox, call(name))
    assert text.startswith(shown) and info["tool_errors"] == 0
    assert text.endswith("shown as text]")


def test_several_calls_in_one_turn_run_in_order(toolbox):
    text = (
        "Two at once: " + call("echo", text="a") + call("boom", reason="r") + call("echo", text="c")
    )
    texts, info = one(toolbox, text)
    assert texts == ["a", "Error: boom raised RuntimeError: boom: r", "c"]
    assert (info["tool_calls"], info["tool_errors"]) == (3, 1)
    texts, info = one(toolbox, call("echo", text="1") * 4)  # max_calls is 3
    assert texts == ["1", "1", "1", "Error: not run: at most 3 tool calls per turn"]
    assert (info["tool_calls"], info["tool_errors"]) == (4, 1)


def test_the_tool_environment_ends_on_an_answer_or_out_of_turns(toolbox):
    opened = open_episode(tool_environment(toolbox, max_turns=2), Record("Say hi.", "hi"))
    first = opened.result.observation
    assert first.startswith("You can call these tools:\n<tools>\n") and first.endswith("Say hi.")
    assert '"name": "echo"' in first and "Answer: <answer>" in first
    env = opened.env
    assert not env.step(call("echo", text="x")).done
    last = env.step(call("echo", text="y"))  # the second turn of two still calls: truncated
    assert last.done and last.info["truncated"] and last.observation is None
    assert env.step("again").info["error"] == "step() after the episode ended"
    answered = ToolEnv(toolbox)
    answered.reset(Record("Say hi.", "hi"))
    assert answered.step("Answer: hi") == StepResult(None, True, None, {"turns": 1})


def test_tally_over_tool_episodes(toolbox):
    turns = iter([call("echo", text="a") + call("boom", reason="x"), call("echo", text="b")])
    episode = run_episode(
        tool_environment(toolbox, max_turns=2), Record("t", ""), lambda m: next(turns)
    )
    assert episode.truncated
    assert tally(episode.results) == {
        "env/errors": 0.0,
        "env/truncated": 1.0,
        "env/tool_calls": 2.0,
        "env/tool_errors": 1.0,
        "env/tool_timeouts": 0.0,
    }


def test_run_tool_in_process():
    assert run_tool("rlsd.engine.envs.calculator:calculate", {"expression": "6 * 7"}, 100) == (
        "ok",
        "42",
    )
    assert run_tool("rlsd.engine.envs.calculator:calculate", {"expression": "1/0"}, 100) == (
        "error",
        "ValueError: division by zero",
    )
    assert as_text("abcdef", 3) == "abc\n[note: output cut to 3 of 6 characters]"


# ----------------------------------------------------------------------------- refused tools


def undocumented(x: int) -> str:
    return str(x)


def untyped(x):
    """Untyped.

    Args:
        x: anything.
    """
    return x


def test_tools_that_workers_cannot_load_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="is not a module-level function"):
        tool_from_function(lambda x: x)

    def nested(x: int) -> str:
        """Nested.

        Args:
            x: a number.
        """
        return str(x)

    with pytest.raises(ConfigError, match="is not a module-level function"):
        tool_from_function(nested)
    with pytest.raises(ConfigError, match="env.tools: tool 'undocumented' .*no JSON schema"):
        tool_from_function(undocumented)
    with pytest.raises(ConfigError, match="env.tools: tool 'untyped' .*no JSON schema"):
        tool_from_function(untyped)
    with pytest.raises(ConfigError, match="env.tools: file not found: none.py"):
        load_tools(["none.py:f"])
    with pytest.raises(ConfigError, match="env.tools: .* has no function 'absent'"):
        load_tools(["rlsd.engine.envs.calculator:absent"])
    with pytest.raises(ConfigError, match="two tools have the same name"):
        ToolBox(TOOLS + TOOLS)


def test_tool_specs_name_how_a_worker_loads_them(tmp_path):
    (tool,) = TOOLS
    assert tool_from_function(tool).spec == "rlsd.engine.envs.calculator:calculate"
    path = tmp_path / "other.py"
    path.write_text(textwrap.dedent(TOOL_FILE))
    (loaded,) = load_tools([f"{path}:echo"])
    assert loaded.spec == f"{Path(path).resolve()}:echo"
    assert loaded.schema["function"]["parameters"]["required"] == ["text"]


# ----------------------------------------------------------------------------- the calculator


@pytest.fixture(scope="module")
def calculator():
    box = ToolBox(TOOLS, timeout=10.0)
    yield box
    box.close()


def test_calculator_errors_are_observations(calculator):
    texts, info = one(calculator, call("calculate", expression="1 / 0"))
    assert texts == ["Error: calculate raised ValueError: division by zero"]
    texts, _ = one(calculator, call("calculate", expression="__import__('os').getcwd()"))
    assert texts[0].startswith("Error: calculate raised ValueError: not allowed")
    assert info["tool_errors"] == 1


def test_expert_episodes_reach_the_answer_on_50_tasks(calculator):
    records = calculator_records(50, seed=11)
    finals = []
    for record in records:
        episode = expert_episode(record, calculator)
        steps = len(record.metadata["operators"])
        roles = [m["role"] for m in episode.messages]
        assert roles == ["user"] + ["assistant", "tool"] * steps + ["assistant"]
        assert not episode.truncated and episode.error is None
        counts = tally(episode.results)
        assert (counts["env/tool_calls"], counts["env/tool_errors"]) == (steps, 0)
        assert episode.final.endswith(f"Answer: {record.answer}")
        finals.append(episode.final)
    scores = numeric([r.prompt for r in records], finals, [r.answer for r in records])
    assert scores == [1.0] * 50  # the run's own verifier agrees
