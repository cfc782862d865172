"""Worker processes for the verifiers that read model output: killed on time, limited, confined.

`VerifierPool` wraps a pebble `ProcessPool` that is started once (lazily, on the first batch),
reused for every step, and closed with `close()`. Each completion is one task with a wall-clock
limit (`reward.timeout`): past it the worker is killed with SIGKILL at once (`_kill_worker`:
not pebble's SIGTERM and 3 s grace, which a verifier that ignores SIGTERM turned into 3 s of a
stalled pool per worker) and the pool starts a new worker. A worker:

- is forked from the multiprocessing fork server (a fresh interpreter, not a copy of the
  trainer: it holds none of its memory), with the verifier libraries preloaded there so that a
  replacement starts in milliseconds, and without re-running the trainer's main script;
- for the built-ins, runs in its own temporary directory (its HOME and TMPDIR too) with a
  scrubbed environment (a user's verifier keeps the trainer's directory and environment);
- has an address-space limit of `reward.memory_mb` above what it holds after start-up, a CPU-time
  limit of `reward.timeout` seconds reset before each item, a 64 MiB file-size limit, no core
  dumps, and dies with its parent;
- for the built-in verifiers (`confine=True`), is confined by the kernel (`confine.py`): no
  writes outside its directory, no programs, and its standard streams go to /dev/null. It
  scores one harmless item with each built-in (so their caches exist before any fork), then
  scores each completion in a child forked for it (`isolated`, `reward.isolate_completions`):
  the child closes every descriptor but its result pipe, seals itself with seccomp (no
  processes, sockets, programs, tracing, signals to others), scores, writes one line of JSON
  and is killed. Whatever a completion does to the scorer's modules dies with its child.
  User verifiers are not confined: they are the user's code and may need the network, files or
  subprocesses.

Only plain values cross back: `("ok", float | None)` or `("error", message)`. The trainer reads
the pool's result channel with an unpickler that builds nothing but pebble's own message types,
so a compromised worker cannot send the trainer an object that runs code; such a message is
dropped (its item then times out) with a warning.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from .loading import TIMEOUT
from .worker import (  # noqa: F401  (re-exported: the pool's public names)
    ScoreError,
    WorkerError,
    WorkerSpec,
    as_score,
    call_verifier,
    init_worker,
    isolated,
    score_item,
    worker_report,
)

log = logging.getLogger(__name__)
STARTUP_ALLOWANCE = 60.0  # seconds a wave of items may wait for workers to start
LIBRARIES = {"math": ["math_verify", "sympy"], "reasoning_gym": ["reasoning_gym", "sympy"]}


# ----------------------------------------------------------------------------- the trainer side

_MESSAGES = {
    ("pebble.pool.process", "Acknowledgement"),
    ("pebble.pool.process", "TaskResult"),
    ("pebble.common.types", "Result"),
    ("pebble.common.types", "ResultStatus"),
}


class _MessageUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _MESSAGES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a verifier worker sent {module}.{name}")


def _safe_recv(channel: Any) -> Any:
    """The next message from the workers, built by the restricted unpickler (else dropped)."""
    from pebble.pool.process import NoMessage

    data = channel.reader.recv_bytes()
    try:
        return _MessageUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # (anything a hostile worker can make the parser do)
        log.warning("dropped a message from a verifier worker that is not a result: %s", exc)
        return NoMessage()


WORKER_NAME = "rlsd-verifier-worker"
ROOT_PREFIX = "rlsd-verifiers-"


def _make_root() -> str:
    """A pool's directory, named after the trainer's PID; the directories of trainers that are
    gone (killed before they could remove theirs) are removed first."""
    base = Path(tempfile.gettempdir())
    stale = base.glob(f"{ROOT_PREFIX}*-*") if Path("/proc/self").exists() else []
    for old in stale:
        pid = old.name[len(ROOT_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-", dir=base)


class _WorkerContext:
    """The fork-server context, with every process it starts named WORKER_NAME (see below)."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("forkserver")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def Process(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["name"] = WORKER_NAME
        return self._context.Process(*args, **kwargs)


