"""Reward functions used by the tests (loaded by file path, like a user's own verifier)."""


def length_reward(prompts, completions, **columns):
    """Varies with the completion, so random tiny models get non-zero advantages."""
    return [(len(c) % 5) / 4 for c in completions]


def crashing_reward(prompts, completions, **columns):
    raise RuntimeError("verifier bug")


async def async_reward(prompts, completions, answer, **columns):
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]


CALLS = {"flaky": 0}


def flaky_reward(prompts, completions, **columns):
    """Raises on every third call."""
    CALLS["flaky"] += 1
    if CALLS["flaky"] % 3 == 0:
        raise RuntimeError("flaky verifier")
    return [float(len(c) % 2) for c in completions]


def sleepy_reward(prompts, completions, **columns):
    """Never returns (for practical purposes)."""
    import time

    time.sleep(3600)
    return [1.0]


def garbage_reward(prompts, completions, **columns):
    return ["yes" if "1" in c else float("nan") for c in completions]


def always_one(prompts, completions, **columns):
    """Every completion is right: no group ever carries a gradient."""
    return [1.0 for _ in completions]
