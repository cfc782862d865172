"""Nothing from a completion is evaluated in the trainer: hostile completions and verifiers.

The verifiers that read model output run in worker processes that are killed on time, limited,
and (the built-ins) confined by the kernel; the trainer reads back plain floats. Each pool is
started once per module (fixtures) and reused, as in training.
"""

import os
import time
from pathlib import Path

import pytest

from rlsd.engine.rewards import build_reward
from rlsd.engine.rewards.isolation import VerifierPool, as_score, isolated, wait_gone, worker_report
from rlsd.schema.config import RewardConfig

from .conftest import TESTS_DIR

LIMIT = 2.0  # the per-item limit the attacks run under
MARGIN = 1.5  # what killing a worker may add (the pool checks every 0.1 s; loaded CI cores)
HELPERS = TESTS_DIR / "isolation_verifiers.py"
FAMILIES = [  # their scorers eval or sympy-parse the answer
    "spiral_matrix",
    "string_insertion",
    "binary_matrix",
    "n_queens",
    "countdown",
    "puzzle24",
    "polynomial_multiplication",
    "simple_integration",
]


def custom(*names, **extra):
    return RewardConfig(verifiers=[f"{HELPERS}:{n}" for n in names], **extra)


def score(reward_fn, completions, answers=None, metadata=None):
    n = len(completions)
    columns = {"answer": answers or ["1"] * n}
    if metadata is not None:
        columns["metadata"] = metadata
    return reward_fn(["p"] * n, completions, columns)


@pytest.fixture(scope="module")
def gym():
    reward_fn = build_reward(RewardConfig(verifiers=["reasoning_gym"], timeout=10, workers=2))
    yield reward_fn
    reward_fn.close()


@pytest.fixture(scope="module")
def math_fn():
    reward_fn = build_reward(RewardConfig(verifiers=["math"], timeout=LIMIT, workers=2))
    assert score(reward_fn, ["Answer: 0.5"], ["1/2"])[0] == [1.0]  # started before timing
    yield reward_fn
    reward_fn.close()


@pytest.fixture(scope="module")
def regex_fn():
    cfg = RewardConfig(verifiers=["regex"], pattern="(a+)+$", timeout=LIMIT, workers=2)
    reward_fn = build_reward(cfg)
    assert score(reward_fn, ["Answer: aaa"])[0] == [1.0]
    yield reward_fn
    reward_fn.close()


def entry(family):
    import reasoning_gym

    return reasoning_gym.create_dataset(family, size=1, seed=0)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_payloads_on_reasoning_gym_scorers_never_reach_the_trainer(gym, family, tmp_path):
    marker = tmp_path / "MARKER"
    payloads = [
        f"Answer: __import__('os').system('touch {marker}')",
        f"Answer: open('{marker}', 'w')",
        "Answer: __import__('os').environ.__setitem__('RLSD_COMPROMISED', '1')",
        f"Answer: open('EVALUATED_{family}', 'w')",  # relative: the worker's own directory
    ]
    meta = [{"entry": entry(family)}] * len(payloads)
    _, correct, metrics = score(gym, payloads, metadata=meta)
    assert not any(correct) and metrics["reward/timeouts"] == 0
    assert "RLSD_COMPROMISED" not in os.environ  # the trainer's own state is untouched
    assert not list(Path.cwd().glob("EVALUATED_*"))  # nothing ran in the trainer's directory
    pool = gym.pools["b"]
    # the scorer did evaluate the completion, in a worker, inside that worker's directory
    assert list(Path(pool._root).glob(f"worker-*/EVALUATED_{family}"))
    confined = pool.schedule(worker_report, ()).result()["confined"]
    if not any(c.startswith("landlock") for c in confined):
        pytest.skip(f"this kernel cannot confine the worker's file writes ({confined})")
    assert not marker.exists()  # the worker itself could not write outside its directory


