"""A forged code verdict through the iterator protocol: a candidate that raises StopIteration
inside a test that calls it through map(), filter() or a for loop over an iterator would end
that iteration early and pass the test. Treated as PEP 479 treats a generator's: a RuntimeError,
so the test fails. Asserted on the score the code verifier gives (the verdict the trainer sees)."""

import os

import pytest

from rlsd.engine.rewards import sandbox
from rlsd.engine.rewards.builtin import code

PROBLEM = sandbox.sandbox_problem("bubblewrap")
if PROBLEM is not None:  # CI installs bubblewrap and sets RLSD_REQUIRE_SANDBOX=1: fail there
    if os.environ.get("RLSD_REQUIRE_SANDBOX") == "1":
        raise RuntimeError(f"RLSD_REQUIRE_SANDBOX=1 but {PROBLEM}")
    pytest.skip(f"no sandbox on this machine: {PROBLEM}", allow_module_level=True)

CHECKS = {
    "all_map": "    assert all(map(lambda x: candidate(x) == x * x, [2, 3, 4]))\n",
    "filter": "    assert not list(filter(lambda x: candidate(x) != x * x, [2, 3, 4]))\n",
    "for_over_map": "    for got, x in zip(map(candidate, [2, 3]), [2, 3]):\n"
    "        assert got == x * x\n",
    "sum_map": "    assert sum(map(candidate, [2, 3])) == 13\n",
}
HUMANEVAL = {"prompt_code": "def f(x):\n    '''x squared.'''\n", "entry_point": "f"}
RAISES = {
    "stop_iteration": "def f(x):\n    raise StopIteration",
    "stop_iteration_subclass": "class Done(StopIteration):\n    pass\ndef f(x):\n    raise Done()",
    "next_of_empty": "def f(x):\n    return next(iter([]))",
    "stop_async_iteration": "def f(x):\n    raise StopAsyncIteration",
}
RIGHT = "def f(x):\n    return x * x"


@pytest.mark.parametrize("how", sorted(RAISES))
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_stop_iteration_from_the_candidate_fails_a_humaneval_check(check, how):
    meta = {**HUMANEVAL, "test": f"def check(candidate):\n{CHECKS[check]}"}
    assert code([""] * 2, [RAISES[how], RIGHT], [meta] * 2) == [0.0, 1.0]


@pytest.mark.parametrize("how", sorted(RAISES))
def test_stop_iteration_is_not_counted_as_a_pass_by_pass_fraction(how):
    tests = [
        "assert all(map(lambda x: f(x) == x * x, [2, 3]))",
        "assert not list(filter(lambda x: f(x) != x * x, [2, 3]))",
        "assert f(0) == 0 or True",  # a test that passes whatever f does... unless f raises
    ]
    metadata = [{"tests": tests}] * 2
    scores = code([""] * 2, [RAISES[how], RIGHT], metadata, code_score="pass_fraction")
    assert scores == [0.0, 1.0]


def test_a_test_may_still_catch_the_runtime_error():
    """What PEP 479 gives a generator: the StopIteration arrives as a RuntimeError (with the
    original's name in its message), which a test may expect."""
    tests = [
        "try:\n    f(1)\nexcept RuntimeError as e:\n    assert 'StopIteration' in str(e)\n"
        "else:\n    raise AssertionError"
    ]
    assert code([""], [RAISES["stop_iteration"]], [{"tests": tests}]) == [1.0]
