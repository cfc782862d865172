"""What an attack run found in the verifier pools, each asserted on its harm outside the worker:
a user verifier's torch tensors are errors with a message (not time-outs)."""

import pytest

from rlsd.engine.rewards import build_reward
from rlsd.schema.config import RewardConfig

from .conftest import TESTS_DIR

HOSTILE = TESTS_DIR / "hostile_verifiers.py"


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
