"""What a run reports besides its log files (`runfiles.py`): the optional trackers (TensorBoard,
W&B, MLflow; `output.trackers`) get the same numbers as metrics.jsonl, which stays the source for
reports and comparisons; the run's peak memory; and quiet library logging for the progress bar.
"""

from __future__ import annotations

import gc
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

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
