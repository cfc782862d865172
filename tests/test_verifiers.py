"""Verifiers on real-looking completions, answer extraction, and the safe verifier runner."""

import json

import pytest

from rlsd.engine.rewards import build_reward, extract_answer
from rlsd.engine.rewards.builtin import choice, exact, math, numeric, regex
from rlsd.schema.config import RewardConfig, load_config

from .conftest import TESTS_DIR

HUGE = "9" * 5000


@pytest.mark.parametrize(
    "text, mode, want",
    [
        ("so the total is\nAnswer: 42", "marker", "42"),
        ("Answer: 1\nthen more\nAnswer: **-7**.", "marker", "-7"),
        ("Answer:", "marker", ""),
        ("no marker", "marker", None),
        ("Answer: Hello World", "marker", "Hello World"),  # case kept for case-sensitive tasks
        ("x \\boxed{\\frac{1}{2}} and \\boxed{3}", "boxed", "3"),
        ("nested \\boxed{\\{1, \\{2\\}\\}} end", "boxed", "\\{1, \\{2\\}\\}"),
        ("\\boxed{a{b}c}", "boxed", "a{b}c"),
        ("unbalanced \\boxed{oops", "boxed", None),
        ("<answer> 5 </answer> ... <answer>6</answer>", "answer_tag", "6"),
        ("<ANSWER>7</ANSWER>", "answer_tag", "7"),
        ("<answer>8", "answer_tag", None),
        ("1, 2 and finally -3.5", "last_number", "-3.5"),
        ("costs 1,234 dollars", "last_number", "1,234"),
        ("nothing here", "last_number", None),
        ("  whole reply  ", "none", "whole reply"),
    ],
)
def test_extraction(text, mode, want):
    assert extract_answer(text, mode) == want


EXACT = [
    ("Answer: 19", "19", 1.0),
    ("Answer: 19.", "19", 1.0),
    ("Answer: **19**", "19", 1.0),
    ("Answer: $19$", "19", 1.0),
    ("Answer:   PARIS", "paris", 1.0),
    ("Answer: new  york", "New York", 1.0),
    ("Answer: 190", "19", 0.0),
    ("Answer: 19 apples", "19", 0.0),
    ("19", "19", 0.0),
    ("", "19", 0.0),
    ("Answer: " + HUGE, "19", 0.0),
    ("Answer: ünïcode", "ÜNÏCODE", 1.0),
    ("answer: 19", "19", 0.0),
    ("Answer: 19\nAnswer: 20", "20", 1.0),
]


@pytest.mark.parametrize("completion, gold, want", EXACT)
def test_exact(completion, gold, want):
    assert exact([""], [completion], [gold]) == [want]


NUMERIC = [
    ("Answer: 19", "19", 1.0),
    ("Answer: 19.0", "19", 1.0),
    ("Answer: 1,234", "1234", 1.0),
    ("Answer: -45", "-45", 1.0),
    ("Answer: −45", "-45", 1.0),
    ("Answer: 3/4", "0.75", 1.0),
    ("Answer: 0.75", "3/4", 1.0),
    ("Answer: 50%", "0.5", 1.0),
    ("Answer: .5", "0.5", 1.0),
    ("Answer: x = 7", "7", 1.0),
    ("Answer: 7 (approx 7.1)", "7", 0.0),
    ("Answer: 19.0000001", "19", 1.0),
    ("Answer: 19.01", "19", 0.0),
    ("Answer: twenty", "20", 0.0),
    ("20", "20", 0.0),
    ("Answer: " + HUGE, "19", 0.0),
    ("Answer: 1e3", "1000", 0.0),
    ("Answer: 5", "five", None),
]


@pytest.mark.parametrize("completion, gold, want", NUMERIC)
def test_numeric(completion, gold, want):
    assert numeric([""], [completion], [gold]) == [want]


def test_numeric_relative_tolerance():
    assert numeric([""], ["Answer: 1010"], ["1000"], rel_tolerance=0.02) == [1.0]
    assert numeric([""], ["Answer: 1030"], ["1000"], rel_tolerance=0.02) == [0.0]


MATH = [
    ("Answer: 1/2", "\\frac{1}{2}", 1.0),
    ("Answer: 0.5", "\\frac{1}{2}", 1.0),
    ("Answer: \\frac{2}{4}", "1/2", 1.0),
    ("Answer: 2\\sqrt{2}", "\\sqrt{8}", 1.0),
    ("Answer: x^2+2x+1", "(x+1)^2", 1.0),
    ("Answer: \\{1,2,3\\}", "\\{3,2,1\\}", 1.0),
    ("Answer: [0, 1)", "[0,1)", 1.0),
    ("Answer: 3", "4", 0.0),
    ("Answer: \\pi", "3.14159", 0.0),
    ("no answer", "1", 0.0),
    ("Answer: \\frac{1}{", "1", 0.0),
]


@pytest.mark.parametrize("completion, gold, want", MATH)
def test_math(completion, gold, want):
    assert math([""], [completion], [gold]) == [want]


def test_math_boxed_extraction():
    assert math([""], ["so \\boxed{\\dfrac{3}{6}}"], ["0.5"], extract="boxed") == [1.0]


