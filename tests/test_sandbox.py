"""The code verifier and its sandbox: hostile programs end within their limits, the judge scores
what the tests say, and a machine without bubblewrap refuses `code` rewards with one line.
(The escape and forgery attempts, each with its harm checked, are in test_sandbox_attacks.py.)"""

import ast
import logging
import os
import shutil
import time

import pytest

from rlsd.engine.rewards import sandbox, sandbox_launcher
from rlsd.engine.rewards.builtin import code, code_program, completion_code
from rlsd.engine.rewards.sandbox import CodeTests, Limits, run_python, run_tests

PROBLEM = sandbox.sandbox_problem("bubblewrap")
if PROBLEM is not None and os.environ.get("RLSD_REQUIRE_SANDBOX") == "1":
    raise RuntimeError(f"RLSD_REQUIRE_SANDBOX=1 but {PROBLEM}")
# Without bubblewrap (CI has it) only the tests that need no sandbox run.
needs_bubblewrap = pytest.mark.skipif(PROBLEM is not None, reason=f"no sandbox: {PROBLEM}")

HOSTILE = {
    "socket": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)",
    "fork_bomb": "import os\nwhile True:\n    os.fork()",
    "allocate_10gb": "x = bytearray(10 * 2**30)\nprint(len(x))",
    "loop_forever": "while True:\n    pass",
    "print_100mb": "print('x' * 100_000_000)",
    "kill_group": "import os, signal\nos.killpg(0, signal.SIGKILL)",
    "read_only_system": "open('/usr/lib/rlsd-escape', 'w').write('x')",
}


@needs_bubblewrap
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_programs_fail_within_their_limits(name):
    start = time.monotonic()
    result = run_python(HOSTILE[name] + "\nprint('escaped')", timeout=2.0, memory_mb=512)
    assert result.status != "passed"
    assert "escaped" not in result.output
    assert time.monotonic() - start < 6.0  # the 2 s limit, with room for a loaded machine


@needs_bubblewrap
@pytest.mark.parametrize(
    "program",
    [
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "import ctypes, os\nctypes.CDLL(None).kill(os.getppid(), 9)",
        "import os, signal\nos.kill(1, signal.SIGKILL)",
    ],
)
def test_signalling_its_parent_reaches_nothing_outside(program):
    """Its parent is the sandbox's own init: the trainer (this process) is not in its world."""
    result = run_python(program + "\nprint('still here')", timeout=2.0)
    assert result.status in ("passed", "failed")  # whatever it did, it ended, and we are alive


@needs_bubblewrap
def test_a_passing_program_and_its_output():
    result = run_python("print(6 * 7)")
    assert (result.status, result.exit_code, result.output.strip()) == ("passed", 0, "42")
    failing = run_python("import sys\nprint('x')\nsys.exit(3)")
    assert (failing.status, failing.exit_code, failing.output) == ("failed", 3, "x\n")


@needs_bubblewrap
def test_the_sandbox_sees_only_the_interpreter_and_its_own_tmp():
    result = run_python(
        "import os\nprint([sorted(os.listdir('/')), os.getcwd(), sorted(os.environ),\n"
        "       sorted(p for p in os.listdir('/proc') if p.isdigit()), os.listdir('/usr')])\n"
        "open('scratch', 'w').write('fine')\nopen('/dev/null', 'w').write('fine')\n"
        "print(open('/tmp/scratch').read())"
    )
    assert result.status == "passed", result.output
    view, scratch = result.output.splitlines()
    top, cwd, env, procs, usr = ast.literal_eval(view)
    interpreter = sandbox._setup("bubblewrap")
    outside_usr = (
        [] if interpreter.prefix.startswith("/usr") else [interpreter.prefix.split("/")[1]]
    )
    assert set(top) - set(outside_usr) <= {
        "dev",
        "lib",
        "lib32",
        "lib64",
        "libx32",
        "proc",
        "tmp",
        "usr",
    }
    assert {"usr", "tmp", "proc", "dev"} <= set(top) and cwd == "/tmp"
    assert set(usr) <= {"bin", "lib", "lib32", "lib64", "libx32"}  # no share, local, sbin, src
    assert set(env) <= {"HOME", "LC_CTYPE", "PATH", "PWD", "TMPDIR"}  # none of the trainer's
    assert procs == ["1", "2"]  # bubblewrap's init and the program
    assert scratch == "fine"


@needs_bubblewrap
def test_the_private_tmp_is_size_limited_and_fresh_each_run():
    fill = "for i in range(3):\n    open(f'/tmp/big{i}', 'wb').write(b'x' * 900_000)"
    result = run_python(fill, disk_mb=1, max_output=2_000_000)
    assert result.status == "failed" and "No space left" in result.output
    assert run_python("import os\nprint(os.listdir('/tmp'))").output.strip() == "['program.py']"


