"""Turn the `reward` config into one batch scorer: weighted verifiers run safely, with metrics.

Every verifier is called once per completion (a batch of one), in a daemon thread, up to
`reward.workers` at a time, each wave waited for at most `reward.timeout` seconds. A call
that raises, returns something that is not one finite number, or runs out of time gives that
completion None (counted in `reward/errors` or `reward/timeouts`), never a crash; the run goes
on. A call that never returns is abandoned (its thread cannot be killed; code that must be
stopped for real belongs in the sandboxed `code` verifier, which runs in a subprocess).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ConfigError, RewardConfig
from .builtin import BUILTIN

log = logging.getLogger(__name__)
TIMEOUT = object()  # marks a call that ran out of time


def load_callable(spec: str) -> Callable:
    """A function from 'package.module:name' or 'path/to/file.py:name'."""
    if ":" not in spec:
        raise ConfigError(
            f"reward.verifiers: {spec!r} is neither a built-in verifier "
            f"({', '.join(BUILTIN)}) nor 'module:function'"
        )
    target, name = spec.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"reward.verifiers: file not found: {path}")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as exc:
        raise ConfigError(f"reward.verifiers: cannot import {target!r}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward.verifiers: {target!r} has no function {name!r}")
    return fn


def _call_one(fn: Callable, args: tuple, kwargs: dict) -> Any:
    """One completion's score, or the exception it raised."""
    try:
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(result)
        scores = list(result)
        if len(scores) != 1:
            raise ValueError(f"returned {len(scores)} scores for 1 completion")
        return scores[0]
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
    """Per completion: a float, an exception, or TIMEOUT.

    Completions are scored in waves of `workers` concurrent threads; each wave waits at most
    `timeout` seconds, so a hung call costs one timeout and never blocks the next wave.
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

    def __init__(self, cfg: RewardConfig):
        self.names = list(cfg.verifiers)
        self.weights = [float(w) for w in cfg.weights] or [1.0] * len(self.names)
        self.none_value, self.timeout, self.workers = cfg.none_value, cfg.timeout, cfg.workers
        options = {
            "extract": cfg.extract,
            "marker": cfg.answer_marker,
            "tolerance": cfg.numeric_tolerance,
            "rel_tolerance": cfg.numeric_rel_tolerance,
            "pattern": cfg.pattern,
            "code_timeout": cfg.code_timeout,
            "code_memory_mb": cfg.code_memory_mb,
            "code_score": cfg.code_score,
            "format_think": cfg.format_think,
            "format_partial": cfg.format_partial,
        }
        self.fns = []
        for name in self.names:
            if name in BUILTIN:
                self.fns.append((BUILTIN[name], options))
            else:
                self.fns.append((load_callable(name), {}))

    def _scores(
        self,
        fn: Callable,
        extra: dict,
        prompts: list[str],
        completions: list[str],
        columns: dict[str, list[Any]],
    ) -> tuple[list[float | None], int, int]:
        raw = run_verifier(fn, prompts, completions, columns, extra, self.timeout, self.workers)
        scores: list[float | None] = []
        errors = timeouts = 0
        for value in raw:
            if value is TIMEOUT:
                timeouts += 1
                scores.append(None)
            elif isinstance(value, Exception):
                errors += 1
                log.warning(
                    "verifier %s raised %s: %s",
                    getattr(fn, "__name__", fn),
                    type(value).__name__,
                    value,
                )
                scores.append(None)
            elif value is None:
                scores.append(None)  # the verifier cannot judge this one
            elif (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            ) or isinstance(value, bool):
                scores.append(float(value))
            else:
                errors += 1
                scores.append(None)
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
        for i, ((fn, extra), name, weight) in enumerate(zip(self.fns, self.names, self.weights)):
            scores, errors, timeouts = self._scores(fn, extra, prompts, completions, columns)
            metrics["reward/errors"] += errors
            metrics["reward/timeouts"] += timeouts
            metrics["reward/unjudged"] += sum(s is None for s in scores)
            filled = [self.none_value if s is None else s for s in scores]
            total = [t + weight * s for t, s in zip(total, filled)]
            metrics[f"reward/{name.rsplit(':', 1)[-1]}/mean"] = sum(filled) / max(n, 1)
            if i == 0:
                correct = [s is not None and s >= 1.0 for s in scores]
        return total, correct, metrics


def build_reward(cfg: RewardConfig) -> RewardFn:
    return RewardFn(cfg)
