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

Each built-in says which in `builtin.REGISTRY` (CONFINED or IN_PROCESS); building a RewardFn
refuses a built-in that does not (`builtin.RegistryError`), so none runs unconfined by omission.
Building it also probes the `code` verifier's sandbox (`reward.code_sandbox`), so a run that
cannot judge code stops at start-up with a ConfigError.

Every verifier is called once per completion (a batch of one). A call that raises, returns
something that is not one finite number, or runs out of time gives that completion None (counted
in `reward/errors` or `reward/timeouts`), never a crash; the run goes on. A call of the RewardFn
(one step's completions, all verifiers) ends by `reward.step_timeout` (0: 3 x `reward.timeout`),
counted once the worker pools are up: what is not scored by then counts as a time-out, and a
pool with items left is discarded, its workers killed (`isolation.VerifierPool.run`).
Nothing is logged per completion: each call keeps its `Failures` per verifier
(`RewardFn.failures`), and `RewardFn.warn_failures` logs one line per verifier and kind (how
many, the first error, the record it came from). `RewardFn.close()`
stops the worker processes (they are also stopped when the RewardFn is garbage-collected or the
interpreter exits).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .builtin import BUILTIN, CONFINED, check_registry, placement
from .isolation import VerifierPool, WorkerError, call_verifier
from .loading import TIMEOUT, config_error, load_callable
from .sandbox import sandbox_problem

if TYPE_CHECKING:  # the config imports torch; worker processes import this module without it
    from ...schema.config import RewardConfig

log = logging.getLogger(__name__)
DEFAULT_THREADS = 32  # `reward.workers: 0`: threads at a time for the in-process verifiers


def default_workers() -> int:
    """`reward.workers: 0`: one worker process per core, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def excerpt(text: str, width: int = 60) -> str:
    """`text` on one line, cut to `width` characters (with "...")."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def reason_of(exc: Exception) -> str:
    """'Type: message' of an item's exception (a worker's is already), on one short line."""
    text = str(exc) if isinstance(exc, WorkerError) else f"{type(exc).__name__}: {exc}"
    return excerpt(text, 200)


@dataclass
class Failures:
    """One verifier's failed items in one call (item indices, 0-based): those that raised or
    returned no valid score, each with 'Type: message', and those that ran out of time."""

    verifier: str
    total: int
    errors: list[tuple[int, str]] = field(default_factory=list)
    timeouts: list[int] = field(default_factory=list)


def failure_lines(
    failures: list[Failures],
    item: Callable[[int], str],
    noun: str = "completions",
    when: str = "",
    timeout: float | None = None,
    step_timeout: float | None = None,
) -> list[str]:
    """One line per verifier and kind: how many items raised (the first one's error and
    `item(index)`), and how many ran out of time (their own limit or the step's)."""
    lines = []
    for f in failures:
        if f.errors:
            index, reason = f.errors[0]
            lines.append(
                f"verifier {f.verifier} raised on {len(f.errors)} of {f.total} {noun}{when}: "
                f"{reason} (first: {item(index)})"
            )
        if f.timeouts:
            limit = f" ({timeout:g} s, reward.timeout" if timeout else ""
            if limit and step_timeout:
                limit += f"; {step_timeout:g} s a step, reward.step_timeout"
            limit += ")" if limit else ""
            lines.append(
                f"verifier {f.verifier} ran out of time{limit} on {len(f.timeouts)} of "
                f"{f.total} {noun}{when} (first: {item(f.timeouts[0])})"
            )
    return lines


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
    deadline: float | None = None,
) -> list[Any]:
    """Per completion, in the trainer's threads: a float, None, an exception, or TIMEOUT.

    Completions are scored in waves of `workers` concurrent threads; each wave waits at most
    `timeout` seconds, and none waits past `deadline` (a `time.monotonic()` value: the step's;
    the waves not started by then are TIMEOUT). A call that holds the GIL (C code in sympy, the
    regex engine) blocks the whole process past the timeout, and a hung thread is abandoned,
    never stopped: only the verifiers that never evaluate model output and run in linear time
    are called here (and `code`, whose sandboxed runs end at `reward.code_timeout`).
    """
    n = len(completions)
    results: list[Any] = [TIMEOUT] * n

    def work(i: int) -> None:
        row = {k: [v[i]] for k, v in columns.items()}
        results[i] = _call_one(fn, ([prompts[i]], [completions[i]]), {**row, **extra})

    for start in range(0, n, workers):
        if deadline is not None and time.monotonic() >= deadline:
            break
        wave = [
            threading.Thread(target=work, args=(i,), daemon=True)
            for i in range(start, min(start + workers, n))
        ]
        for thread in wave:
            thread.start()
        until = time.monotonic() + timeout
        until = until if deadline is None else min(until, deadline)
        for thread in wave:
            thread.join(max(0.0, until - time.monotonic()))
    return list(results)


def step_limit(cfg: RewardConfig) -> float:
    """Seconds the verifiers may take over one call's completions: `reward.step_timeout`, or
    3 x `reward.timeout` when it is 0."""
    return cfg.step_timeout or 3 * cfg.timeout


