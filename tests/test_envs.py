"""The environment layer without worker processes: the protocol and its loader, the guard, the
tool-call syntax and argument checks, the calculator's parser and tasks, and the environment
docs/agents.md shows. (Tools run in workers: tests/test_envs_tools.py.)"""

import re
import sys
import textwrap
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest

from rlsd.engine.data import Record
from rlsd.engine.envs import StepResult, load_environment
from rlsd.engine.envs.calculator import calculate, calculator_records, evaluate, format_number
from rlsd.engine.envs.calls import (
    Malformed,
    ToolCall,
    check_arguments,
    parse_tool_calls,
    render_call,
    render_results,
    response_texts,
)
from rlsd.engine.envs.episode import run_episode
from rlsd.engine.envs.guard import check_step, guarded_step, open_episode, tally
from rlsd.schema.config import ConfigError

DOCS = Path(__file__).parent.parent / "docs" / "agents.md"
RECORD = Record("What is the number?", "42")


# ----------------------------------------------------------------------------- the calculator


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("2 + 3 * 4", "14"),
        ("(2 + 3) * 4", "20"),
        ("10 - 2 - 3", "5"),  # left to right
        ("100 / 10 / 5", "2"),
        ("2 ** 3 ** 2", "512"),  # right to left
        ("-2 ** 2", "-4"),  # the power binds tighter than the minus
        ("(-2) ** 2", "4"),
        ("-(3 - 5)", "2"),
        ("--3", "3"),
        ("+4 - -1", "5"),
        ("7 // 2", "3"),
        ("-7 // 2", "-4"),
        ("7 % 3", "1"),
        ("-7 % 3", "2"),
        ("7 / 2", "3.5"),
        ("1 / 4", "0.25"),
        ("-1 / 8", "-0.125"),
        ("1 / 3", "0.333333333333"),
        ("0.1 + 0.2", "0.3"),  # exact, not 0.30000000000000004
        ("2 ** -1", "0.5"),
        ("1e3 + 1", "1001"),
        ("123456789 * 987654321", "121932631112635269"),
        (" 6900 - 673 ", "6227"),
        ("1_000 + 1", "1001"),
    ],
)
def test_calculate_hand_computed(expression, expected):
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    "expression, message",
    [
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("5 // (2 - 2)", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("__import__('os')", "function calls"),
        ("__import__('os').system('true')", "not allowed"),
        ("(1).real", "attribute access"),
        ("().__class__", "attribute access"),
        ("x + 1", "names"),
        ("'a' * 3", "'a' is not a number"),
        ("True + 1", "True is not a number"),
        ("1j * 2", "1j is not a number"),
        ("1 < 2", "comparisons"),
        ("1 ^ 2", "use ** for powers"),
        ("[1, 2]", "List"),
        ("1 if 1 else 2", "IfExp"),
        ("lambda: 1", "lambdas"),
        ("2 ** 10000", "larger than 1000"),
        ("9 ** 999 ** 9", "larger than 1000"),
        ("(2 ** 1000) ** 5", "wider than 4096 bits"),
        ("10 ** 0.5", "whole-number exponents"),
        ("1e400", "not a finite number"),
        ("1" + " + 1" * 100, "longer than 200"),
        ("", "empty"),
        ("2 +", "not an arithmetic expression"),
        ("import os", "not an arithmetic expression"),
    ],
)
def test_calculate_refuses(expression, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        calculate(expression)


def test_evaluate_is_exact_and_bounded():
    assert evaluate("1/3 + 1/6") == Fraction(1, 2)
    assert evaluate("(10 ** 30 + 1) - 10 ** 30") == 1  # no float rounding
    big = "9" * 60  # 200 bits: its 20th power (4000 bits) passes, their product does not
    assert evaluate(f"{big} ** 20") == Fraction(int(big) ** 20)
    with pytest.raises(ValueError, match="a value on the way is wider than 4096 bits"):
        evaluate(f"({big} ** 20) * ({big} ** 20)")
    with pytest.raises(ValueError, match="text"):
        evaluate(3)
    assert format_number(Fraction(-7, 4)) == "-1.75"
    assert format_number(Fraction(1, 1000)) == "0.001"


def test_calculator_records():
    records = calculator_records(40, seed=3)
    assert [r.prompt for r in records] == [r.prompt for r in calculator_records(40, seed=3)]
    assert [r.prompt for r in records] != [r.prompt for r in calculator_records(40, seed=4)]
    for i, record in enumerate(records):
        meta = record.metadata
        operands, operators = meta["operands"], meta["operators"]
        assert meta["kind"] == ("sum" if i % 2 == 0 else "product")
        if meta["kind"] == "sum":
            assert 3 <= len(operands) <= 5 and set(operators) <= {"+", "-"}
        else:
            assert len(operands) in (2, 3) and set(operators) == {"*"}
        assert all(n >= 10 for n in operands)  # multi-digit
        total = operands[0]  # the answer, computed without the calculator
        for op, n in zip(operators, operands[1:]):
            total = total + n if op == "+" else total - n if op == "-" else total * n
        assert record.answer == str(total)
        assert record.solution.splitlines()[-1].endswith(f"= {total}")
        assert len(record.solution.splitlines()) == len(operators)
        assert record.prompt.startswith("What is ")


# ----------------------------------------------------------------------------- the call syntax


def test_parse_one_call_with_text_before():
    text = (
        'Let me add.\n<tool_call>\n{"name": "calculate", "arguments": {"expression": "3+4"}}'
        "\n</tool_call>"
    )
    assert parse_tool_calls(text) == [ToolCall("calculate", {"expression": "3+4"})]


def test_parse_no_call_is_a_final_answer():
    assert parse_tool_calls("The sum is 7.\nAnswer: 7") == []


def test_parse_several_calls_in_order():
    text = (
        '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call> then '
        '<tool_call>{"name": "b"}</tool_call>'
    )
    assert parse_tool_calls(text) == [ToolCall("a", {"x": 1}), ToolCall("b", {})]


@pytest.mark.parametrize(
    "body, reason",
    [
        ('{"name": "a", "arguments": {"x": 1}', "not valid JSON"),
        ("calculate(3+4)", "not valid JSON"),
        ('["a", {"x": 1}]', "JSON list, not an object"),
        ('{"arguments": {"x": 1}}', 'no "name" string'),
        ('{"name": 3}', 'no "name" string'),
        ('{"name": "a", "arguments": "x=1"}', '"arguments" is not a JSON object'),
    ],
)
def test_parse_malformed_calls(body, reason):
    (got,) = parse_tool_calls(f"<tool_call>{body}</tool_call>")
    assert isinstance(got, Malformed) and reason in got.reason


def test_parse_unclosed_call_after_a_good_one():
    good = render_call("a", {"x": 1})
    got = parse_tool_calls(f'{good}\n<tool_call>{{"name": "b", "argu')
    assert got[0] == ToolCall("a", {"x": 1})
    assert isinstance(got[1], Malformed) and "not closed" in got[1].reason


def test_render_and_read_back():
    call = render_call("calculate", {"expression": "1 + 2"})
    assert parse_tool_calls(call) == [ToolCall("calculate", {"expression": "1 + 2"})]
    results = ["3", "two\nlines", ""]
    assert response_texts(render_results(results)) == results


SCHEMA = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {
            "type": "object",
            "properties": {
                "text": {"type": "string"},
                "count": {"type": "integer"},
                "scale": {"type": "number"},
                "flag": {"type": "boolean"},
                "items": {"type": "array", "items": {"type": "integer"}},
                "maybe": {"type": "string", "nullable": True},
                "mode": {"type": "string", "enum": ["fast", "slow"]},
                "either": {"type": ["integer", "string"]},
            },
            "required": ["text"],
        },
    },
}


