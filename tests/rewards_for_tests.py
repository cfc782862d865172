"""Reward functions used by the tests (loaded by file path, like a user's own verifier)."""


def length_reward(prompts, completions, **columns):
    """Varies with the completion, so random tiny models get non-zero advantages."""
    return [(len(c) % 5) / 4 for c in completions]


def crashing_reward(prompts, completions, **columns):
    raise RuntimeError("verifier bug")


async def async_reward(prompts, completions, answer, **columns):
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]
