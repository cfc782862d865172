"""Turn the `reward` config into one batch scorer: weighted sum of verifiers, with metrics."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import math
from pathlib import Path
from typing import Any, Callable

from ..config import ConfigError, RewardConfig
from .builtin import BUILTIN

log = logging.getLogger(__name__)


def load_callable(spec: str) -> Callable:
    """A function from 'package.module:name' or 'path/to/file.py:name'."""
    if ":" not in spec:
        raise ConfigError(f"reward.verifiers: {spec!r} is neither a built-in verifier "
                          f"({', '.join(BUILTIN)}) nor 'module:function'")
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


class RewardFn:
    """Scores a batch: `rewards, correct, metrics = reward_fn(prompts, completions, columns)`.

    `rewards` is the weighted sum (a verifier's None counts as `none_value`); `correct` says
    whether the first verifier gave full marks (>= 1), which is what `reward/accuracy` reports.
    """

    def __init__(self, cfg: RewardConfig):
        self.names = list(cfg.verifiers)
        self.weights = [float(w) for w in cfg.weights] or [1.0] * len(self.names)
        self.none_value = cfg.none_value
        self.fns = []
        for name in self.names:
            if name in BUILTIN:
                fn = BUILTIN[name]
                extra = {"marker": cfg.answer_marker, "tolerance": cfg.numeric_tolerance}
            else:
                fn, extra = load_callable(name), {}
            self.fns.append((fn, extra))

    def _run(self, fn: Callable, n: int, args: tuple, kwargs: dict) -> list[float | None]:
        try:
            scores = fn(*args, **kwargs)
            if inspect.isawaitable(scores):
                scores = asyncio.run(scores)
            scores = list(scores)
        except Exception as exc:  # a crashing verifier must not kill the run
            log.warning("verifier %s raised %s: %s", getattr(fn, "__name__", fn),
                        type(exc).__name__, exc)
            return [None] * n
        if len(scores) != n:
            log.warning("verifier %s returned %d scores for %d completions",
                        getattr(fn, "__name__", fn), len(scores), n)
            return [None] * n
        return [float(s) if isinstance(s, (int, float)) and math.isfinite(s) else None
                for s in scores]

    def __call__(self, prompts: list[str], completions: list[str],
                 columns: dict[str, list[Any]]) -> tuple[list[float], list[bool], dict]:
        n = len(completions)
        total = [0.0] * n
        metrics: dict[str, float] = {}
        errors = 0
        correct: list[bool] = []
        for i, ((fn, extra), name, weight) in enumerate(zip(self.fns, self.names, self.weights)):
            scores = self._run(fn, n, (prompts, completions), {**columns, **extra})
            errors += sum(s is None for s in scores)
            filled = [self.none_value if s is None else s for s in scores]
            total = [t + weight * s for t, s in zip(total, filled)]
            label = name.rsplit(":", 1)[-1]
            metrics[f"reward/{label}/mean"] = sum(filled) / max(n, 1)
            if i == 0:
                correct = [s is not None and s >= 1.0 for s in scores]
        metrics["reward/errors"] = float(errors)
        return total, correct, metrics


def build_reward(cfg: RewardConfig) -> RewardFn:
    return RewardFn(cfg)
