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
