"""Turn the `reward` config section into one batch scorer: weighted verifiers, run safely, with
metrics.

Where each verifier runs:

- `math`, `regex`, `reasoning_gym` (they parse or evaluate model output, or can run for a long
  time on it) run in worker processes (`isolation.VerifierPool`) that are confined by the kernel
  and killed when an item exceeds `reward.timeout`;
- user verifiers (`module:function`, `file.py:function`) run in worker processes too, killed on
  time and limited in memory and CPU, but not confined (they are the user's own code); with
  `reward.custom_in_process: true` they run in the trainer's threads instead (no time limit can be
  enforced there);
- `exact`, `numeric`, `choice`, `format` stay in the trainer (threads): they only slice, strip and
  compare strings of at most `builtin.MAX_CHARS` characters with linear-time operations and never
  evaluate model output; `code` also stays (each item already runs in its own sandboxed process).

Every verifier is called once per completion (a batch of one). A call that raises, returns
something that is not one finite number, or runs out of time gives that completion None (counted
in `reward/errors` or `reward/timeouts`), never a crash; the run goes on. `RewardFn.close()`
stops the worker processes (they are also stopped when the RewardFn is garbage-collected or the
interpreter exits).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .builtin import BUILTIN
from .isolation import VerifierPool, WorkerError, call_verifier

if TYPE_CHECKING:  # the config imports torch; worker processes import this module without it
    from ..config import RewardConfig

log = logging.getLogger(__name__)
TIMEOUT = object()  # marks a call that ran out of time
ISOLATED = ("math", "regex", "reasoning_gym")  # built-ins that run in confined worker processes
IN_PROCESS = ("exact", "numeric", "choice", "format", "code")  # built-ins run in threads


def _config_error(message: str) -> Exception:
    from ..config import ConfigError

    return ConfigError(message)


DEFAULT_THREADS = 32  # `reward.workers: 0`: threads at a time for the in-process verifiers


def default_workers() -> int:
    """`reward.workers: 0`: one worker process per core, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def load_callable(spec: str) -> Callable:
    """A function from 'package.module:name' or 'path/to/file.py:name'."""
    if ":" not in spec:
        raise _config_error(
            f"reward.verifiers: {spec!r} is neither a built-in verifier "
            f"({', '.join(BUILTIN)}) nor 'module:function'"
        )
    target, name = spec.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise _config_error(f"reward.verifiers: file not found: {path}")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as exc:
        raise _config_error(f"reward.verifiers: cannot import {target!r}: {exc}") from None
    except SyntaxError as exc:  # in the verifier's file or in a module it imports
        where = f"{exc.filename}:{exc.lineno}" if exc.filename else target
        raise _config_error(
            f"reward.verifiers: {where}: syntax error: {exc.msg} (loading {target!r})"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise _config_error(f"reward.verifiers: {target!r} has no function {name!r}")
    return fn


def _call_one(fn: Callable, args: tuple, kwargs: dict) -> Any:
    """One completion's score (a float or None), or the exception it raised."""
    try:
        return call_verifier(fn, args, kwargs)
    except Exception as exc:
        return exc


def run_verifier(
    fn: Callable,
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list[Any]],
    extra: dict[str, Any],
    timeout: float,
    workers: int,
) -> list[Any]:
    """Per completion, in the trainer's threads: a float, None, an exception, or TIMEOUT.

    Completions are scored in waves of `workers` concurrent threads; each wave waits at most
    `timeout` seconds. A call that holds the GIL (C code in sympy, the regex engine) blocks the
    whole process past the timeout, and a hung thread is abandoned, never stopped: only the
    verifiers that never evaluate model output and run in linear time are called here.
    """
    n = len(completions)
    results: list[Any] = [TIMEOUT] * n

    def work(i: int) -> None:
        row = {k: [v[i]] for k, v in columns.items()}
        results[i] = _call_one(fn, ([prompts[i]], [completions[i]]), {**row, **extra})

    for start in range(0, n, workers):
        wave = [
            threading.Thread(target=work, args=(i,), daemon=True)
            for i in range(start, min(start + workers, n))
        ]
        for thread in wave:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in wave:
            thread.join(max(0.0, deadline - time.monotonic()))
    return list(results)


