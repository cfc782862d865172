"""User verifiers that misbehave, for tests/test_verifier_attacks.py (loaded by file path)."""

import signal
import time


def tensor_batch(prompts, completions, **columns):
    """A TRL-style mistake: the scores as one tensor instead of a list."""
    import torch

    return torch.ones(len(completions))


def tensor_items(prompts, completions, **columns):
    """A list, but of 0-d tensors."""
    import torch

    return [torch.tensor(1.0) for _ in completions]


def ignores_sigterm(prompts, completions, **columns):
    """Hangs with SIGTERM ignored: only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(3600)
    return [1.0]


def quick(prompts, completions, **columns):
    return [1.0 for _ in completions]


def hangs_on(prompts, completions, **columns):
    """Hangs (SIGTERM ignored) on completions that say "hang", scores the others 1.0."""
    if "hang" in completions[0]:
        return ignores_sigterm(prompts, completions)
    return [1.0]


def slow(prompts, completions, **columns):
    """Within the per-completion limit, but slow: a step of many of them is not."""
    time.sleep(0.6)
    return [1.0]


def capabilities():
    """The capability sets of the calling process, from the kernel's own account of it."""
    with open("/proc/self/status") as fh:
        return {k: int(v, 16) for k, v in (ln.split(":") for ln in fh) if k.startswith("Cap")}
