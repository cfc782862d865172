"""What an attack run found in the verifier pools, each asserted on its harm outside the worker:
a user verifier's torch tensors are errors with a message (not time-outs); verifiers that
ignore SIGTERM are killed at once, so the step does not wait past reward.timeout; a wave of
time-outs ends at the step's deadline (reward.step_timeout); a confined completion changes no
file's metadata and no other process's limits or scheduling, and holds no capability."""

import os
import time

import pytest

from rlsd.engine.rewards import build_reward
from rlsd.engine.rewards.isolation import isolated, wait_gone
from rlsd.schema.config import RewardConfig

from .conftest import TESTS_DIR
from .hostile_verifiers import capabilities

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


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, NODUMP = 0x80086601, 0x40086602, 0x40
SHM_KEY = 0x524C5344  # a System V shared memory segment a payload would leave behind


def shm_segments():
    with open("/proc/sysvipc/shm") as fh:
        return [line.split()[:2] for line in fh if line.split()[0] == str(SHM_KEY)]


def file_flags(path):
    import array
    import fcntl

    flags = array.array("l", [0])
    with open(path, "rb") as fh:
        fcntl.ioctl(fh.fileno(), FS_IOC_GETFLAGS, flags)
    return flags[0]


def state_of(path, pid):
    """What the payloads go for: a file's mode, owner, times, extended attributes and flags, and
    another process's limits, priority and CPUs (a stand-in for the trainer)."""
    st = os.stat(path)
    with open(f"/proc/{pid}/limits") as fh:
        limits = fh.read()
    return {
        "file": (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns),
        "xattrs": sorted(os.listxattr(path)),
        "flags": file_flags(path),
        "limits": limits,
        "nice": os.getpriority(os.PRIO_PROCESS, pid),
        "cpus": os.sched_getaffinity(pid),
        "shm": shm_segments(),
    }


def metadata_payloads(path, pid):
    os_, res = "__import__('os')", "__import__('resource')"
    setflags = (
        f"__import__('fcntl').ioctl({os_}.open('{path}', 0), {FS_IOC_SETFLAGS}, "
        f"__import__('array').array('l', [{NODUMP}]))"
    )
    return [
        f"{os_}.chmod('{path}', 0o777)",
        f"{os_}.fchmod({os_}.open('{path}', 0), 0o777)",
        f"{os_}.chown('{path}', 65534, 65534)",
        f"{os_}.lchown('{path}', 65534, 65534)",
        f"{os_}.utime('{path}', (0, 0))",
        f"{os_}.setxattr('{path}', 'user.rlsd', b'1')",
        f"{os_}.removexattr('{path}', 'user.keep')",
        setflags,
        f"{res}.prlimit({pid}, {res}.RLIMIT_NOFILE, (7, 7))",
        f"{os_}.setpriority({os_}.PRIO_PROCESS, {pid}, 19)",
        f"{os_}.setpriority({os_}.PRIO_PGRP, {pid}, 19)",  # (its own group: harmless if it lands)
        f"{os_}.sched_setaffinity({pid}, {{0}})",
        f"{os_}.truncate('{path}', 0)",
        f"__import__('ctypes').CDLL(None).shmget({SHM_KEY}, 4096, 0o1600)",
    ]


@pytest.mark.parametrize("isolate", [True, False])
def test_a_confined_completion_changes_no_file_metadata_and_no_other_process(tmp_path, isolate):
    """What an eval'd answer could do to the rest of the machine without writing a file: make
    a file (~/.ssh, /etc/shadow, a checkpoint) world-writable, give it away, backdate it,
    change its extended attributes or flags, empty it; starve the trainer of descriptors, renice
    it or pin it to one CPU; leave shared memory behind. Each is a reasoning-gym answer that
    spiral_matrix's scorer evals. (Never aim one at PRIO_USER: before the fix it reniced every
    process of the user.)"""
    import subprocess

    import reasoning_gym

    victim = tmp_path / "victim"
    victim.write_text("secret")
    os.chmod(victim, 0o600)
    os.setxattr(victim, "user.keep", b"1")
    trainer = subprocess.Popen(["sleep", "120"], start_new_session=True)
    cfg = RewardConfig(verifiers=["reasoning_gym"], isolate_completions=isolate, workers=2)
    reward_fn = build_reward(cfg)
    entry = reasoning_gym.create_dataset("spiral_matrix", size=1, seed=0)[0]
    try:
        before = state_of(victim, trainer.pid)
        payloads = [f"Answer: {p}" for p in metadata_payloads(victim, trainer.pid)]
        n = len(payloads)
        rewards, _, _ = reward_fn(
            ["p"] * n, payloads, {"answer": ["1"] * n, "metadata": [{"entry": entry}] * n}
        )
        after = state_of(victim, trainer.pid)
        caps = reward_fn.pools["b"].schedule(isolated, (capabilities,)).result(timeout=60)
    finally:
        reward_fn.close()
        trainer.kill()
        trainer.wait()
        for _, shmid in shm_segments():  # (left by a payload that got through)
            subprocess.run(["ipcrm", "-m", shmid], check=False)
    assert rewards == [0.0] * n
    assert after == before
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapAmb"] == 0, caps
    if os.geteuid() == 0:
        assert caps["CapBnd"] == 0, caps