class RewardFn:
    """Scores a batch: `rewards, correct, metrics = reward_fn(prompts, completions, columns)`.

    `rewards` is the weighted sum (a verifier's None counts as `none_value`); `correct` says
    whether the first verifier gave full marks (>= 1), which is what `reward/accuracy` reports.
    """

    def __init__(self, cfg: RewardConfig, in_process: bool = False):
        """`in_process=True` runs every verifier in the trainer's threads (the runner before
        worker processes; kept for `benchmarks/verifier_bench.py`'s side-by-side figures)."""
        self.names = list(cfg.verifiers)
        self.weights = [float(w) for w in cfg.weights] or [1.0] * len(self.names)
        self.none_value, self.timeout = cfg.none_value, cfg.timeout
        # processes per pool, and threads for the in-process verifiers (`code`'s sandboxed runs
        # wait on their subprocesses: more of them at once pays even on few cores)
        self.workers = cfg.workers or default_workers()
        self.threads = cfg.workers or DEFAULT_THREADS
        memory_mb, custom_in_process = cfg.memory_mb, in_process or cfg.custom_in_process
        options = {
            "extract": cfg.extract,
            "marker": cfg.answer_marker,
            "tolerance": cfg.numeric_tolerance,
            "rel_tolerance": cfg.numeric_rel_tolerance,
            "pattern": cfg.pattern,
            "code_timeout": cfg.code_timeout,
            "code_memory_mb": cfg.code_memory_mb,
            "code_score": cfg.code_score,
            "code_sandbox": cfg.code_sandbox,
            "code_disk_mb": cfg.code_disk_mb,
            "code_processes": cfg.code_processes,
            "format_think": cfg.format_think,
            "format_partial": cfg.format_partial,
        }
        # (function, options, pool): pool None = the trainer's threads
        self.fns: list[tuple[Callable, dict, VerifierPool | None]] = []
        confined = [n for n in self.names if n in ISOLATED and not in_process]
        custom = [n for n in self.names if n not in BUILTIN and not custom_in_process]
        self.pools = {
            kind: VerifierPool(
                names,
                self.timeout,
                memory_mb,
                self.workers,
                confine=kind == "b",
                worker_items=cfg.worker_items if kind == "b" else 0,
            )
            for kind, names in (("b", confined), ("c", custom))
            if names
        }
        for name in self.names:
            if name in BUILTIN:
                pool = self.pools.get("b") if name in confined else None
                self.fns.append((BUILTIN[name], options, pool))
            else:  # loaded here too: a bad spec is a config error before training starts
                self.fns.append((load_callable(name), {}, self.pools.get("c")))
        self._finalizer = weakref.finalize(self, _close_pools, list(self.pools.values()))

    def close(self) -> None:
        """Stop the verifier worker processes. Call it when training (or evaluation) ends; the
        RewardFn can still be called afterwards (its pools start again on demand)."""
        _close_pools(list(self.pools.values()))

    def __enter__(self) -> RewardFn:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def where(self) -> dict[str, str]:
        """Where each verifier runs: 'confined workers', 'workers' or 'trainer threads'."""
        kinds = {id(p): "confined workers" if p.confine else "workers" for p in self.pools.values()}
        return {
            name: kinds[id(pool)] if pool is not None else "trainer threads"
            for name, (_, _, pool) in zip(self.names, self.fns)
        }

    def _scores(
        self,
        fn: Callable,
        extra: dict,
        pool: VerifierPool | None,
        name: str,
        prompts: list[str],
        completions: list[str],
        columns: dict[str, list[Any]],
    ) -> tuple[list[float | None], int, int]:
        if pool is None:
            raw = run_verifier(fn, prompts, completions, columns, extra, self.timeout, self.threads)
        else:
            items = [
                (p, c, {k: [v[i]] for k, v in columns.items()})
                for i, (p, c) in enumerate(zip(prompts, completions))
            ]
            raw = pool.run(name, items, extra)
        scores: list[float | None] = []
        errors = timeouts = 0
        for value in raw:
            if value is TIMEOUT:
                timeouts += 1
                scores.append(None)
            elif isinstance(value, Exception):
                errors += 1
                if isinstance(value, WorkerError):
                    reason = str(value)
                else:
                    reason = f"{type(value).__name__}: {value}"
                log.warning("verifier %s failed: %s", getattr(fn, "__name__", fn), reason)
                scores.append(None)
            else:  # a float, or None: the verifier cannot judge this one
                scores.append(value)
        return scores, errors, timeouts

    def __call__(
        self, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]
    ) -> tuple[list[float], list[bool], dict]:
        n = len(completions)
        total = [0.0] * n
        metrics: dict[str, float] = {
            "reward/errors": 0.0,
            "reward/timeouts": 0.0,
            "reward/unjudged": 0.0,
        }
        correct: list[bool] = []
        for i, ((fn, extra, pool), name, weight) in enumerate(
            zip(self.fns, self.names, self.weights)
        ):
            scores, errors, timeouts = self._scores(
                fn, extra, pool, name, prompts, completions, columns
            )
            metrics["reward/errors"] += errors
            metrics["reward/timeouts"] += timeouts
            metrics["reward/unjudged"] += sum(s is None for s in scores)
            filled = [self.none_value if s is None else s for s in scores]
            total = [t + weight * s for t, s in zip(total, filled)]
            metrics[f"reward/{name.rsplit(':', 1)[-1]}/mean"] = sum(filled) / max(n, 1)
            if i == 0:
                correct = [s is not None and s >= 1.0 for s in scores]
        return total, correct, metrics


def _close_pools(pools: list[VerifierPool]) -> None:
    for pool in pools:
        pool.close()


def build_reward(cfg: RewardConfig) -> RewardFn:
    """The batch scorer of a `reward` section. Call its `close()` when done with it."""
    return RewardFn(cfg)