@pytest.mark.parametrize(
    "arguments, problem",
    [
        ({"text": "a"}, None),
        ({"text": "a", "count": 2, "scale": 2, "flag": True, "items": [1, 2]}, None),
        ({"text": "a", "scale": 0.5, "maybe": None, "mode": "fast", "either": "x"}, None),
        ({}, "missing argument 'text'"),
        ({"text": "a", "colour": 1}, "unknown argument 'colour'"),
        ({"text": 3}, "argument 'text': expected string, got integer"),
        ({"text": "a", "count": "2"}, "argument 'count': expected integer, got string"),
        ({"text": "a", "count": 2.5}, "expected integer, got number"),
        ({"text": "a", "count": True}, "expected integer, got boolean"),  # a bool is no number
        ({"text": "a", "scale": False}, "expected number, got boolean"),
        ({"text": "a", "items": [1, "b"]}, "argument 'items': item 1: expected integer"),
        ({"text": "a", "items": 1}, "expected array"),
        ({"text": None}, "expected string, got null"),
        ({"text": "a", "mode": "medium"}, "'medium' is not one of"),
        ({"text": "a", "either": 1.5}, "expected integer or string"),
    ],
)
def test_check_arguments(arguments, problem):
    got = check_arguments(SCHEMA, arguments)
    assert got == problem if problem is None else problem in got


