"""Worked solutions for built-in tasks: a correct step-by-step solution per item, computed from
the item itself, offered as the record's `solution` (`data.solutions: worked`).

An answer alone tells the teacher nothing about the intermediate steps; a worked solution lets
its Delta fall where a wrong attempt departs from a right one. Every solution ends with the
line the default prompt asks for ("Answer: <answer>"), and its final answer equals the item's
reference (checked when it is built, and by the task's own verifier in the tests).

- `chain_sum`, `basic_arithmetic`: one operation per line, in evaluation order (precedence and
  parentheses respected), each with its intermediate result: "4 - 1 = 3", "3 - 7 = -4".
- `leg_counting`: each animal's legs times its count, then the running total.
- `letter_counting`: each word with its count of the letter (case-insensitive, as the task
  counts), then the running total over the words that hold it.

The expressions are read with Python's `ast` (numbers, unary minus, + - * and exact integer
division only); nothing is evaluated with `eval`.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from fractions import Fraction
from typing import Any

OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
APPLY: dict[str, Callable[[Fraction, Fraction], Fraction]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
}


class Unsupported(ValueError):
    """The item has a shape the generator does not handle (e.g. inexact division)."""


def _number(value: Fraction) -> str:
    if value.denominator != 1:
        raise Unsupported(f"non-integer intermediate result {value}")
    return str(value.numerator)


def _steps(node: ast.AST, lines: list[str]) -> tuple[Fraction, str]:
    """Evaluate `node` post-order, appending one line per binary operation; returns its value
    and how it is written in the line that uses it."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        value = Fraction(node.value)
        return value, _number(value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value, _ = _steps(node.operand, lines)
        return -value, _number(-value)
    if isinstance(node, ast.BinOp) and type(node.op) in OPS:
        left, left_text = _steps(node.left, lines)
        right, right_text = _steps(node.right, lines)
        op = OPS[type(node.op)]
        if op == "/" and (right == 0 or (left / right).denominator != 1):
            raise Unsupported(f"inexact division {left} / {right}")
        value = APPLY[op](left, right)
        lines.append(f"{left_text} {op} {right_text} = {_number(value)}")
        return value, _number(value)
    raise Unsupported(f"unsupported expression part {ast.dump(node)[:60]}")


def arithmetic_solution(expression: str) -> tuple[list[str], str]:
    """Step lines and the final answer of an arithmetic expression."""
    try:
        tree = ast.parse(expression.strip().rstrip("="), mode="eval").body
    except SyntaxError as exc:
        raise Unsupported(f"cannot parse {expression!r}: {exc.msg}") from None
    lines: list[str] = []
    value, text = _steps(tree, lines)
    return lines or [f"{expression.strip()} = {text}"], _number(value)


def legs_solution(animals: dict[str, int]) -> tuple[list[str], str]:
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    parts = [(animal, count, ANIMALS[animal]) for animal, count in animals.items()]
    lines = [f"{count} {animal} x {legs} legs = {count * legs}" for animal, count, legs in parts]
    products = [count * legs for _, count, legs in parts]
    total = products[0] if products else 0
    for part in products[1:]:
        lines.append(f"{total} + {part} = {total + part}")
        total += part
    return lines, str(total)


def letters_solution(letter: str, words: list[str]) -> tuple[list[str], str]:
    lines, total = [], 0
    for word in words:
        count = word.lower().count(letter)
        if count:
            lines.append(f"{word}: {count}" + (f", total {total + count}" if total else ""))
            total += count
    return lines or [f'no word holds "{letter}"'], str(total)


GENERATORS: dict[str, Callable[[dict[str, Any]], tuple[list[str], str]]] = {
    "chain_sum": lambda meta: arithmetic_solution(meta["expression"]),
    "basic_arithmetic": lambda meta: arithmetic_solution(meta["expression"]),
    "leg_counting": lambda meta: legs_solution(meta["animals"]),
    "letter_counting": lambda meta: letters_solution(meta["target_letter"], meta["span"]),
}


def worked_solution(task: str, item: dict[str, Any], marker: str = "Answer:") -> str:
    """The worked solution of one reasoning-gym item, ending with "<marker> <answer>"."""
    if task not in GENERATORS:
        raise Unsupported(f"no worked solutions for {task!r} (have: {', '.join(GENERATORS)})")
    lines, answer = GENERATORS[task](item["metadata"])
    if answer != str(item["answer"]).strip():
        raise Unsupported(f"computed {answer}, the item says {item['answer']}")
    return "\n".join([*lines, f"{marker} {answer}"])
