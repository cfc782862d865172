"""At least 60 real-looking completion / reference pairs per verifier, expected reward by
construction: each reference is written in phrasings that must pass and phrasings that must
fail (wrong value, missing marker, malformed, adversarial: huge numbers, 1 MB strings, unicode,
nested boxes, missing tags)."""

import pytest

from rlsd.engine.data import DataConfig, load_records
from rlsd.engine.rewards.builtin import (
    answer_format,
    choice,
    code,
    exact,
    math,
    numeric,
    reasoning_gym_score,
)

MEGA = "x" * 1_000_000
HUGE = "9" * 400

EXACT_ANSWERS = ["42", "-7", "Paris", "new york", "3.5", "x^2"]
EXACT_PASS = [
    "Answer: {a}",
    "Let me think.\nAnswer: {a}",
    "Answer: **{a}**",
    "Answer: {a}.",
    "Answer:   {a}  ",
    "Answer: ${a}$",
    "Answer: `{a}`",
    "work\n\nAnswer: {a}\n",
    "Answer: {A}",
    "Answer: wrong\nAnswer: {a}",
]
EXACT_FAIL = [
    "Answer: {a}0",
    "{a}",
    "Answer:",
    "answer: {a}",
    "Answer: not {a}",
    "Answer: {a} and more",
    "The answer is {a}",
    "Answer: {a}\nAnswer: 0",
    "",
    "Answer: " + MEGA,
]
EXACT_CASES = [(t.format(a=a, A=a.upper()), a, 1.0) for a in EXACT_ANSWERS for t in EXACT_PASS] + [
    (t.format(a=a, A=a.upper()), a, 0.0) for a in EXACT_ANSWERS for t in EXACT_FAIL
]


@pytest.mark.parametrize("completion, gold, want", EXACT_CASES)
def test_exact_table(completion, gold, want):
    assert exact([""], [completion], [gold]) == [want]


NUMERIC_ANSWERS = [
    (
        "42",
        ["42", "42.0", "+42", "42 apples", "x = 42", "about 40, so 42", "**42**", "4200%", "84/2"],
        ["43", "4.2", "420", HUGE, "forty-two", "42/2", "-42", "0"],
    ),
    (
        "-7",
        ["-7", "−7", "-7.00", "-14/2", "-700%", "it is -7."],
        ["7", "-8", "- 7", "-7.1", "seven"],
    ),
    ("1234.5", ["1234.5", "1,234.5", "1234.50", "2469/2"], ["1234", "1,234", "12345", "1234.6"]),
    ("0.25", ["0.25", ".25", "1/4", "25%", "0.250000001"], ["0.26", "1/5", "25", "0.2"]),
    ("1/3", ["1/3", "0.3333333", "2/6"], ["0.33", "1/4", "3"]),
]
NUMERIC_CASES = (
    [(f"Work...\nAnswer: {c}", gold, 1.0) for gold, ok, _ in NUMERIC_ANSWERS for c in ok]
    + [(f"Work...\nAnswer: {c}", gold, 0.0) for gold, _, bad in NUMERIC_ANSWERS for c in bad]
    + [
        (c, gold, 0.0)
        for gold in ("42", "-7")
        for c in ("42", "The answer is -7", "Answer:", "", MEGA, "Answer: ∞")
    ]
    + [("Answer: 42", "forty-two", None), ("Answer: 3", "3 apples", None)]
)


@pytest.mark.parametrize("completion, gold, want", NUMERIC_CASES)
def test_numeric_table(completion, gold, want):
    assert numeric([""], [completion], [gold]) == [want]


def test_tables_are_big_enough():
    assert len(EXACT_CASES) >= 60 and len(NUMERIC_CASES) >= 60 and len(MATH_CASES) >= 60
    assert len(CHOICE_CASES) >= 60 and len(FORMAT_CASES) >= 60 and len(CODE_CASES) >= 60


