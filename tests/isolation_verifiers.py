"""Hostile and odd user verifiers for tests/test_verifier_isolation.py (loaded by file path)."""

import os
import time
from decimal import Decimal
from fractions import Fraction


def spin(prompts, completions, **columns):
    while True:
        pass


def sleep_forever(prompts, completions, **columns):
    time.sleep(3600)
    return [1.0]


def huge_int(prompts, completions, **columns):
    return [10**400]


def numpy_scalars(prompts, completions, **columns):
    import numpy as np

    values = {"f32": np.float32(0.5), "i64": np.int64(1), "bool": np.bool_(True)}
    return [values[a] for a in columns["answer"]]


def exact_types(prompts, completions, **columns):
    values = {
        "decimal": Decimal("0.25"),
        "fraction": Fraction(3, 4),
        "bool": True,
        "int": 1,
        "nan": float("nan"),
        "inf": float("inf"),
        "decimal_nan": Decimal("NaN"),
        "text": "1.0",
        "none": None,
        "complex": 1j,
    }
    return [values[a] for a in columns["answer"]]


def raises(prompts, completions, **columns):
    raise RuntimeError("verifier bug")


def exits(prompts, completions, **columns):
    os._exit(3)


def compromise_trainer(prompts, completions, **columns):
    """What an eval of model output inside the trainer would do."""
    os.environ["RLSD_COMPROMISED"] = "1"
    return [1.0]


def forge_message(prompts, completions, **columns):
    """Send the trainer a pickle that runs code when loaded, on the pool's own result channel."""
    import gc
    import pickle

    from pebble.pool.channel import WorkerChannel

    class Payload:
        def __reduce__(self):
            return (exec, ("import os; os.environ['RLSD_COMPROMISED'] = 'pickle'",))

    channel = next(o for o in gc.get_objects() if isinstance(o, WorkerChannel))
    channel.writer.send_bytes(pickle.dumps(Payload()))
    time.sleep(3600)
    return [1.0]


def my_pid(prompts, completions, **columns):
    return [float(os.getpid())]


def allocate(prompts, completions, **columns):
    block = bytearray(int(completions[0]) * 2**20)
    return [float(len(block) > 0)]


def in_directory(prompts, completions, answer, **columns):
    """1.0 when the worker runs in the directory given as the answer."""
    return [float(os.getcwd() == answer[0])]


def probe_confinement(outside, trainer_pid, home):
    """What a payload could do in a worker: each attempt's outcome ('done' or the error)."""
    import socket
    import subprocess

    attempts = {
        "write outside": lambda: open(os.path.join(outside, "written"), "w").close(),
        "mkdir outside": lambda: os.mkdir(os.path.join(outside, "dir")),
        "write home": lambda: open(os.path.join(home, ".rlsd-probe"), "w").close(),
        "write own dir": lambda: open("mine", "w").close(),
        "run a program": lambda: subprocess.run(["true"], check=True),
        "fork": lambda: os._exit(0) if os.fork() == 0 else None,
        "tcp socket": lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM),
        "unix socket": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
        "signal the trainer": lambda: os.kill(trainer_pid, 0),
        "trainer memory": lambda: open(f"/proc/{trainer_pid}/mem", "wb").close(),
    }
    out = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            out[name] = "done"
        except Exception as exc:
            out[name] = type(exc).__name__
    return out


CALLS = [0]


def count_calls(prompts, completions, **kwargs):
    """How many times this module has been called in this process (1.0, 2.0, ...)."""
    CALLS[0] += 1
    return [float(CALLS[0])]


def exits_early(prompts, completions, **kwargs):
    """What a payload that ends its scoring process does (`os._exit(0)` before any score)."""
    os._exit(0)


def kills_itself(prompts, completions, **kwargs):
    """A scoring process killed by a signal (as a crash in C code would be)."""
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
