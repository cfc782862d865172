"""What an attack run found in the verifier pools, each asserted on its harm outside the worker:
a user verifier's torch tensors are errors with a message (not time-outs); verifiers that
ignore SIGTERM are killed at once, so the step does not wait past reward.timeout."""

import time

import pytest

from rlsd.engine.rewards import build_reward
from rlsd.engine.rewards.isolation import wait_gone
from rlsd.schema.config import RewardConfig

from .conftest import TESTS_DIR

HOSTILE = TESTS_DIR / "hostile_verifiers.py"
LIMIT = 1.0  # reward.timeout of the attacks
MARGIN = 1.0  # what noticing and killing may add (the pool looks every 0.1 s; loaded CI cores)


def hostile(*names, **extra):
    return build_reward(RewardConfig(verifiers=[f"{HOSTILE}:{n}" for n in names], **extra))


def score(reward_fn, completions):
    return reward_fn(["p"] * len(completions), completions, {"answer": ["1"] * len(completions)})


@pytest.mark.parametrize("in_process", [False, True])
def test_a_verifier_returning_torch_tensors_is_an_error_with_a_message(in_process):
    reward_fn = hostile("tensor_batch", "tensor_items", timeout=60, custom_in_process=in_process)
    try:
        rewards, _, metrics = score(reward_fn, ["x", "y"])
    finally:
        reward_fn.close()
    assert rewards == [0.0, 0.0]
    assert metrics["reward/errors"] == 4 and metrics["reward/timeouts"] == 0
    reasons = {f.verifier: f.errors[0][1] for f in reward_fn.failures}
    assert "returned a torch Tensor (1), not a list of scores" in reasons["tensor_batch"]
    assert "returned a torch Tensor as a score" in reasons["tensor_items"]
    assert all("tensor.tolist()" in reason for reason in reasons.values())


def timed(reward_fn, completions):
    start = time.monotonic()
    _, _, metrics = score(reward_fn, completions)
    return time.monotonic() - start, metrics


def test_verifiers_that_ignore_sigterm_do_not_hold_the_step():
    """One wave of hung verifiers that ignore SIGTERM: the step waits reward.timeout, not a 3 s
    grace per worker one after another, and the next step finds every worker replaced."""
    reward_fn = hostile("hangs_on", timeout=LIMIT, workers=4)
    try:
        pool = reward_fn.pools["c"]
        assert timed(reward_fn, ["ok"] * 4)[1]["reward/errors"] == 0  # started before timing
        hung = pool.worker_pids()
        seconds, metrics = timed(reward_fn, ["hang"] * 4)
        assert metrics["reward/timeouts"] == 4 and seconds < LIMIT + MARGIN, seconds
        assert wait_gone(hung, 2.0)  # killed, not left running
        seconds, metrics = timed(reward_fn, ["ok"] * 4)
        assert metrics["reward/hangs_on/mean"] == 1.0 and seconds < MARGIN, seconds
    finally:
        reward_fn.close()


def test_a_wave_of_time_outs_cannot_queue_past_the_step_deadline():
    """The attack run's case: 9 math completions that hold math-verify for minutes in a wave of
    32, on 2 workers, under a 1 s limit. Each used to hold a worker for the whole limit in turn
    (5 s here, 16 s under 2 s); the step's reward phase now ends by reward.step_timeout (by
    default 3 x reward.timeout), the rest counted as time-outs, and the next step is scored."""
    reward_fn = build_reward(RewardConfig(verifiers=["math"], timeout=LIMIT, workers=2))
    right, hang = "Answer: \\frac{2}{4}", "Answer: 10^{10^{10}}"
    completions = [hang if i % 3 == 1 and i < 27 else right for i in range(32)]
    try:
        pool = reward_fn.pools["b"]
        assert score_math(reward_fn, [right] * 2)[0] == [1.0, 1.0]  # started before timing
        before = pool.worker_pids()
        start = time.monotonic()
        rewards, _, metrics = score_math(reward_fn, completions)
        seconds = time.monotonic() - start
        assert seconds < 3 * LIMIT + MARGIN, seconds
        assert metrics["reward/timeouts"] >= 9 and metrics["reward/errors"] == 0
        assert all(r == 0.0 for r, c in zip(rewards, completions) if c == hang)
        assert wait_gone(before, 2.0)  # the hung workers were killed, not left to run
        assert score_math(reward_fn, [right, hang, right])[0] == [1.0, 0.0, 1.0]
    finally:
        reward_fn.close()


def score_math(reward_fn, completions):
    n = len(completions)
    return reward_fn(["p"] * n, completions, {"answer": ["0.5"] * n})


def test_the_step_deadline_holds_in_the_trainers_threads_too():
    """reward.custom_in_process: waves of 2 threads, 0.6 s each, 8 completions (2.4 s): the
    step's deadline (1 s here) ends the waiting; what was not scored counts as a time-out."""
    reward_fn = hostile(
        "slow", timeout=LIMIT, step_timeout=LIMIT, workers=2, custom_in_process=True
    )
    seconds, metrics = timed(reward_fn, ["x"] * 8)
    assert seconds < LIMIT + 0.5, seconds
    assert metrics["reward/timeouts"] == 6 and metrics["reward/slow/mean"] == 2 / 8
