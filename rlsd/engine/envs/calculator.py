"""The `calculator` built-in: a safe `calculate` tool, multi-step arithmetic tasks, and expert
episodes that call the tool at each step.

`calculate(expression)` evaluates arithmetic with a parser, never `eval`: Python's `ast` reads
the expression and only numbers (int and float literals), + - * / // % **, unary minus (and
plus) and parentheses are evaluated, exactly (as fractions), with limits: at most
`MAX_LENGTH` characters, whole exponents of at most `MAX_EXPONENT` in size, and no value wider
than `MAX_BITS` bits. Anything else (a name, a call such as `__import__('os')`, an attribute,
a comparison, a string) is refused with a ValueError saying what, and so is a division by zero;
the tool box turns the error into an error result for the model.

`calculator_records(size, seed)` makes tasks as `Record`s: chain sums of 3 to 5 multi-digit
terms (+ and -) and products of two multi-digit factors or three two-digit ones, each step in
the metadata. `expert_turns` is a programmatic policy that computes one step per turn with the
tool, reading each result back from the tool's response, then answers (`Answer: <n>`);
`expert_episode` plays it in the tool environment, so the messages are exactly what the model
would see and write (for `rlsd sft`).
"""

from __future__ import annotations

import ast
import math
import operator
import random
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from ..record import Record
from .calls import render_call, response_texts
from .episode import Episode, run_episode
from .tools import ToolBox, tool_environment

MAX_LENGTH = 200  # characters in an expression
MAX_EXPONENT = 1000  # the largest exponent (in size)
MAX_BITS = 4096  # the widest numerator or denominator of any value on the way
SHOWN_DIGITS = 12  # significant digits shown for a result that is not a finite decimal

_BINARY: dict[type, tuple[str, Callable[[Fraction, Fraction], Fraction]]] = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv),
    ast.FloorDiv: ("//", operator.floordiv),
    ast.Mod: ("%", operator.mod),
}
_REFUSED = {
    ast.Name: "names",
    ast.Call: "function calls",
    ast.Attribute: "attribute access",
    ast.Subscript: "subscripts",
    ast.Compare: "comparisons",
    ast.BoolOp: "and / or",
    ast.Lambda: "lambdas",
}


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly and return the result.

    Args:
        expression: Numbers with + - * / // % ** and parentheses, e.g. "(12 + 30) * 4".
    """
    return format_number(evaluate(expression))


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression; ValueError saying what is not allowed."""
    if not isinstance(expression, str):
        raise ValueError(f"the expression must be text, not {type(expression).__name__}")
    if len(expression) > MAX_LENGTH:
        raise ValueError(f"the expression is longer than {MAX_LENGTH} characters")
    if not expression.strip():
        raise ValueError("the expression is empty")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        message = getattr(exc, "msg", None) or type(exc).__name__
        raise ValueError(f"not an arithmetic expression ({message})") from None
    return _value(tree.body)


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{value!r} is not a number")
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        return _checked(Fraction(repr(value)) if isinstance(value, float) else Fraction(value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _value(node.operand)
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.BinOp):
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        if type(node.op) not in _BINARY:
            symbol = {ast.BitXor: "^ (use ** for powers)", ast.MatMult: "@"}.get(
                type(node.op), type(node.op).__name__
            )
            raise ValueError(f"the operator {symbol} is not allowed")
        try:
            return _checked(_BINARY[type(node.op)][1](left, right))
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
    what = _REFUSED.get(type(node), type(node).__name__)
    raise ValueError(f"not allowed: {what} (only numbers, + - * / // % ** and parentheses)")


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise ValueError("only whole-number exponents are allowed")
    if abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"the exponent {exponent} is larger than {MAX_EXPONENT}")
    if _bits(base) * abs(int(exponent)) > MAX_BITS:
        raise ValueError(f"the result would be wider than {MAX_BITS} bits")
    try:
        return _checked(base ** int(exponent))
    except ZeroDivisionError:
        raise ValueError("division by zero") from None


def _bits(value: Fraction) -> int:
    return max(value.numerator.bit_length(), value.denominator.bit_length())


