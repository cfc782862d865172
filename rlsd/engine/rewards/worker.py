"""The worker side of the verifier pools (`isolation.py`): what each worker process runs.

`init_worker` sets a new worker up (limits, directory, environment, kernel confinement, the
verifiers loaded and warmed up); `score_item` scores one completion, in a confined worker in a
process forked for it (`isolated`); `worker_report` says what was set up. See `isolation.py`'s
docstring for the whole design.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import inspect
import json
import math
import os
import resource
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .builtin import BUILTIN
from .confine import confine, seal
from .loading import load_verifier

FILE_LIMIT = 64 * 2**20
KEPT_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "PYTHONPATH")  # the rest is not a verifier's business


class ScoreError(ValueError):
    """A verifier returned something that is not one finite number (or None)."""


class WorkerError(RuntimeError):
    """What went wrong with an item in a worker process, as the worker (or the pool) reported it:
    already "Type: message"."""


def is_tensor(value: Any) -> bool:
    """Whether `value` is a torch Tensor (or a subclass), told by its class: a worker need not
    import torch to recognise one."""
    return any(c.__name__ == "Tensor" and c.__module__ == "torch" for c in type(value).__mro__)


TENSOR_HINT = "return plain floats (tensor.tolist())"


def as_score(value: Any) -> float | None:
    """A verifier's return value as a float, None (cannot judge), or ScoreError.

    bool, int (when a float can hold it), Fraction, Decimal and numpy scalars convert; NaN,
    infinities, strings, torch tensors and objects without a float value are errors.
    """
    if value is None:
        return None
    if is_tensor(value):
        raise ScoreError(f"returned a torch Tensor as a score: {TENSOR_HINT}")
    if isinstance(value, (str, bytes, bytearray, complex)) or not hasattr(value, "__float__"):
        raise ScoreError(f"returned {type(value).__name__}, not a number")
    try:
        score = float(value)
    except (ArithmeticError, ValueError, TypeError) as exc:
        raise ScoreError(f"returned {type(value).__name__} that is not a float: {exc}") from None
    if not math.isfinite(score):
        raise ScoreError(f"returned {score}, not a finite number")
    return score


def call_verifier(fn: Callable, args: tuple, kwargs: dict) -> float | None:
    """One completion's score (raises what the verifier raised, or ScoreError)."""
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = asyncio.run(result)
    if is_tensor(result):
        shape = "x".join(map(str, getattr(result, "shape", ()))) or "0-d"
        raise ScoreError(f"returned a torch Tensor ({shape}), not a list of scores: {TENSOR_HINT}")
    scores = list(result)
    if len(scores) != 1:
        raise ScoreError(f"returned {len(scores)} scores for 1 completion")
    return as_score(scores[0])


_WORKER: dict[str, Any] = {"fns": {}}


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker of a pool loads and how it is limited (sent to each new worker)."""

    verifiers: tuple[str, ...]  # built-in names or 'module:function' / 'file.py:function'
    timeout: float
    memory_mb: int
    confine: bool
    root: str  # the pool's directory; each worker makes its own inside
    isolate: bool = True  # (confined workers) each item in its own forked, sealed process


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _address_space() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * resource.getpagesize()


def init_worker(spec: WorkerSpec) -> None:
    """pebble's initializer: runs once in every new worker, before its first task."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # killed at once, even inside C code
    _die_with_parent()
    workdir = tempfile.mkdtemp(prefix="worker-", dir=spec.root)
    if spec.confine:  # a user's verifier keeps the trainer's directory and environment
        os.chdir(workdir)
        keep = {k: v for k, v in os.environ.items() if k in KEPT_ENVIRONMENT}
        os.environ.clear()
        os.environ.update(keep, HOME=workdir, TMPDIR=workdir, OMP_NUM_THREADS="1")
        tempfile.tempdir = workdir
    for name in spec.verifiers:
        with contextlib.suppress(Exception):  # a load error is reported per item instead
            _WORKER["fns"][name] = load_verifier(name)
    if spec.confine:
        _warm_up()
    _WORKER["cpu"] = max(1, math.ceil(spec.timeout))
    _reset_cpu_limit()  # from here on; reset again before each item
    if os.path.exists("/proc/self/statm"):
        limit = _address_space() + spec.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if spec.confine:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        _WORKER["isolate"] = spec.isolate  # then each scoring process seals itself
        _WORKER["confined"] = confine(workdir, sealed=not spec.isolate)


def _warm_up() -> None:
    """Score one harmless item with each built-in verifier before the first fork: what one
    builds on its first call (math-verify's parsers, compiled patterns, caches) is then inherited by
    every scoring process instead of rebuilt in each (about 1 s for math). `gc.freeze()` keeps
    the collector from touching, and so copying, the inherited objects in each child."""
    for name, fn in _WORKER["fns"].items():
        if name not in BUILTIN:  # (a user's function may not be harmless to call)
            continue
        with contextlib.suppress(BaseException):
            call_verifier(fn, (["What is 1/2?"], ["Answer: \\frac{1}{2}"]), WARM_UP_ROW)
    gc.collect()
    gc.freeze()