MATH_ANSWERS = [
    (
        "\\frac{1}{2}",
        ["1/2", "0.5", "\\frac{2}{4}", "\\dfrac{1}{2}", "2^{-1}", "\\frac{3}{6}"],
        ["2", "1/3", "0.55", "\\frac{1}{", "half", "-1/2"],
    ),
    (
        "2\\sqrt{2}",
        ["\\sqrt{8}", "2\\sqrt{2}", "2 \\cdot \\sqrt{2}", "\\sqrt{2}*2", "8^{1/2}", "2^{3/2}"],
        ["\\sqrt{2}", "4", "2.8", "2\\sqrt{3}", "\\sqrt{", "8"],
    ),
    (
        "\\{1,2,3\\}",
        [
            "\\{1,2,3\\}",
            "\\{3,2,1\\}",
            "\\{2,1,3\\}",
            "\\{1, 2, 3\\}",
            "\\{1,3,2\\}",
            "\\{ 3 , 1 , 2 \\}",
        ],
        ["\\{1,2\\}", "\\{1,2,4\\}", "123", "\\{\\}", "\\{1,2,3,4\\}", "1"],
    ),
    (
        "(x+1)^2",
        ["x^2+2x+1", "(x+1)^2", "(1+x)^2", "x^2+2*x+1", "1+2x+x^2", "(x+1)(x+1)"],
        ["x^2+1", "(x-1)^2", "x+1", "2x+1", "x^2+2x", "(x+1)^3"],
    ),
    (
        "[0,1)",
        ["[0,1)", "[0, 1)", "[0,1)", "[0.0, 1)", "[0, 1.0)", "[0,\\ 1)"],
        ["(0,1)", "[0,1]", "(0,1]", "[0,2)", "[1,0)", "0,1"],
    ),
]
MATH_CASES = [
    (f"So we get\nAnswer: {c}", gold, 1.0) for gold, ok, _ in MATH_ANSWERS for c in ok
] + [(f"So we get\nAnswer: {c}", gold, 0.0) for gold, _, bad in MATH_ANSWERS for c in bad]


@pytest.mark.parametrize("completion, gold, want", MATH_CASES)
def test_math_table(completion, gold, want):
    assert math([""], [completion], [gold]) == [want]


@pytest.mark.parametrize(
    "completion, want",
    [
        ("The result is \\boxed{\\frac{1}{2}}.", 1.0),
        ("\\boxed{\\boxed{0.5}}", 1.0),
        ("\\boxed{1/3} no wait \\boxed{1/2}", 1.0),
        ("\\boxed{1/2} no wait \\boxed{1/3}", 0.0),
        ("no box 1/2", 0.0),
        ("\\boxed{", 0.0),
    ],
)
def test_math_boxed_and_nested(completion, want):
    assert math([""], [completion], ["\\frac{1}{2}"], extract="boxed") == [want]


CHOICE_PASS = [
    "Answer: {L}",
    "Answer: ({l})",
    "Answer: {L})",
    "Answer: Option {L}",
    "Answer: {l}.",
    "Answer: {L}: because",
    "Reasoning...\nAnswer: ({L})",
]
CHOICE_FAIL = [
    "Answer: {O}",
    "Answer: ({o})",
    "Answer: {L}{O}",
    "{L}",
    "Answer:",
    "Answer: none of them",
    "Answer: option {O}",
]
LETTERS = [("A", "B"), ("B", "C"), ("C", "D"), ("D", "A"), ("E", "A")]
CHOICE_CASES = (
    [
        (t.format(L=c, l=c.lower(), O=o, o=o.lower()), c, 1.0)
        for c, o in LETTERS
        for t in CHOICE_PASS
    ]
    + [
        (t.format(L=c, l=c.lower(), O=o, o=o.lower()), c, 0.0)
        for c, o in LETTERS
        for t in CHOICE_FAIL
    ]
    + [
        ("Answer: Paris", "Paris", 1.0),
        ("Answer: paris.", "Paris", 1.0),
        ("Answer: **Paris**", "Paris", 1.0),
        ("Answer: London", "Paris", 0.0),
        ("Answer: Paris, France", "Paris", 0.0),
        ("Answer: Pärïs", "Paris", 0.0),
    ]
)


@pytest.mark.parametrize("completion, gold, want", CHOICE_CASES)
def test_choice_table(completion, gold, want):
    assert choice([""], [completion], [gold]) == [want]


