"""Worked solutions: every generated solution's final answer passes the task's own verifier,
every step is correct arithmetic (checked by a naive re-computation), and `data.solutions:
worked` gives each record its solution."""

import re
from fractions import Fraction

import pytest
import reasoning_gym

from rlsd.engine.data import load_records
from rlsd.engine.rewards.builtin import exact, extract_answer
from rlsd.engine.tasks.worked import Unsupported, arithmetic_solution, worked_solution
from rlsd.schema.config import ConfigError, load_config

FAMILIES = [
    ("chain_sum", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}),
    ("chain_sum", {"min_terms": 2, "max_terms": 6, "min_digits": 1, "max_digits": 4}),
    ("basic_arithmetic", {}),  # + - * /, parentheses and negation: reasoning-gym's defaults
    ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "operators": ["+", "-"]}),
    ("leg_counting", {}),
    ("letter_counting", {"min_words": 3, "max_words": 20}),
]
STEP = re.compile(r"^(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)$")


def check_steps(task: str, solution: str) -> int:
    """Re-compute every step line naively; returns how many lines were checked."""
    checked = 0
    for line in solution.splitlines()[:-1]:
        match = STEP.match(line)
        if task in ("chain_sum", "basic_arithmetic"):
            assert match, line
        if match:
            a, op, b, c = match.groups()
            a, b = Fraction(a), Fraction(b)
            want = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
            assert want == Fraction(c), line
            checked += 1
    return checked


@pytest.mark.parametrize("task,params", FAMILIES)
def test_every_worked_solution_passes_the_tasks_own_verifier(task, params):
    dataset = reasoning_gym.create_dataset(task, size=300, seed=3, **params)
    score = reasoning_gym.get_score_answer_fn(task)
    solved = steps = 0
    for item in dataset:
        try:
            solution = worked_solution(task, item)
        except Unsupported as exc:
            assert "division" in str(exc) or "non-integer" in str(exc), exc
            continue
        solved += 1
        answer = extract_answer(solution, "marker", "Answer:")
        assert score(answer, item) >= 1.0, (item["question"], solution)
        assert exact([""], [solution], [item["answer"]]) == [1.0]
        assert len(solution.splitlines()) >= 2  # at least one step before the answer
        steps += check_steps(task, solution)
    assert solved >= 200, f"only {solved} of 300 {task} items solved"
    if task != "letter_counting":
        assert steps >= solved  # arithmetic steps were checked, at least one per item


def test_arithmetic_steps_follow_precedence_and_parentheses_by_hand():
    lines, answer = arithmetic_solution("2 + -3 * -8")
    assert lines == ["-3 * -8 = 24", "2 + 24 = 26"] and answer == "26"
    lines, answer = arithmetic_solution("-( 4 - 9 ) * 2 =")
    assert lines == ["4 - 9 = -5", "5 * 2 = 10"] and answer == "10"
    lines, answer = arithmetic_solution("0 - 4 - 8")
    assert lines == ["0 - 4 = -4", "-4 - 8 = -12"] and answer == "-12"
    with pytest.raises(Unsupported, match="inexact division"):
        arithmetic_solution("7 / 2")
    with pytest.raises(Unsupported, match="unsupported"):
        arithmetic_solution("__import__('os')")  # read with ast, never evaluated


def test_data_solutions_worked_gives_each_record_its_solution():
    cfg = load_config(
        None,
        {
            "data.solutions": "worked",
            "data.task": "chain_sum",
            "data.task_params": "{min_terms: 3, max_terms: 3, min_digits: 1, max_digits: 1}",
            "data.size": "20",
        },
    )
    records = load_records(cfg.data)
    assert all(r.solution.endswith(f"Answer: {r.answer}") for r in records)
    assert all(r.solution.count("\n") == 2 for r in records)  # two steps, then the answer
    with pytest.raises(ConfigError, match="no worked solutions for 'gcd'"):
        load_records(
            load_config(
                None,
                {
                    "data.solutions": "worked",
                    "data.task": "gcd",
                    "data.task_params": "{}",
                    "data.size": "3",
                },
            ).data
        )
    with pytest.raises(ConfigError, match="data.solutions: worked solutions are generated"):
        load_config(None, {"data.solutions": "worked", "data.source": "humaneval"})