def _without_main(original: Callable) -> Callable:
    def get_preparation_data(name: str) -> dict:
        data = original(name)
        if name == WORKER_NAME:
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    get_preparation_data.rlsd_workers = True  # type: ignore[attr-defined]
    return get_preparation_data


def _context() -> Any:
    """multiprocessing re-runs the parent's main script in every process it starts by fork server
    or spawn; a verifier worker needs nothing from it (its code is all importable), and running
    it would cost the trainer's imports in each worker, or start the training again in a script
    without an `if __name__ == "__main__":` guard. Only processes named WORKER_NAME skip it."""
    from multiprocessing import spawn

    if not getattr(spawn.get_preparation_data, "rlsd_workers", False):
        spawn.get_preparation_data = _without_main(spawn.get_preparation_data)
    return _WorkerContext()


def _kill_worker(manager: Any, worker_id: int) -> bool:
    """pebble's `maybe_stop_worker` for a worker whose item timed out or was cancelled, with
    SIGKILL at once. pebble's own sends SIGTERM and waits up to 3 s before SIGKILL, in the one
    thread that also notices every other time-out and starts the replacements: a verifier that
    ignores SIGTERM held the whole pool 3 s per worker, one after another. A worker has nothing
    to clean up (its directory goes with the pool's). As in pebble, only while holding the
    channel's lock (a worker killed mid-transaction would leave it locked for good); False,
    to be tried again on the manager's next round, when a worker holds it."""
    with manager.workers_channel.lock(block=False) as locked:
        worker = manager.workers.pop(worker_id, None) if locked else None
        if worker is not None:
            with contextlib.suppress(OSError):
                os.kill(worker.pid, signal.SIGKILL)
            worker.join(1.0)  # (at once, bar a process stuck in the kernel)
        return locked


def _kill_all(pool: Any) -> None:
    """SIGKILL every worker of a pebble pool."""
    for pid in list(pool._pool_manager.worker_manager.workers):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _outcome(future: Any, deadline: float) -> Any:
    """An item's result once its future is done, or TIMEOUT when it timed out or is not done
    by `deadline`."""
    from pebble import ProcessExpired

    try:
        status, value = future.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:  # its own time-out, or the deadline's
        return TIMEOUT
    except ProcessExpired as exc:
        return WorkerError(f"the worker process died (exit code {exc.exitcode})")
    except Exception as exc:  # (a broken pool: this item fails, not the run)
        return WorkerError(f"verifier pool: {type(exc).__name__}: {exc}")
    return value if status == "ok" else WorkerError(value)


def _absolute(spec: str) -> str:
    target, _, name = spec.rpartition(":")
    return f"{Path(target).resolve()}:{name}" if target.endswith(".py") else spec