def builtin_options(cfg: RewardConfig) -> dict[str, Any]:
    """The `reward` options every built-in verifier receives as keyword arguments."""
    return {
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


def check_code_sandbox(cfg: RewardConfig) -> None:
    """Refuse (ConfigError naming `reward.code_sandbox`) a `code` verifier whose sandbox cannot
    run here: probed once, when the scorer is built, so a run fails at start-up, before any
    training, not on its first batch. `code_sandbox: none` passes with a warning."""
    if "code" not in cfg.verifiers:
        return
    problem = sandbox_problem(cfg.code_sandbox)
    if problem:
        raise config_error(f"reward.code_sandbox: {problem}")


class RewardFn:
    """Scores a batch: `rewards, correct, metrics = reward_fn(prompts, completions, columns)`.

    `rewards` is the weighted sum (a verifier's None counts as `none_value`); `correct` says
    whether the first verifier gave full marks (>= 1), which is what `reward/accuracy` reports.
    After each call, `failures` holds the verifiers that failed on some items and `last_error`
    the latest error line (with its record), which the health stop quotes.
    """

    failures: list[Failures]
    last_error: str | None = None

    def __init__(self, cfg: RewardConfig, in_process: bool = False):
        """`in_process=True` runs every verifier in the trainer's threads (the runner before
        worker processes; kept for `benchmarks/verifier_bench.py`'s side-by-side figures).
        Refuses (before any training) a built-in registered without saying where it runs, and
        the `code` verifier where its sandbox cannot run."""
        check_registry()  # never a built-in that would run unconfined by omission
        check_code_sandbox(cfg)
        self.names = list(cfg.verifiers)
        self.weights = [float(w) for w in cfg.weights] or [1.0] * len(self.names)
        self.none_value, self.timeout = cfg.none_value, cfg.timeout
        self.step_timeout = step_limit(cfg)
        # processes per pool, and threads for the in-process verifiers (`code`'s sandboxed runs
        # wait on their subprocesses: more of them at once pays even on few cores)
        self.workers = cfg.workers or default_workers()
        self.threads = cfg.workers or DEFAULT_THREADS
        memory_mb, custom_in_process = cfg.memory_mb, in_process or cfg.custom_in_process
        options = builtin_options(cfg)
        # (function, options, pool): pool None = the trainer's threads
        self.fns: list[tuple[Callable, dict, VerifierPool | None]] = []
        confined = [
            n for n in self.names if n in BUILTIN and placement(n) == CONFINED and not in_process
        ]
        custom = [n for n in self.names if n not in BUILTIN and not custom_in_process]
        self.pools = {
            kind: VerifierPool(
                names,
                self.timeout,
                memory_mb,
                self.workers,
                confine=kind == "b",
                worker_items=cfg.worker_items if kind == "b" else 0,
                isolate=cfg.isolate_completions and kind == "b",
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
        self.failures, self._last_rows = [], ([], [])

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
        deadline: float,
    ) -> tuple[list[float | None], Failures]:
        if pool is None:
            raw = run_verifier(
                fn, prompts, completions, columns, extra, self.timeout, self.threads, deadline
            )
        else:
            items = [
                (p, c, {k: [v[i]] for k, v in columns.items()})
                for i, (p, c) in enumerate(zip(prompts, completions))
            ]
            raw = pool.run(name, items, extra, deadline)
        scores: list[float | None] = []
        failed = Failures(name.rsplit(":", 1)[-1], len(raw))
        for i, value in enumerate(raw):
            if value is TIMEOUT:
                failed.timeouts.append(i)
                scores.append(None)
            elif isinstance(value, Exception):
                failed.errors.append((i, reason_of(value)))
                scores.append(None)
            else:  # a float, or None: the verifier cannot judge this one
                scores.append(value)
        return scores, failed

    def _item(self, i: int) -> str:
        """Completion i of the last call and the record it answers."""
        prompts, answers = self._last_rows
        answer = f" (answer {excerpt(answers[i], 40)!r})" if i < len(answers) else ""
        return f"completion {i + 1}, record {excerpt(prompts[i])!r}{answer}"

    def warn_failures(self, prefix: str = "", when: str = "") -> None:
        """Log the last call's failures: one line per verifier and kind, never one per item."""
        lines = failure_lines(
            self.failures,
            self._item,
            when=when,
            timeout=self.timeout,
            step_timeout=self.step_timeout,
        )
        for line in lines:
            log.warning("%s%s", prefix, line)

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
        self.failures, self._last_rows = [], (prompts, columns.get("answer", []))
        for pool in self.pools.values():  # the step's clock starts once the workers are up
            pool.ready()
        deadline = time.monotonic() + self.step_timeout
        for i, ((fn, extra, pool), name, weight) in enumerate(
            zip(self.fns, self.names, self.weights)
        ):
            scores, failed = self._scores(
                fn, extra, pool, name, prompts, completions, columns, deadline
            )
            if failed.errors or failed.timeouts:
                self.failures.append(failed)
            metrics["reward/errors"] += len(failed.errors)
            metrics["reward/timeouts"] += len(failed.timeouts)
            metrics["reward/unjudged"] += sum(s is None for s in scores)
            filled = [self.none_value if s is None else s for s in scores]
            total = [t + weight * s for t, s in zip(total, filled)]
            metrics[f"reward/{name.rsplit(':', 1)[-1]}/mean"] = sum(filled) / max(n, 1)
            if i == 0:
                correct = [s is not None and s >= 1.0 for s in scores]
        raised = [f for f in self.failures if f.errors]
        if raised:  # the latest error, with its record: what a health stop quotes
            self.last_error = failure_lines(raised[:1], self._item)[0]
        return total, correct, metrics


def _close_pools(pools: list[VerifierPool]) -> None:
    for pool in pools:
        pool.close()


def build_reward(cfg: RewardConfig) -> RewardFn:
    """The batch scorer of a `reward` section. Call its `close()` when done with it."""
    return RewardFn(cfg)
