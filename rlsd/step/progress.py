"""What a run tells its user while it trains, and when it must stop because it cannot learn.

`StepDisplay`: on a terminal, a progress bar; otherwise (nohup, CI, a notebook cell) one plain
line per step with the same figures, flushed at once, so a redirected run is never silent.

`Watch` counts consecutive steps that went wrong and says when to stop (with a checkpoint):
- `train.max_nonfinite_steps` steps whose gradient was NaN or infinite (each one skipped);
- `train.max_idle_steps` steps in which no group carried a gradient (every group's rewards
  equal), so the model never moved: warned at each, with the likely causes;
- `reward.max_error_steps` steps in which the verifier failed on every completion;
- `rlsd.max_spanless_steps` steps, under `rlsd.thought_only`, in which no completion opened a
  reasoning span (each one plain GRPO; warned at the first).
A count of 0 never stops.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger(__name__)
WINDOW = 5  # steps in the moving average shown (single steps are noisy)


def recent_means(history: list[dict[str, Any]]) -> tuple[float, float, int]:
    """Mean reward and accuracy over the last WINDOW steps, and how many steps that is."""
    recent = history[-WINDOW:]
    n = max(len(recent), 1)
    return (
        sum(m["reward/mean"] for m in recent) / n,
        sum(m["reward/accuracy"] for m in recent) / n,
        len(recent),
    )


class StepDisplay:
    """The progress bar on a terminal, one line per step elsewhere; nothing when disabled."""

    def __init__(self, enabled: bool, total: int, done: int, stream: Any = None):
        self.enabled, self.total, self.done = enabled, total, done
        self.stream = stream or sys.stdout
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar, self.task, self.started = None, None, time.monotonic()

    def __enter__(self) -> StepDisplay:
        if self.tty:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn(
                    "reward {task.fields[reward]:.3f}  accuracy {task.fields[acc]:.3f} "
                    "(last {task.fields[n]} steps)  {task.fields[sps]:.1f} s/step"
                ),
                TimeRemainingColumn(),
            )
            self.bar.__enter__()
            self.task = self.bar.add_task(
                "train", total=self.total, completed=self.done, reward=0.0, acc=0.0, n=0, sps=0.0
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, step: int, history: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        reward, acc, n = recent_means(history)
        sps = history[-1]["perf/step_seconds"]
        if self.bar is not None:
            self.bar.update(self.task, advance=1, reward=reward, acc=acc, n=n, sps=sps)
            return
        left = (time.monotonic() - self.started) / max(step - self.done, 1) * (self.total - step)
        print(
            f"step {step}/{self.total}  reward {reward:.3f}  accuracy {acc:.3f} (last {n} "
            f"steps)  {sps:.1f} s/step  {left / 60:.1f} min left",
            file=self.stream,
            flush=True,
        )


class Watch:
    """Counts consecutive steps that went wrong; `stop_reason` says when training must stop."""

    def __init__(self, cfg: Any, method: Any, reward_fn: Any = None):
        self.cfg, self.reward_fn = cfg, reward_fn
        self.counts = {"nonfinite": 0, "spanless": 0, "idle": 0, "errors": 0}
        self.method, self.warned = method, False

    def _count(self, name: str, bad: bool) -> int:
        self.counts[name] = self.counts[name] + 1 if bad else 0
        return self.counts[name]

    def stop_reason(self, step: int, metrics: dict[str, Any]) -> tuple[str, str] | None:
        """(what happened, what to change) when training must stop after this step."""
        cfg = self.cfg
        n = self._count("nonfinite", bool(metrics.get("train/nonfinite")))
        if n >= cfg.train.max_nonfinite_steps:
            return (
                f"stopped after {n} consecutive steps with a NaN or infinite gradient "
                f"(step {step}, skipped)",
                "Lower train.lr or check the reward and data",
            )
        return (
            self._errors(step, metrics)
            or self._idle(step, metrics)
            or self._spanless(step, metrics)
        )

    def _errors(self, step: int, metrics: dict[str, Any]) -> tuple[str, str] | None:
        limit = self.cfg.reward.max_error_steps
        n = self._count("errors", metrics.get("reward/error_frac", 0.0) >= 1.0)
        if not (limit and n >= limit):
            return None
        last = getattr(self.reward_fn, "last_error", None)
        return (
            f"stopped after {n} consecutive steps in which the verifier failed on every "
            f"completion (step {step})" + (f"; its last error: {last}" if last else ""),
            "Fix the verifier: `rlsd check-reward CONFIG` runs it on the references",
        )

    def _idle(self, step: int, metrics: dict[str, Any]) -> tuple[str, str] | None:
        n = self._count("idle", bool(metrics.get("train/skipped_update")))
        if not n:
            return None
        limit, mean = self.cfg.train.max_idle_steps, metrics.get("reward/mean", 0.0)
        cause = (
            "every reward was 0"
            if mean == 0
            else "every reward was 1"
            if mean == 1
            else "the rewards were equal within every group"
        )
        log.warning(
            "step %d: no group carried a gradient (%s), so the model did not change "
            "(%d such steps in a row%s)",
            step,
            cause,
            n,
            f"; training stops at {limit}" if limit else "",
        )
        if not (limit and n >= limit):
            return None
        return (
            f"stopped after {n} consecutive steps in which the model could not learn: "
            f"{cause} (step {step})",
            "Check the verifier with `rlsd check-reward CONFIG`, make the task easier or "
            "harder, or raise rollout.num_generations so groups differ",
        )

    def _spanless(self, step: int, metrics: dict[str, Any]) -> tuple[str, str] | None:
        if not self.method.spans_required:
            return None
        limit = self.cfg.rlsd.max_spanless_steps  # the run's health limit, not the credit's
        open_tag, close_tag = self.method.span_tags
        n = self._count("spanless", metrics.get("rlsd/span_frac") == 0)
        if n and not self.warned:
            self.warned = True
            log.warning(
                "step %d: no completion opens a reasoning span (%r ... %r): under "
                "rlsd.thought_only such a step is plain GRPO%s",
                step,
                open_tag,
                close_tag,
                f"; training stops after {limit} such steps in a row" if limit else "",
            )
        if not (limit and n >= limit):
            return None
        return (
            f"stopped after {n} consecutive steps in which no completion opened a "
            f"reasoning span {open_tag!r} (step {step}); under rlsd.thought_only "
            "they train as plain GRPO",
            "Check the prompt asks for the tags, set "
            "rlsd.thought_open/thought_close to what the model writes, or drop "
            "rlsd.thought_only",
        )