class VerifierPool:
    """Worker processes for some verifiers; `run(name, items, extra)` scores a batch."""

    def __init__(
        self,
        verifiers: list[str],
        timeout: float,
        memory_mb: int,
        workers: int,
        confine: bool,
        worker_items: int = 0,
        isolate: bool = True,
    ):
        # a file.py path is resolved here, against the trainer's working directory
        self.specs = {name: _absolute(name) for name in verifiers}
        self.verifiers, self.timeout, self.workers = tuple(self.specs.values()), timeout, workers
        self.memory_mb, self.confine, self.worker_items = memory_mb, confine, worker_items
        self.isolate = isolate and confine
        self._pool: Any = None
        self._fresh = False  # started since the last `ready()`
        self._root: str | None = None
        self._lock = threading.Lock()

    def _start(self) -> Any:
        from pebble import ProcessPool

        preload = [
            "rlsd.engine.rewards.isolation",
            "rlsd.engine.rewards.worker",
            "rlsd.engine.rewards.confine",
            "pebble",
        ]
        for name in self.verifiers:
            preload += LIBRARIES.get(name, [])
        context = _context()
        context.set_forkserver_preload(preload)  # takes effect if the server is not running yet
        self._root = self._root or _make_root()
        spec = WorkerSpec(
            self.verifiers, self.timeout, self.memory_mb, self.confine, self._root, self.isolate
        )
        # confined workers score model output that scorers may eval: replaced after
        # `worker_items` items (1: each completion gets a fresh worker, so one that patches the
        # scorer cannot forge another's score; 0: never replaced)
        pool = ProcessPool(
            self.workers,
            max_tasks=self.worker_items,
            initializer=init_worker,
            initargs=(spec,),
            context=context,
        )
        manager = pool._pool_manager.worker_manager  # read results with the restricted unpickler
        create_channels = manager.create_channels

        def create_restricted_channels() -> None:
            create_channels()
            channel = manager.pool_channel
            channel.recv = lambda: _safe_recv(channel)

        manager.create_channels = create_restricted_channels
        manager.maybe_stop_worker = lambda worker_id: _kill_worker(manager, worker_id)
        return pool

    def _get(self) -> Any:
        with self._lock:
            if self._pool is not None and not self._pool.active:
                self._stop(self._pool)  # broken (it happens after a worker died mid-write)
                self._pool = None
            if self._pool is None:
                self._pool, self._fresh = self._start(), True
            return self._pool

    def ready(self) -> None:
        """Start the pool if it is not running, and after a start wait (at most
        STARTUP_ALLOWANCE) until a worker has answered: a step's deadline (`run`) counts from
        here, not from the fork server's and the workers' start-up."""
        pool = self._get()
        if self._fresh:
            self._fresh = False
            with contextlib.suppress(Exception):  # (a pool that cannot start: `run` says so)
                pool.schedule(os.getpid).result(timeout=STARTUP_ALLOWANCE)

    def schedule(self, fn: Callable, args: tuple, timeout: float | None = None) -> Any:
        return self._get().schedule(fn, args=args, timeout=timeout)

    def run(
        self, name: str, items: list[tuple], extra: dict, deadline: float | None = None
    ) -> list[Any]:
        """Per item (prompt, completion, row): a float, None, an Exception, or TIMEOUT.

        Each item has `timeout` seconds from when a worker takes it. `deadline` (a
        `time.monotonic()` value: the step's) ends the batch: the items not scored by then are
        TIMEOUT and the pool is discarded, its workers killed at once (`_discard`). Without
        one, a backstop: pebble times an item from when a worker takes it, so a pool that could
        not start a worker at all would otherwise leave the batch waiting for ever."""
        spec = self.specs.get(name, name)
        futures = [self.schedule(score_item, (spec, *item, extra), self.timeout) for item in items]
        if deadline is None:
            waves = -(-len(items) // self.workers) + 1
            deadline = time.monotonic() + waves * (self.timeout + STARTUP_ALLOWANCE)
        out = [_outcome(future, deadline) for future in futures]
        if any(not future.done() for future in futures):
            self._discard()  # what is left would hold the workers into the next step
        return out

    def _discard(self) -> None:
        """Stop the pool now, killing every worker (busy or not), and start afresh on the next
        call: cancelling the items still queued would cost a worker each, as each is taken."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
            _kill_all(pool)
            threading.Thread(target=self._stop, args=(pool,), daemon=True).start()

    def worker_pids(self) -> list[int]:
        if self._pool is None:
            return []
        return list(self._pool._pool_manager.worker_manager.workers)

    @staticmethod
    def _stop(pool: Any) -> None:
        pool.stop()
        _kill_all(pool)  # no SIGTERM grace (see `_kill_worker`)
        with contextlib.suppress(Exception):
            pool.join(timeout=10)

    def close(self) -> None:
        """Stop every worker (killing those still busy) and remove their directories."""
        with self._lock:
            if self._pool is not None:
                self._stop(self._pool)
                self._pool = None
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None


def wait_gone(pids: list[int], seconds: float = 5.0) -> bool:
    """Whether every process in `pids` has exited (and been reaped) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{pid}") for pid in pids):
            return True
        time.sleep(0.05)
    return False