def test_code_extraction_and_programs():
    reply = "Here:\n```python\ndef f(x):\n    return x + 1\n```\nand\n```py\ndef g(): pass\n```"
    assert completion_code(reply).strip() == "def g(): pass"
    assert completion_code("def f(): pass") == "def f(): pass"
    meta = {"tests": ["assert f(1) == 2", "assert f(2) == 3"]}
    job = code_program("```python\ndef f(x):\n    return x + 1\n```", meta)
    assert job == CodeTests("def f(x):\n    return x + 1\n", tests=meta["tests"])
    assert code_program("def f(): pass", {}) is None
    humaneval = {"prompt_code": "def f(x):\n", "test": "def check(c): pass", "entry_point": "f"}
    job = code_program("    return x", humaneval)
    assert (job.candidate, job.check, job.entry_point) == (
        "def f(x):\n    return x",
        "def check(c): pass",
        "f",
    )


@needs_bubblewrap
def test_code_verifier_on_humaneval():
    from rlsd.engine.data import humaneval_records

    records = humaneval_records()
    assert len(records) == 164 and records[0].metadata["task_id"] == "HumanEval/0"
    first = records[0]
    meta = first.metadata
    body = first.answer[len(meta["prompt_code"]) :]  # the canonical body, as a continuation
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    completions = [f"```python\n{first.answer}\n```", body, wrong, "I cannot do that."]
    assert code([""] * 4, completions, [meta] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert code([""], ["anything"], [{}]) == [None]


@needs_bubblewrap
def test_humaneval_recipe_trains_a_step_on_a_tiny_model(tiny_overrides):
    from rlsd.schema.config import load_config
    from rlsd.step.trainer import setup, train_step

    overrides = {k: v for k, v in tiny_overrides.items() if k != "reward.verifiers"}
    cfg = load_config(
        "configs/humaneval.yaml",
        {**overrides, "data.long_prompts": "skip", "data.max_prompt_tokens": "4096"},
    )
    run = setup(cfg)
    metrics = train_step(run, 1)
    assert metrics["reward/code/mean"] == 0.0 and metrics["reward/errors"] == 0


@needs_bubblewrap
def test_exiting_early_or_forging_the_pass_token_does_not_pass():
    meta = {"tests": ["assert f() == 1"]}
    hacks = [
        "import sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        "print(open(__file__).read().splitlines()[-1][7:-2])\nimport os\nos._exit(0)",
    ]
    assert code([""] * 3, hacks, [meta] * 3) == [0.0, 0.0, 0.0]
    assert code([""], ["def f():\n    return 1"], [meta]) == [1.0]


@needs_bubblewrap
def test_pass_fraction_of_a_list_of_asserts():
    meta = {"tests": ["assert f(1) == 2", "assert f(2) == 3", "assert f(0) == 5", "assert g()"]}
    half = "def f(x):\n    return x + 1"
    assert code([""], [half], [meta], code_score="pass_fraction") == [0.5]
    assert code([""], [half], [meta]) == [0.0]  # all_pass
    assert code([""], ["import os\nos._exit(0)"], [meta], code_score="pass_fraction") == [0.0]
    humaneval_style = {"test": "def check(f):\n    assert f(1) == 2", "entry_point": "f"}
    assert code([""], [half], [humaneval_style], code_score="pass_fraction") == [1.0]


@needs_bubblewrap
def test_the_judge_passes_plain_data_exceptions_and_the_candidates_names():
    candidate = (
        "import math\nLIMIT = 3\n"
        "def f(x):\n    return {'list': [1, 2.5, None], 'tuple': (True, 'é', b'\\x00'),\n"
        "            'set': {1, 2}, 'frozen': frozenset({3}), 'nested': {(1, 2): [{}]},\n"
        "            'complex': 1j, 'big': 10**50, 'nan': float('nan'), 'neg': -0.0}[x]\n"
        "def g(x, *, scale=1):\n    if x < 0:\n        raise ValueError('negative')\n"
        "    return x * scale\n"
        "def h():\n    return object()\n"
    )
    tests = [
        "assert f('list') == [1, 2.5, None] and type(f('tuple')) is tuple",
        "assert f('tuple') == (True, 'é', b'\\x00') and f('set') == {1, 2}",
        "assert f('frozen') == frozenset({3}) and f('nested') == {(1, 2): [{}]}",
        "assert f('complex') == 1j and f('big') == 10**50 and f('nan') != f('nan')",
        "assert str(f('neg')) == '-0.0' and g(2, scale=3) == 6 and LIMIT == 3",
        "try:\n    g(-1)\nexcept ValueError as e:\n    assert 'negative' in str(e)\nelse:\n"
        "    raise AssertionError",
        "assert math.isclose(g(1), 1.0)",  # math: the candidate imported it
        "h()",  # an object() cannot cross: fails
        "assert f(object) is None",  # neither can a class as an argument: fails
    ]
    verdict = run_tests(CodeTests(candidate, tests=tests))
    assert (verdict.passed, verdict.total, verdict.status) == (7, 9, "judged"), verdict


@needs_bubblewrap
def test_a_candidate_that_dies_midway_keeps_the_passes_it_earned():
    candidate = "def f(x):\n    if x == 2:\n        import os\n        os._exit(0)\n    return x"
    tests = ["assert f(1) == 1", "assert f(2) == 2", "assert f(3) == 3"]
    assert run_tests(CodeTests(candidate, tests=tests)).passed == 1


def test_the_plain_data_codec_refuses_what_is_not_plain():
    for value in [None, True, 3, -2.5, "s", b"b", bytearray(b"y"), 1 + 2j, [1, (2, {3: {4}})]]:
        assert sandbox_launcher._decode(sandbox_launcher._encode(value)) == value
    for value in [object(), type("I", (int,), {})(3), {"k": print}, iter([1])]:
        with pytest.raises(TypeError):
            sandbox_launcher._encode(value)
    for data in [[], ["?"], ["i", 3], ["b", "yes"], ["l", "not a list"], "x", ["s"]]:
        with pytest.raises((ValueError, TypeError, IndexError)):
            sandbox_launcher._decode(data)


@needs_bubblewrap
def test_the_limits_reach_the_sandbox():
    result = run_python(
        "import resource\nfor r in ('AS', 'CPU', 'FSIZE', 'NPROC', 'CORE'):\n"
        "    print(r, resource.getrlimit(getattr(resource, 'RLIMIT_' + r)))",
        timeout=3.0,
        memory_mb=256,
        max_output=5000,
        processes=7,
    )
    assert result.output.split("\n")[:5] == [
        f"AS ({256 * 2**20}, {256 * 2**20})",
        "CPU (4, 4)",
        "FSIZE (5000, 5000)",
        "NPROC (7, 7)",
        "CORE (0, 0)",
    ]


def test_code_rewards_are_refused_without_bubblewrap(monkeypatch, capsys):
    from rlsd.commands.cli import main
    from rlsd.engine.rewards import build_reward
    from rlsd.schema.config import ConfigError, load_config

    sandbox._setup.cache_clear()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    try:
        problem = sandbox.sandbox_problem("bubblewrap")
        assert "apt-get install bubblewrap" in problem and "reward.code_sandbox: none" in problem
        cfg = load_config("configs/humaneval.yaml")  # the schema does not probe the sandbox
        with pytest.raises(ConfigError, match="reward.code_sandbox: bubblewrap") as err:
            build_reward(cfg.reward)  # the scorer does, at start-up, before any training
        assert "\n" not in str(err.value)
        assert main(["check-reward", "configs/humaneval.yaml"]) == 2  # a user error, one line
        assert capsys.readouterr().err.startswith("rlsd: error: reward.code_sandbox: bubblewrap")
        with pytest.raises(sandbox.SandboxError, match="not installed"):
            run_python("print(1)")
    finally:
        sandbox._setup.cache_clear()


@needs_bubblewrap
def test_bubblewrap_that_cannot_start_is_refused_with_the_reason(monkeypatch):
    sandbox._setup.cache_clear()
    real = sandbox._bwrap
    monkeypatch.setattr(sandbox, "_bwrap", lambda *a: [*real(*a)[:-1], "--no-such-option", "--"])
    try:
        problem = sandbox.sandbox_problem("bubblewrap")
        assert problem.startswith("bubblewrap cannot start a sandbox here (bwrap: ")
        assert "user namespaces" in problem and "reward.code_sandbox: none" in problem
    finally:
        sandbox._setup.cache_clear()


def test_the_opt_out_runs_without_a_sandbox_and_says_so(caplog):
    sandbox._setup.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="rlsd.engine.rewards.sandbox"):
            assert sandbox.sandbox_problem("none") is None
        assert any("WITHOUT a sandbox" in r.getMessage() for r in caplog.records)
        result = run_python("import os\nprint(os.getuid(), os.getcwd())", sandbox="none")
        uid, cwd = result.output.split()
        assert result.status == "passed" and "rlsd-sandbox-" in cwd
        assert os.geteuid() != 0 or uid == "65534"
        assert not os.path.exists(cwd)  # removed afterwards
        meta = {"tests": ["assert f(1) == 2", "assert f(2) == 4"]}
        half, forged = "def f(x):\n    return x + 1", "import os\nos._exit(0)"
        scores = code([""] * 2, [half, forged], [meta] * 2, code_sandbox="none")
        assert scores == [0.0, 0.0]
        assert code([""], [half], [meta], code_score="pass_fraction", code_sandbox="none") == [0.5]
    finally:
        sandbox._setup.cache_clear()


@needs_bubblewrap
def test_a_sandboxed_run_costs_well_under_a_few_seconds():
    """The cost per completion (docs/verifiers.md): bubblewrap, the launcher, the judge."""
    run_python("pass")  # the probe and the first start
    start = time.perf_counter()
    for _ in range(5):
        run_tests(CodeTests("def f():\n    return 1", tests=["assert f() == 1"]), Limits())
    per_run = (time.perf_counter() - start) / 5
    assert per_run < 3.0, f"{per_run:.3f} s per judged run"  # about 0.2 s on an idle core