# ----------------------------------------------------------------------------- the guard


class Good:
    def reset(self, record):
        self.turns = 0
        return f"Q: {record.prompt}"

    def step(self, text):
        self.turns += 1
        return StepResult(f"echo {text}", self.turns >= 2, 0.5, {"turns": self.turns})


class RaisesInInit:
    def __init__(self):
        raise RuntimeError("no instance")

    def reset(self, record):
        return ""

    def step(self, text):
        return StepResult(None, True)


class RaisesInReset(Good):
    def reset(self, record):
        raise KeyError("prompt")


class ResetReturnsInt(Good):
    def reset(self, record):
        return 7


class Exits(Good):
    def step(self, text):
        sys.exit(2)


RELEASE = threading.Event()


class Hangs(Good):
    def step(self, text):
        RELEASE.wait(30)
        return StepResult(None, True)


class Returns(Good):
    """step returns whatever the test sets as `value`."""

    value = None

    def step(self, text):
        return self.value


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_a_good_environment_through_the_guard(timeout):
    opened = open_episode(Good, RECORD, timeout)
    assert opened.result == StepResult("Q: What is the number?", False)
    first = guarded_step(opened.env, "hi", timeout)
    assert first == StepResult("echo hi", False, 0.5, {"turns": 1})
    assert guarded_step(opened.env, "bye", timeout).done


@pytest.mark.parametrize("timeout", [None, 5.0])
@pytest.mark.parametrize(
    "factory, message",
    [
        (RaisesInInit, "RaisesInInit() raised RuntimeError: no instance"),
        (RaisesInReset, "RaisesInReset.reset(record) raised KeyError: 'prompt'"),
        (ResetReturnsInt, "ResetReturnsInt.reset returned int, not str"),
    ],
)
def test_a_failing_start_ends_the_episode(factory, message, timeout):
    opened = open_episode(factory, RECORD, timeout)
    assert opened.env is None
    assert opened.result == StepResult(None, True, None, {"error": message})


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_a_step_that_raises_or_exits_ends_the_episode(timeout):
    env = open_episode(Exits, RECORD, timeout).env
    result = guarded_step(env, "x", timeout)
    assert result.done and result.info == {"error": "Exits.step raised SystemExit: 2"}


def test_a_step_that_hangs_is_abandoned_on_time():
    env = open_episode(Hangs, RECORD, 1.0).env
    start = time.monotonic()
    result = guarded_step(env, "x", timeout=0.3)
    assert time.monotonic() - start < 2.0
    assert result.done and "did not return within 0.3 s (abandoned" in result.info["error"]
    RELEASE.set()  # let the abandoned thread finish


@pytest.mark.parametrize(
    "value, problem",
    [
        (("obs", False), "tuple, not StepResult"),
        (None, "NoneType, not StepResult"),
        (StepResult(5, False), "an observation of type int"),
        (StepResult("x", "yes"), "done of type str, not bool"),
        (StepResult("x", False, "1"), "a reward of type str"),
        (StepResult("x", False, True), "a reward of type bool"),
        (StepResult("x", False, float("nan")), "a reward of nan"),
        (StepResult("x", False, float("inf")), "a reward of inf"),
        (StepResult("x", False, 1, ["info"]), "info of type list, not dict"),
    ],
)
def test_wrong_return_types_end_the_episode(value, problem):
    assert problem in check_step(value)
    env = Returns()
    env.value = value
    result = guarded_step(env, "x")
    assert result.done and result.info["error"].startswith("Returns.step returned ")
    assert problem in result.info["error"]


def test_well_typed_results_pass():
    assert check_step(StepResult(None, True)) is None
    assert check_step(StepResult("x", False, 1, {"a": 1})) is None
    assert check_step(StepResult("x", False, -0.5)) is None


