"""Run outputs that are always written: metrics.jsonl and samples.jsonl, one line per record.

Each line is flushed as soon as it is written, so a run that dies keeps every line it logged.
The optional trackers (TensorBoard, W&B, MLflow; `output.trackers`) get the same numbers; the
JSONL files stay the source for reports and comparisons.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class JsonlWriter:
    def __init__(self, path: Path):
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class NullWriter:
    """What the non-main processes of a multi-process run write to: nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _Unparsed(ValueError):
    """A line that is not even JSON text (what a write cut short by a kill leaves)."""


def _record(line: bytes) -> dict[str, Any]:
    """The record of one log line; ValueError saying what is wrong with it."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _Unparsed(f"not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise _Unparsed(exc.msg) from None
    except (ValueError, RecursionError) as exc:  # a 5000-digit number, deep nesting
        raise _Unparsed(type(exc).__name__) from None
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError("no step" if step is None else f"step {step!r} is not a step number")
    for key, value in record.items():  # metrics (`section/name`) are numbers, as written
        if "/" in key and not _is_metric_value(key, value):
            raise ValueError(f"{key} is {json.dumps(value)[:40]}, not a number")
    return record


def _is_metric_value(key: str, value: Any) -> bool:
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):  # a non-finite number (see _clean), or what a scope names
        return value in ("nan", "inf", "-inf") or key.endswith("_scope")
    return False


def _torn(lines: list[bytes], index: int, problem: ValueError) -> bool:
    """A last line without its newline that does not parse was cut short by a kill."""
    last = index == len(lines) - 1 and not lines[index].endswith((b"\n", b"\r"))
    return last and isinstance(problem, _Unparsed)


def jsonl_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Each record line of a run log (metrics, samples, evals; with its newline) and its
    record: a JSON object with an integer `step`. A last line cut short (the process was
    killed while writing it) is left out; damage anywhere else (bytes that are not UTF-8,
    something that is not a JSON object, no integer step, a metric that is not a number) is an
    error naming the file and 1-based line."""
    lines = Path(path).read_bytes().splitlines(keepends=True)  # binary: \n, \r\n and \r only
    out = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = _record(line)  # checks the UTF-8 first
            out.append((line.decode("utf-8"), record))
        except ValueError as exc:
            if _torn(lines, index, exc):
                break  # a torn write: the step it belonged to is rerun on resume
            raise ConfigError(
                f"{path}:{index + 1}: not a JSON record ({exc}); the log is damaged: "
                "remove that line, or move the run away to start it afresh"
            ) from None
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [record for _, record in jsonl_lines(path)]


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a process killed while writing leaves the old file (or
    none) and a stray <name>.tmp, never a truncated file that a rerun would fail to read."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> str:
    """Start a new peak-memory window, so that a run reports its own peak and not that of an
    earlier run in the same process (`rlsd study` trains many runs in one). Returns the scope
    that `peak_memory_mb` then measures: "run", or "process" where the peak cannot be reset
    (CPU outside Linux: `ru_maxrss` only grows)."""
    gc.collect()  # drop what an earlier run left unreferenced before the new window starts
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return "run"
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM) to the current one
        PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return "process"
    return "run"


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the peak resident set size on CPU, since the last
    `reset_peak_memory` (Linux, CUDA) or since the process started (elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS: bytes; else KiB


def build_trackers(names: list[str], project: str, run_dir: Path) -> list[Any]:
    """Accelerate tracker objects for `output.trackers`, writing inside the run directory:
    TensorBoard event files under run_dir/tensorboard/<project>, W&B files under run_dir/wandb
    (online unless WANDB_MODE=offline), MLflow runs in run_dir/mlflow.db (SQLite) unless
    MLFLOW_TRACKING_URI names another store or a server. Availability was checked when the config
    was loaded."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    trackers: list[Any] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(project, run_dir / "tensorboard"))
        elif name == "wandb":
            trackers.append(WandBTracker(project, name=run_dir.name, dir=str(run_dir)))
        elif name == "mlflow":
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
            trackers.append(MLflowTracker(project, run_name=run_dir.name))
    return trackers


def tracker_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record (trackers take scalars only)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and math.isfinite(v) and k != "step"
    }


def flat_config(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`section.field` -> scalar (lists and dicts as text), for tracker hyperparameter tables."""
    return {
        f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) else str(value)
        for section, fields in config.items()
        for key, value in fields.items()
    }


def quiet_libraries(debug: bool) -> None:
    """Keep the terminal for our progress bar: no library progress bars or chatter."""
    import warnings

    import transformers

    if not debug:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        warnings.filterwarnings("ignore", category=FutureWarning)
