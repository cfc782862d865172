"""The code verifier and its sandbox: hostile completions score 0 within their limits, and the
process that scores them survives."""

import os
import time

import pytest

from rlsd.data import humaneval_records
from rlsd.rewards.builtin import code, code_program, completion_code
from rlsd.rewards.sandbox import run_python

HOSTILE = {
    "socket": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)",
    "write_outside": "open('/tmp/rlsd-sandbox-escape.txt', 'w').write('x')",
    "fork_bomb": "import os\nwhile True:\n    os.fork()",
    "allocate_10gb": "x = bytearray(10 * 2**30)\nprint(len(x))",
    "loop_forever": "while True:\n    pass",
    "print_100mb": "print('x' * 100_000_000)",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "kill_parent_ctypes": "import ctypes, os\nctypes.CDLL(None).kill(os.getppid(), 9)",
    "kill_group": "import os, signal\nos.killpg(0, signal.SIGKILL)",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_programs_fail_within_their_limits(name):
    start = time.monotonic()
    result = run_python(HOSTILE[name] + "\nprint('escaped')", timeout=2.0, memory_mb=512)
    assert result.status != "passed"
    if name != "kill_parent_ctypes":  # there the signal may land just after the print
        assert "escaped" not in result.output
    assert time.monotonic() - start < 4.0
    assert not os.path.exists("/tmp/rlsd-sandbox-escape.txt")


def test_a_passing_program_and_its_output():
    result = run_python("print(6 * 7)")
    assert (result.status, result.exit_code, result.output.strip()) == ("passed", 0, "42")


def test_code_extraction_and_programs():
    reply = "Here:\n```python\ndef f(x):\n    return x + 1\n```\nand\n```py\ndef g(): pass\n```"
    assert completion_code(reply).strip() == "def g(): pass"
    assert completion_code("def f(): pass") == "def f(): pass"
    meta = {"tests": ["assert f(1) == 2", "assert f(2) == 3"]}
    assert code_program("```python\ndef f(x):\n    return x + 1\n```", meta).endswith(
        "assert f(2) == 3\n"
    )
    assert code_program("def f(): pass", {}) is None


def test_code_verifier_on_humaneval():
    records = humaneval_records()
    assert len(records) == 164 and records[0].metadata["task_id"] == "HumanEval/0"
    first = records[0]
    meta = first.metadata
    body = first.answer[len(meta["prompt_code"]) :]  # the canonical body, as a continuation
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    completions = [f"```python\n{first.answer}\n```", body, wrong, "I cannot do that."]
    assert code([""] * 4, completions, [meta] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert code([""], ["anything"], [{}]) == [None]


def test_humaneval_recipe_trains_a_step_on_a_tiny_model(tiny_overrides):
    from rlsd.config import load_config
    from rlsd.trainer import setup, train_step

    overrides = {k: v for k, v in tiny_overrides.items() if k != "reward.verifiers"}
    cfg = load_config(
        "configs/humaneval.yaml",
        {**overrides, "data.long_prompts": "skip", "data.max_prompt_tokens": "4096"},
    )
    run = setup(cfg)
    metrics = train_step(run, 1)
    assert metrics["reward/code/mean"] == 0.0 and metrics["reward/errors"] == 0


def test_exiting_early_or_forging_the_pass_token_does_not_pass():
    meta = {"tests": ["assert f() == 1"]}
    hacks = [
        "import sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        "print(open(__file__).read().splitlines()[-1][7:-2])\nimport os\nos._exit(0)",
    ]
    assert code([""] * 3, hacks, [meta] * 3) == [0.0, 0.0, 0.0]
    assert code([""], ["def f():\n    return 1"], [meta]) == [1.0]


def test_pass_fraction_of_a_list_of_asserts():
    meta = {"tests": ["assert f(1) == 2", "assert f(2) == 3", "assert f(0) == 5", "assert g()"]}
    half = "def f(x):\n    return x + 1"
    assert code([""], [half], [meta], code_score="pass_fraction") == [0.5]
    assert code([""], [half], [meta]) == [0.0]  # all_pass
    assert code([""], ["import os\nos._exit(0)"], [meta], code_score="pass_fraction") == [0.0]
    humaneval_style = {"test": "def check(f):\n    assert f(1) == 2", "entry_point": "f"}
    assert code([""], [half], [humaneval_style], code_score="pass_fraction") == [1.0]