def test_tally_counts_errors_truncations_and_tool_counts():
    results = [
        StepResult(None, True, None, {"error": "E.step raised ValueError"}),
        StepResult(None, True, None, {"truncated": True}),
        StepResult("r", False, None, {"tool_calls": 3, "tool_errors": 1, "tool_timeouts": 1}),
        StepResult("r", False, None, {"tool_calls": 1}),
        StepResult("r", False),
    ]
    assert tally(results) == {
        "env/errors": 1.0,
        "env/truncated": 1.0,
        "env/tool_calls": 4.0,
        "env/tool_errors": 1.0,
        "env/tool_timeouts": 1.0,
    }


def test_run_episode_stops_on_error_and_on_max_turns():
    episode = run_episode(Exits, RECORD, lambda messages: "x")
    assert episode.error == "Exits.step raised SystemExit: 2"
    assert tally(episode.results)["env/errors"] == 1
    failed_start = run_episode(RaisesInReset, RECORD, lambda messages: "x")
    assert failed_start.messages == () and failed_start.error.startswith("RaisesInReset.reset")

    class Endless(Good):
        def step(self, text):
            return StepResult("more", False)

    endless = run_episode(Endless, RECORD, lambda messages: "x", max_turns=3)
    assert endless.truncated and [m["role"] for m in endless.messages].count("assistant") == 3


# ----------------------------------------------------------------------------- the loader


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


def test_load_environment_by_file_and_module(tmp_path):
    path = write(
        tmp_path / "myenv.py",
        """
        from rlsd.engine.envs import StepResult

        class Echo:
            def reset(self, record):
                return record.prompt

            def step(self, text):
                return StepResult(text, True)
        """,
    )
    cls = load_environment(f"{path}:Echo")
    assert cls.__name__ == "Echo" and cls().reset(RECORD) == RECORD.prompt
    assert load_environment("tests.test_envs:Good") is Good


@pytest.mark.parametrize(
    "spec, message",
    [
        ("Echo", "'Echo' is not 'file.py:Class' or 'package.module:Class'"),
        ("missing_dir/none.py:Echo", "file not found: missing_dir/none.py"),
        ("no_such_module_xyz:Echo", "cannot import 'no_such_module_xyz'"),
        ("tests.test_envs:Absent", "'tests.test_envs' has no class 'Absent'"),
        ("tests.test_envs:write", "is a function, not a class"),
        ("tests.test_envs:Malformed", "has no method reset or step"),
        ("tests.test_envs:NeedsArgs", "cannot be built without arguments"),
    ],
)
def test_load_environment_errors_name_the_spec(spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        load_environment(spec)
    assert str(caught.value).startswith("env.environment: ")


class NeedsArgs(Good):
    def __init__(self, size):
        self.size = size


def test_load_environment_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path / "broken.py", "class Env:\n    def reset(self, record)\n")
    with pytest.raises(ConfigError, match=r"env\.environment: .*broken\.py:2: syntax error"):
        load_environment(f"{path}:Env")


# ----------------------------------------------------------------------------- the docs' example


def docs_environment() -> str:
    """The first python block of docs/agents.md that defines a class."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.DOTALL)
    return next(b for b in blocks if "\nclass " in b)


def bisect_policy(messages):
    """Guess by halving [1, 100] from the hints so far."""
    low, high = 1, 100
    guesses = [int(re.findall(r"\d+", m["content"])[-1]) for m in messages[1::2]]
    hints = [m["content"] for m in messages[2::2]]
    for guess, hint in zip(guesses, hints):
        low, high = (guess + 1, high) if "higher" in hint else (low, guess - 1)
    return f"Answer: {(low + high) // 2}"


def test_the_docs_environment_loads_and_plays(tmp_path):
    source = docs_environment()
    assert len(source.strip().splitlines()) <= 25  # a short environment
    path = tmp_path / "guess.py"
    path.write_text(source)
    cls = load_environment(f"{path}:GuessTheNumber")
    for target in (1, 37, 64, 100):
        record = Record("Guess my number between 1 and 100.", str(target))
        episode = run_episode(cls, record, bisect_policy, timeout=5.0)
        assert episode.reward == 1.0 and episode.final == f"Answer: {target}"
        assert not episode.truncated and episode.error is None
    wrong = run_episode(cls, Record("Guess.", "50"), lambda messages: "7", timeout=5.0)
    assert wrong.truncated and wrong.reward == 0.0 and len(wrong.results) == 8
    assert wrong.messages[2] == {"role": "user", "content": "No: the number is higher."}