def test_builtin_workers_are_confined_limited_and_scrubbed(regex_fn):
    report = regex_fn.pools["b"].schedule(worker_report, ()).result()
    assert report["pid"] != os.getpid()
    assert Path(report["cwd"]).parent == Path(regex_fn.pools["b"]._root)
    assert report["cpu_limit"] > 0 and report["address_space_limit"] > 2048 * 2**20
    assert set(report["environ"]) <= {"PATH", "LANG", "LC_ALL", "PYTHONPATH"} | {
        "HOME",
        "TMPDIR",
        "OMP_NUM_THREADS",
    }
    if os.path.exists("/proc/self/statm") and report["confined"]:
        assert "seccomp" in report["confined"] or report["confined"][0].startswith("landlock")


@pytest.mark.parametrize(
    "answer", ["Answer: 10^{10^{10}}", "Answer: 2^{2^{2^{2^{2^{2}}}}}", "Answer: 9^{9^{9^{9}}}!"]
)
def test_gil_holding_math_returns_within_the_limit_and_the_pool_recovers(math_fn, answer):
    start = time.monotonic()
    rewards, _, metrics = score(math_fn, [answer], ["1"])
    assert time.monotonic() - start < LIMIT + MARGIN
    assert rewards == [0.0] and metrics["reward/timeouts"] + metrics["reward/errors"] == 1
    assert score(math_fn, ["Answer: \\frac{2}{4}"], ["0.5"])[0] == [1.0]


def test_backtracking_regex_returns_within_the_limit_and_the_pool_recovers(regex_fn):
    start = time.monotonic()
    rewards, _, metrics = score(regex_fn, ["Answer: " + "a" * 40 + "b", "Answer: aa"])
    assert time.monotonic() - start < LIMIT + MARGIN
    assert rewards == [0.0, 1.0] and metrics["reward/timeouts"] == 1
    assert score(regex_fn, ["Answer: aaaa"])[0] == [1.0]


@pytest.mark.parametrize("name", ["spin", "sleep_forever"])
def test_hung_user_verifiers_are_killed_and_leave_no_process(name):
    reward_fn = build_reward(custom(name, "my_pid", timeout=1.0, workers=2))
    try:
        rewards, _, metrics = score(reward_fn, ["x"])
        pool = reward_fn.pools["c"]
        assert metrics["reward/timeouts"] == 1 and rewards[0] > 1  # my_pid: a worker's pid
        assert int(rewards[0]) != os.getpid()
        start = time.monotonic()
        before = set(pool.worker_pids())
        rewards, _, metrics = score(reward_fn, ["y"])
        assert time.monotonic() - start < 1.0 + MARGIN and metrics["reward/timeouts"] == 1
        killed = before - set(pool.worker_pids())
        assert killed and wait_gone(sorted(killed))  # the hung worker is gone, not abandoned
        pids = pool.worker_pids()
    finally:
        reward_fn.close()
    assert wait_gone(pids) and not Path(pool._root or "/nonexistent").exists()


def test_the_pool_is_reused_across_calls():
    reward_fn = build_reward(custom("my_pid", workers=2))
    try:
        seen = set()
        for _ in range(5):
            seen |= set(score(reward_fn, ["a", "b", "c", "d"])[0])
        assert len(seen) <= 2 and os.getpid() not in seen  # the same two workers every time
    finally:
        reward_fn.close()


def test_user_verifiers_run_outside_the_trainer_unless_asked():
    isolated = build_reward(custom("compromise_trainer"))
    try:
        assert score(isolated, ["x"])[0] == [1.0]
        assert "RLSD_COMPROMISED" not in os.environ
    finally:
        isolated.close()
    in_process = build_reward(custom("compromise_trainer", custom_in_process=True))
    assert in_process.where() == {f"{HELPERS}:compromise_trainer": "trainer threads"}
    try:
        assert score(in_process, ["x"])[0] == [1.0]
        assert os.environ.pop("RLSD_COMPROMISED") == "1"  # the documented opt-out
    finally:
        in_process.close()


def test_a_forged_result_message_is_dropped_not_unpickled(caplog):
    reward_fn = build_reward(custom("forge_message", "my_pid", timeout=1.0, workers=1))
    try:
        rewards, _, metrics = score(reward_fn, ["x"])
        assert "RLSD_COMPROMISED" not in os.environ
        assert "dropped a message from a verifier worker" in caplog.text
        assert metrics["reward/timeouts"] == 1  # the forging worker was killed on time
        assert rewards[0] > 1 and metrics["reward/my_pid/mean"] > 1  # and the pool still works
    finally:
        reward_fn.close()