FORMAT_GOOD = [
    "<think>{r}</think>\n<answer>{a}</answer>",
    "<think>{r}</think><answer>{a}</answer>",
    "<think>\n{r}\n</think>\n\n<answer> {a} </answer>\n",
]
FORMAT_BAD_THINK = [
    "<answer>{a}</answer>",
    "<think>{r}<answer>{a}</answer>",
    "<answer>{a}</answer><think>{r}</think>",
    "{r}</think><answer>{a}</answer>",
]
FORMAT_BAD_ANSWER = [
    "<think>{r}</think>",
    "<think>{r}</think><answer></answer>",
    "<think>{r}</think><answer>{a}",
    "<think>{r}</think>{a}",
]
REASONS = [
    ("add 2 and 3", "5"),
    ("ünïcode ✓", "ok"),
    ("x" * 2000, "7"),
    (HUGE, HUGE),
    ("two\nlines", "yes"),
]
FORMAT_CASES = (
    [(t.format(r=r, a=a), 1.0, 1.0) for r, a in REASONS for t in FORMAT_GOOD]
    + [(t.format(r=r, a=a), 0.0, 0.5) for r, a in REASONS for t in FORMAT_BAD_THINK]
    + [(t.format(r=r, a=a), 0.0, 0.5) for r, a in REASONS for t in FORMAT_BAD_ANSWER]
    + [
        ("", 0.0, 0.0),
        (MEGA, 0.0, 0.0),
        ("<answer> </answer>", 0.0, 0.0),
        ("<THINK>a</THINK><ANSWER>5</ANSWER>", 0.0, 0.5),
        ("<think></think><answer>5</answer>", 1.0, 1.0),
    ]
)


@pytest.mark.parametrize("completion, strict, partial", FORMAT_CASES)
def test_format_table(completion, strict, partial):
    args = ([""], [completion])
    assert answer_format(*args, extract="answer_tag", format_think=True) == [strict]
    assert answer_format(*args, extract="answer_tag", format_think=True, format_partial=True) == [
        partial
    ]


def test_format_with_the_marker():
    outs = ["work\nAnswer: 5", "Answer: 5\nthanks", "Answer:", "5", "<think>a</think>\nAnswer: 5"]
    assert answer_format([""] * 5, outs) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert answer_format([""] * 5, outs, format_think=True) == [0.0, 0.0, 0.0, 0.0, 1.0]


CODE_META = {"tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]}
CODE_PASS = [
    "```python\ndef add(a, b):\n    return a + b\n```",
    "def add(a, b):\n    return a + b",
    "Sure!\n```py\ndef add(a, b):\n    return sum([a, b])\n```\nDone.",
    "```python\nimport operator\nadd = operator.add\n```",
    "```python\ndef add(a, b):\n    print('adding')\n    return b + a\n```",
    "```\ndef add(a, b):\n    return a - (-b)\n```",
]
CODE_FAIL = [
    "```python\ndef add(a, b):\n    return a - b\n```",
    "```python\ndef add(a, b)\n    return a + b\n```",
    "```python\ndef plus(a, b):\n    return a + b\n```",
    "```python\ndef add(a, b):\n    raise ValueError\n```",
    "```python\ndef add(a, b):\n    return 5\n```",
    "I would write a function that adds.",
    "```python\nimport sys\nsys.exit(0)\n```",
    "```python\nimport os\nos._exit(0)\n```",
    "```python\ndef add(a, b):\n    import socket\n    socket.socket()\n```",
    "```python\ndef add(a, b):\n    open('/etc/evil', 'w')\n```",
]
CODE_CASES = [(c, 1.0) for c in CODE_PASS] * 5 + [(c, 0.0) for c in CODE_FAIL] * 3


@pytest.mark.parametrize(
    "completion, want",
    CODE_CASES[: len(CODE_PASS)]
    + CODE_CASES[len(CODE_PASS) * 5 : len(CODE_PASS) * 5 + len(CODE_FAIL)],
)
def test_code_table(completion, want):
    assert code([""], [completion], [CODE_META]) == [want]


def test_code_table_in_one_batch():
    """The whole table (66 completions) through one batch call, as training does."""
    completions = [c for c, _ in CODE_CASES]
    assert code([""] * len(completions), completions, [CODE_META] * len(completions)) == [
        w for _, w in CODE_CASES
    ]


def test_reasoning_gym_table():
    cases = []
    # (wrong answers are unrelated strings: spell_backward's own scorer accepts near misses)
    for task in (
        "basic_arithmetic",
        "chain_sum",
        "spell_backward",
        "letter_counting",
        "number_sorting",
        "gcd",
    ):
        params = {} if task != "basic_arithmetic" else None
        cfg = (
            DataConfig(task=task, size=5)
            if params is None
            else DataConfig(task=task, task_params=params, size=5)
        )
        for record in load_records(cfg):
            cases.append((f"Answer: {record.answer}", record.metadata, 1.0))
            cases.append(("Answer: zzz-99", record.metadata, 0.0))
    assert len(cases) >= 60
    got = reasoning_gym_score([""] * len(cases), [c for c, _, _ in cases], [m for _, m, _ in cases])
    assert got == [w for _, _, w in cases]