def _reset_cpu_limit() -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime) + _WORKER["cpu"] + 1
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


WARM_UP_ROW = {"answer": "0.5", "pattern": "0\\.5", "metadata": {}}
RESULT_BYTES = 4096  # the most a scoring process may send back


def _seal_child(write_fd: int) -> None:
    """In a scoring process just forked from a confined worker: die with the worker, keep no
    descriptor but the standard streams (/dev/null) and the result pipe (so it cannot write to
    the pool's channels and forge another item's result), and refuse processes, sockets,
    programs, tracing and signals to others (seccomp, which the worker itself does without, as
    it must fork)."""
    _die_with_parent()
    os.closerange(3, write_fd)
    os.closerange(write_fd + 1, os.sysconf("SC_OPEN_MAX"))
    _WORKER["sealed"] = seal()
    _reset_cpu_limit()


def _reap() -> None:
    """Collect the scoring processes that have ended (each is killed once it has answered; the
    kernel tears down its memory while the worker goes on)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _read_child(read_fd: int, pid: int) -> Any:
    """What a scoring process sent back (one line of JSON), or WorkerError when it sent too
    much, sent no JSON, or died before answering."""
    data = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while len(data) <= RESULT_BYTES and b"\n" not in data:
            chunk = pipe.read(RESULT_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    if b"\n" in data:  # answered: it has no more to do
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    elif len(data) > RESULT_BYTES:
        os.kill(pid, signal.SIGKILL)
        raise WorkerError(f"the scoring process sent more than {RESULT_BYTES} bytes")
    else:
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            raise WorkerError(f"the scoring process was killed by {name}")
        raise WorkerError(f"the scoring process exited ({os.WEXITSTATUS(status)}) with no result")
    try:
        return json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        raise WorkerError("the scoring process sent no result") from None


def _verdict(value: Any) -> tuple:
    """A scoring process's result checked to be ['ok', finite float | None] or ['error', str]."""
    kind, score = value if isinstance(value, list) and len(value) == 2 else (None, None)
    if kind == "ok" and (score is None or (type(score) is float and math.isfinite(score))):
        return ("ok", score)
    if kind == "error" and type(score) is str:
        return ("error", score[:600])
    return ("error", "WorkerError: the scoring process sent no valid result")


def isolated(fn: Callable, *args: Any) -> Any:
    """`fn(*args)` in a process forked from this confined worker for this one call, so that
    nothing the call does to the scorer's modules, builtins or memory outlives it. Its result
    comes back as JSON. In an unconfined worker (a user's verifier), a plain call."""
    if not _WORKER.get("isolate"):
        return fn(*args)
    _reap()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the scoring process: never returns into the worker's loop
        code = 1
        try:
            os.close(read_fd)
            _seal_child(write_fd)
            payload = json.dumps(fn(*args)).encode() + b"\n"
            os.write(write_fd, payload)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    return _read_child(read_fd, pid)


def _score(name: str, prompt: str, completion: str, row: dict, extra: dict) -> tuple:
    try:
        _reset_cpu_limit()
        fn = _WORKER["fns"].get(name)
        if fn is None:
            fn = _WORKER["fns"][name] = load_verifier(name)
        return ("ok", call_verifier(fn, ([prompt], [completion]), {**row, **extra}))
    except BaseException as exc:  # (SystemExit and MemoryError too)
        try:
            return ("error", f"{type(exc).__name__}: {str(exc)[:500]}")
        except BaseException:  # (a str() that raises)
            return ("error", type(exc).__name__)


def score_item(name: str, prompt: str, completion: str, row: dict, extra: dict) -> tuple:
    """One completion scored by one verifier, in a worker: ('ok', float | None) or ('error', msg).

    Never raises: whatever the verifier does, only a short tuple of plain values goes back. In a
    confined worker each completion is scored in its own process forked from it (`isolated`).
    """
    if not _WORKER.get("isolate"):
        return _score(name, prompt, completion, row, extra)
    try:
        _reset_cpu_limit()  # the worker's own: forking costs it CPU time too
        return _verdict(isolated(_score, name, prompt, completion, row, extra))
    except WorkerError as exc:
        return ("error", f"WorkerError: {exc}")
    except Exception as exc:  # (fork refused, out of memory, ...)
        return ("error", f"WorkerError: {type(exc).__name__}: {str(exc)[:300]}")


def worker_report() -> dict:
    """What the initializer set up in this worker (for tests and `rlsd` diagnostics)."""
    return {
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "confined": list(_WORKER.get("confined", [])),
        "address_space_limit": resource.getrlimit(resource.RLIMIT_AS)[0],
        "cpu_limit": resource.getrlimit(resource.RLIMIT_CPU)[0],
        "environ": sorted(os.environ),
    }