def test_scores_of_every_numeric_type():
    cases = {
        "decimal": 0.25,
        "fraction": 0.75,
        "bool": 1.0,
        "int": 1.0,
        "none": None,
        "nan": "error",
        "inf": "error",
        "decimal_nan": "error",
        "text": "error",
        "complex": "error",
    }
    reward_fn = build_reward(custom("exact_types", "huge_int", "raises"))
    try:
        answers = list(cases)
        rewards, _, metrics = score(reward_fn, ["c"] * len(answers), answers)
        first = [0.0 if v in (None, "error") else v for v in cases.values()]
        assert metrics["reward/exact_types/mean"] == pytest.approx(sum(first) / len(first))
        # per verifier: exact_types 5 errors; huge_int (10**400) and raises: every item
        assert metrics["reward/errors"] == 5 + 2 * len(answers)
        assert metrics["reward/unjudged"] == 6 + 2 * len(answers)
        assert metrics["reward/huge_int/mean"] == 0.0
    finally:
        reward_fn.close()
    np_fn = build_reward(custom("numpy_scalars"))
    try:
        rewards, _, metrics = score(np_fn, ["c"] * 3, ["f32", "i64", "bool"])
        assert rewards == [0.5, 1.0, 1.0] and metrics["reward/errors"] == 0
    finally:
        np_fn.close()


def test_as_score_directly():
    from decimal import Decimal
    from fractions import Fraction

    import numpy as np

    assert as_score(np.float64(0.5)) == 0.5 and type(as_score(np.int32(2))) is float
    assert as_score(Decimal("1.5")) == 1.5 and as_score(Fraction(1, 4)) == 0.25
    assert as_score(True) == 1.0 and as_score(None) is None
    for bad in (10**400, float("nan"), -float("inf"), "1", b"1", 1j, [1.0], object()):
        with pytest.raises(ValueError):
            as_score(bad)


def test_a_crashing_or_exiting_worker_is_an_error_and_replaced():
    reward_fn = build_reward(custom("exits", "my_pid", workers=1))
    try:
        rewards, _, metrics = score(reward_fn, ["x", "y"])
        assert metrics["reward/errors"] == 2 and metrics["reward/timeouts"] == 0
        assert all(r > 1 for r in rewards)  # my_pid still scored both, in a fresh worker
    finally:
        reward_fn.close()


def test_memory_limit_fails_the_item_not_the_worker_pool():
    reward_fn = build_reward(custom("allocate", memory_mb=256, workers=1))
    try:
        rewards, _, metrics = score(reward_fn, ["4096", "16"])
        assert rewards == [0.0, 1.0] and metrics["reward/errors"] == 1
    finally:
        reward_fn.close()


def test_close_stops_the_workers_and_the_fn_can_restart():
    reward_fn = build_reward(custom("my_pid", workers=2))
    first = score(reward_fn, ["x"])[0][0]
    pids = reward_fn.pools["c"].worker_pids()
    reward_fn.close()
    assert wait_gone(pids) and int(first) in pids
    assert score(reward_fn, ["x"])[0][0] > 1  # starts again on demand
    reward_fn.close()


def test_where_each_verifier_runs():
    reward_fn = build_reward(
        RewardConfig(
            verifiers=[
                "exact",
                "numeric",
                "choice",
                "format",
                "code",
                "math",
                "regex",
                "reasoning_gym",
                f"{HELPERS}:my_pid",
            ],
            code_sandbox="none",  # where it runs, not its sandbox (probed by build_reward)
        )
    )
    assert reward_fn.where() == {
        "exact": "trainer threads",
        "numeric": "trainer threads",
        "choice": "trainer threads",
        "format": "trainer threads",
        "code": "trainer threads",
        "math": "confined workers",
        "regex": "confined workers",
        "reasoning_gym": "confined workers",
        f"{HELPERS}:my_pid": "workers",
    }
    reward_fn.close()