CHOICE = [
    ("Answer: B", "B", 1.0),
    ("Answer: (b)", "B", 1.0),
    ("Answer: B) Paris", "B", 1.0),
    ("Answer: Option B", "B", 1.0),
    ("Answer: b.", "B", 1.0),
    ("Answer: C", "B", 0.0),
    ("Answer: Paris", "Paris", 1.0),
    ("Answer: paris.", "Paris", 1.0),
    ("Answer: London", "Paris", 0.0),
    ("Answer: BC", "B", 0.0),
    ("no", "B", 0.0),
]


@pytest.mark.parametrize("completion, gold, want", CHOICE)
def test_choice(completion, gold, want):
    assert choice([""], [completion], [gold]) == [want]


def test_regex():
    outs = ["Answer: 2024-01-31", "Answer: 31/01/2024", "Answer: 2024-1-31 ", "none"]
    assert regex([""] * 4, outs, pattern=r"\d{4}-\d{2}-\d{2}") == [1.0, 0.0, 0.0, 0.0]


def cfg_with(*verifiers, **extra):
    return RewardConfig(
        verifiers=[f"{TESTS_DIR / 'rewards_for_tests.py'}:{v}" for v in verifiers], **extra
    )


def test_hung_crashing_and_garbage_verifiers_become_none_and_are_counted():
    sleepy = build_reward(cfg_with("sleepy_reward", timeout=0.3))
    rewards, _correct, metrics = sleepy(["p"] * 3, ["a", "b", "c"], {"answer": ["1"] * 3})
    assert rewards == [0.0] * 3 and metrics["reward/timeouts"] == 3
    garbage = build_reward(cfg_with("garbage_reward"))
    rewards, _, metrics = garbage(["p"] * 2, ["1", "2"], {"answer": ["1", "2"]})
    assert rewards == [0.0, 0.0] and metrics["reward/errors"] == 2  # "yes" and NaN: garbage
    assert metrics["reward/unjudged"] == 2


def test_slow_verifiers_run_concurrently():
    import time

    slow = build_reward(cfg_with("sleepy_reward", timeout=0.5, workers=16))
    start = time.monotonic()
    slow(["p"] * 16, ["x"] * 16, {"answer": ["1"] * 16})
    assert time.monotonic() - start < 2.0  # one wave of 16, not 16 x 0.5 s


def test_training_survives_a_flaky_and_a_hung_verifier(tiny_overrides):
    from rlsd.step.trainer import train

    verifiers = ",".join(
        f"{TESTS_DIR / 'rewards_for_tests.py'}:{v}" for v in ("flaky_reward", "sleepy_reward")
    )
    overrides = {"reward.verifiers": verifiers, "reward.timeout": "0.2", "reward.workers": "1"}
    run_dir = train(load_config(None, {**tiny_overrides, **overrides}))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # every third call raised: the 3rd and 6th of each step's 8, counted in the one worker
    # process (a user verifier's module state lives in its worker; the hung verifier's
    # time-outs replace that worker, so each step starts counting afresh)
    assert [r["reward/errors"] for r in rows] == [2, 2]
    assert all(r["reward/timeouts"] == 8 for r in rows)  # the hung verifier, every completion


@pytest.mark.parametrize(
    "task", ["basic_arithmetic", "chain_sum", "spell_backward", "gsm_symbolic"]
)
def test_check_reward_accepts_the_references(task, capsys):
    from rlsd.commands.cli import main

    params = [] if task == "basic_arithmetic" else ["--data.task_params", "{}"]
    code = main(
        [
            "check-reward",
            "--limit",
            "100",
            "--data.task",
            task,
            *params,
            "--reward.verifiers",
            "reasoning_gym,exact",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "100 of 100 references accepted (100.0 %)" in out


@pytest.mark.parametrize("extract", ["marker", "boxed", "answer_tag"])
def test_check_reward_writes_references_where_the_extraction_looks(extract):
    from rlsd.commands.check_reward import check_references

    cfg = load_config(
        None, {"reward.verifiers": "numeric", "reward.extract": extract, "data.size": "50"}
    )
    result = check_references(cfg)
    assert result.total == 50 and result.fraction == 1.0


def test_check_reward_flags_a_misconfigured_verifier(capsys):
    from rlsd.commands.cli import main

    code = main(
        [
            "check-reward",
            "--limit",
            "20",
            "--data.task",
            "spell_backward",
            "--data.task_params",
            "{}",
            "--reward.verifiers",
            "numeric",
        ]
    )  # words: no number
    captured = capsys.readouterr()
    assert code == 1 and "rejects" in captured.err and "rejected: answer" in captured.out


def test_tasks_lists_sources_and_every_verifier(capsys):
    from rlsd.commands.cli import main
    from rlsd.engine.rewards import BUILTIN

    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "reasoning_gym" in out and "basic_arithmetic" not in out
    assert all(f"  {name} " in out for name in BUILTIN)
    assert main(["tasks", "--all"]) == 0 and "basic_arithmetic" in capsys.readouterr().out


def test_check_reward_accepts_every_humaneval_reference():
    from rlsd.commands.check_reward import check_references

    result = check_references(load_config("configs/humaneval.yaml"))
    assert (result.total, result.accepted) == (164, 164)