def _checked(value: Fraction) -> Fraction:
    if _bits(value) > MAX_BITS:
        raise ValueError(f"a value on the way is wider than {MAX_BITS} bits")
    return value


def format_number(value: Fraction) -> str:
    """An integer as its digits, a finite decimal exactly, anything else to SHOWN_DIGITS
    significant digits."""
    if value.denominator == 1:
        return str(value.numerator)
    rest = value.denominator
    for prime in (2, 5):
        while rest % prime == 0:
            rest //= prime
    if rest == 1:  # a finite decimal: scale by 10^k until whole
        k = 0
        while (value * 10**k).denominator != 1:
            k += 1
        digits = str(abs((value * 10**k).numerator)).rjust(k + 1, "0")
        sign = "-" if value < 0 else ""
        return f"{sign}{digits[:-k]}.{digits[-k:]}"
    return format(float(value), f".{SHOWN_DIGITS}g")


# ----------------------------------------------------------------------------- tasks


def calculator_records(size: int, seed: int) -> list[Record]:
    """`size` tasks, deterministic in `seed`: chain sums and multi-digit products, alternating.
    The metadata holds the operands and operators (evaluated left to right); the solution is
    the worked steps (the teacher's privileged context)."""
    rng = random.Random(seed)
    records = []
    for i in range(size):
        if i % 2 == 0:
            operands = [rng.randint(10, 9999) for _ in range(rng.randint(3, 5))]
            operators = [rng.choice("++-") for _ in operands[1:]]
            kind = "sum"
        else:
            count = rng.choice((2, 3))
            top = 999 if count == 2 else 99
            operands = [rng.randint(11, top) for _ in range(count)]
            operators = ["*"] * (count - 1)
            kind = "product"
        records.append(_record(kind, operands, operators))
    return records


def _record(kind: str, operands: list[int], operators: list[str]) -> Record:
    expression = " ".join(
        [str(operands[0])] + [f"{o} {n}" for o, n in zip(operators, operands[1:])]
    )
    steps, total = [], Fraction(operands[0])
    for op, operand in zip(operators, operands[1:]):
        step = f"{format_number(total)} {op} {operand}"
        total = evaluate(step)
        steps.append(f"{step} = {format_number(total)}")
    meta = {"source": "calculator", "kind": kind, "operands": operands, "operators": operators}
    return Record(f"What is {expression}?", format_number(total), "\n".join(steps), meta)


# ----------------------------------------------------------------------------- expert episodes


def expert_turns(record: Record) -> Callable[[list[dict[str, str]]], str]:
    """The expert policy for a calculator record: at each turn, one step (the running total,
    read from the last tool response, with the next operator and operand) as a `calculate`
    call; after the last step, the answer. ValueError when a tool response is not a number
    (the expert never recovers from a failed tool)."""
    operands: list[int] = record.metadata["operands"]
    operators: list[str] = record.metadata["operators"]

    def policy(messages: list[dict[str, str]]) -> str:
        done = sum(m["role"] == "assistant" for m in messages)  # steps already called
        total = str(operands[0]) if done == 0 else _last_result(messages)
        if done == len(operators):
            return f"The result is {total}.\nAnswer: {total}"
        expression = f"{total} {operators[done]} {operands[done + 1]}"
        call = render_call("calculate", {"expression": expression})
        return f"Step {done + 1}: {expression}\n{call}"

    return policy


def _last_result(messages: list[dict[str, Any]]) -> str:
    texts = response_texts(messages[-1]["content"]) if messages[-1]["role"] != "assistant" else []
    if len(texts) != 1:
        raise ValueError(f"expected one tool response, got: {messages[-1]['content'][:200]!r}")
    evaluate(texts[0])  # a number, or ValueError
    return texts[0].strip()


def expert_episode(record: Record, toolbox: ToolBox, max_turns: int = 8) -> Episode:
    """The expert's episode on `record` in the tool environment of `toolbox` (whose tools
    include `calculate`): user, then assistant and tool messages, ending in the answer."""
    factory = tool_environment(toolbox, max_turns)
    return run_episode(factory, record, expert_turns(record), max_turns, observation_role="tool")


TOOLS = [calculate]