PATHOLOGICAL = [  # 20,000-character replies (the tail builtin.MAX_CHARS keeps)
    "<answer>" * 2500,  # a lazy <answer>(.*?)</answer> search was quadratic: 0.7 s a reply
    "<answer>a" * 2200,
    "</answer>" * 2200,
    "\\boxed{" * 2800,
    "1," * 10000,
    "1/" * 10000,
    "1." * 10000,
    "Answer:" * 2800,
    "Answer: option " + " " * 19980 + "b",
    "<think>" * 2800,
    "\n" * 20000,
]


@pytest.mark.parametrize("extract", ["marker", "boxed", "answer_tag", "last_number", "none"])
def test_in_process_verifiers_are_linear_on_pathological_replies(extract):
    from rlsd.engine.rewards.builtin import answer_format, choice, exact, numeric

    start = time.perf_counter()
    for text in PATHOLOGICAL:
        for fn in (exact, numeric, choice):
            fn([""], [text], ["B"], extract=extract)
        answer_format([""], [text], extract=extract, format_think=True, format_partial=True)
    assert time.perf_counter() - start < 1.0  # 44 calls; about 0.05 s on a free core


def test_a_killed_trainer_leaves_no_worker_and_its_directory_is_removed_later(
    tmp_path, monkeypatch
):
    import signal
    import subprocess
    import sys
    import tempfile

    # pools in a directory of this test's own: another rlsd process starting a pool meanwhile
    # (a study on the same machine) would otherwise remove the killed trainer's directory first
    base = tmp_path / "tmp"
    base.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(base))

    script = tmp_path / "trainer.py"
    script.write_text(
        "import sys, time\n"
        "from rlsd.schema.config import RewardConfig\n"
        "from rlsd.engine.rewards import build_reward\n"
        f"fn = build_reward(RewardConfig(verifiers=['{HELPERS}:my_pid'], workers=2))\n"
        "fn(['p'], ['x'], {'answer': ['1']})\n"  # no __main__ guard: workers must not re-run it
        "print(fn.pools['c']._root, *fn.pools['c'].worker_pids(), flush=True)\n"
        "time.sleep(3600)\n"
    )
    env = {**os.environ, "TMPDIR": str(base)}
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        root, *pids = proc.stdout.readline().split()
        assert Path(root).parent == base
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(pids) == 2 and wait_gone([int(p) for p in pids])  # they die with the trainer
    assert Path(root).exists()  # nothing ran in the killed trainer to remove it...
    reward_fn = build_reward(custom("my_pid"))
    try:
        score(reward_fn, ["x"])
        assert not Path(root).exists()  # ...the next pool did
    finally:
        reward_fn.close()


def test_a_relative_user_verifier_path_and_its_working_directory(monkeypatch):
    monkeypatch.chdir(TESTS_DIR)  # the spec is relative to the trainer's working directory
    reward_fn = build_reward(RewardConfig(verifiers=["isolation_verifiers.py:in_directory"]))
    try:
        rewards, _, metrics = score(reward_fn, ["x"], [str(TESTS_DIR)])
        assert rewards == [1.0] and metrics["reward/errors"] == 0
    finally:
        reward_fn.close()


def test_the_kernel_refuses_a_confined_worker_what_a_payload_would_try(regex_fn, tmp_path):
    from .isolation_verifiers import probe_confinement

    pool = regex_fn.pools["b"]
    report = pool.schedule(isolated, (worker_report,)).result()  # a scoring process's view
    if not report["confined"] and not report["sealed"]:
        pytest.skip("this kernel offers neither Landlock nor seccomp")
    probe = (probe_confinement, str(tmp_path), os.getpid(), str(Path.home()))
    out = pool.schedule(isolated, probe).result()
    assert out.pop("write own dir") == "done"
    assert all(v != "done" for v in out.values()), out
    assert list(tmp_path.iterdir()) == [] and not (Path.home() / ".rlsd-probe").exists()


def test_a_completion_that_patches_the_scorer_cannot_forge_the_next_score():
    """spiral_matrix's scorer evals the answer: this one replaces the scorer by one that gives
    1.0 to anything. Scored in its own process, the patch dies with it: the next (wrong)
    completion, on the same and only worker, still scores 0."""
    cfg = RewardConfig(verifiers=["reasoning_gym"], timeout=10, workers=1)
    reward_fn = build_reward(cfg)
    patch = (
        "Answer: setattr(__import__('reasoning_gym.algorithmic.spiral_matrix', fromlist=['x'])"
        ".SpiralMatrixDataset, 'score_answer', lambda s, a, e: 1.0) or [1]"
    )
    meta = [{"entry": entry("spiral_matrix")}] * 3
    try:
        pool = reward_fn.pools["b"]
        first = pool.schedule(os.getpid, ()).result(timeout=60)
        rewards, _, _ = score(reward_fn, [patch, "Answer: 1 2", "Answer: 3"], metadata=meta)
        assert pool.schedule(os.getpid, ()).result(timeout=60) == first  # one worker throughout
    finally:
        reward_fn.close()
    assert rewards == [0.0, 0.0, 0.0]


def test_module_state_of_a_confined_scorer_does_not_outlive_a_completion():
    """A verifier that counts its calls in a module global sees 1 every time: each completion
    is scored in a process forked from the worker for it (the worker itself stays the same)."""
    name = f"{TESTS_DIR / 'isolation_verifiers.py'}:count_calls"
    pool = VerifierPool([name], timeout=10, memory_mb=1024, workers=1, confine=True)
    try:
        counts = pool.run(name, [("p", "c", {"answer": "1"})] * 3, {})
        pids = {pool.schedule(os.getpid, ()).result(timeout=60) for _ in range(2)}
    finally:
        pool.close()
    assert counts == [1.0, 1.0, 1.0] and len(pids) == 1  # a reused process gives 1, 2, 3


@pytest.mark.parametrize(
    "verifier,error",
    [
        ("exits_early", "the scoring process exited (0) with no result"),
        ("kills_itself", "the scoring process was killed by SIGKILL"),
    ],
)
def test_a_scoring_process_that_ends_without_a_score_is_an_error_and_the_worker_goes_on(
    verifier, error
):
    name = f"{TESTS_DIR / 'isolation_verifiers.py'}:{verifier}"
    good = f"{TESTS_DIR / 'isolation_verifiers.py'}:count_calls"
    pool = VerifierPool([name, good], timeout=10, memory_mb=1024, workers=1, confine=True)
    try:
        out = pool.run(name, [("p", "c", {"answer": "1"})] * 2, {})
        after = pool.run(good, [("p", "c", {"answer": "1"})], {})
    finally:
        pool.close()
    assert [str(e) for e in out] == [f"WorkerError: {error}"] * 2
    assert after == [1.0]  # the worker still scores


def test_without_isolate_completions_the_worker_scores_them_itself():
    """reward.isolate_completions false: the same worker process scores every completion."""
    name = f"{TESTS_DIR / 'isolation_verifiers.py'}:count_calls"
    pool = VerifierPool([name], timeout=10, memory_mb=1024, workers=1, confine=True, isolate=False)
    try:
        counts = pool.run(name, [("p", "c", {"answer": "1"})] * 3, {})
    finally:
        pool.close()
    assert counts == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("worker_items,fresh", [(1, True), (0, False)])
def test_each_completion_gets_a_fresh_confined_worker(worker_items, fresh):
    """A completion that patches a scorer which evals it changes only its own worker's memory:
    with reward.worker_items 1 no later completion is scored by that process."""
    from rlsd.schema.config import load_config

    cfg = load_config(
        None,
        {
            "reward.verifiers": "reasoning_gym",
            "reward.workers": "1",
            "reward.worker_items": str(worker_items),
        },
    )
    reward_fn = build_reward(cfg.reward)
    try:
        pool = reward_fn.pools["b"]
        pids = [pool.schedule(os.getpid, ()).result(timeout=60) for _ in range(4)]
    finally:
        reward_fn.close()
    assert os.getpid() not in pids
    assert (len(set(pids)) == 4) if fresh else (len(set(pids)) == 1)
