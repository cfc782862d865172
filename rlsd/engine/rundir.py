"""A run's directory: which one a config names (a new one, or one to resume), opening it, and
cleaning up after an interrupted process. The directory is the run's identity: it holds the
resolved config, the logs (`runfiles.py`) and the checkpoints (`checkpoint.py`).
"""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import yaml

from ..schema.config import Config, ConfigError, load_config, to_yaml
from .checkpoint import check_resumable, resume_checkpoint
from .runfiles import jsonl_lines, write_atomic

log = logging.getLogger(__name__)


def run_dir_for(cfg: Config, resume: bool) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (None for a new run).

    A directory that already holds a run is resumed from its latest intact checkpoint when
    `resume` is set and the config changes nothing that matters; otherwise it is refused, never
    overwritten. The directory is the run's identity: its location and name (output.dir,
    output.run_name) are not compared with the saved config, so a run resumes by a relative or
    absolute path, from any working directory, moved or copied. A generated name (empty
    output.run_name) always starts a new run, in a directory that does not exist yet.
    """
    if not cfg.output.run_name:
        return generated_run_dir(cfg), None
    run_dir = Path(cfg.output.dir) / cfg.output.run_name
    if not (run_dir / "config.yaml").is_file():
        return run_dir, None
    if not resume:
        raise FileExistsError(
            f"{run_dir}: already holds a run; resume it (drop --no-resume) "
            "or choose another output.run_name"
        )
    check_resumable(saved_config(run_dir), cfg, str(run_dir))
    return run_dir, resume_checkpoint(run_dir)  # None: died before its first checkpoint


def saved_config(run_dir: Path) -> Config:
    """The config a run directory saved. One that holds no settings (emptied by a full disk or
    an editor) is refused as what it is: loaded, it would be the defaults, and resuming would
    then fail on the checkpoints (another model's weights) or on a field that differs, neither
    of which is the problem."""
    path = run_dir / "config.yaml"
    try:
        empty = not yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        empty = False  # load_config says what is wrong with it
    if empty:
        raise ConfigError(
            f"{path}: holds no settings (emptied?), so what the run computed is unknown; "
            "restore the file from a copy, or move the run directory away to start afresh"
        )
    return load_config(path, saved=True)


def generated_run_dir(cfg: Config) -> Path:
    """output.dir/<method>-<task>-<time>, with -2, -3... when that directory exists already
    (two runs started in the same second never share one)."""
    name = "{}-{}-{}".format(
        cfg.algorithm.name,
        cfg.data.task if cfg.data.source == "reasoning_gym" else "file",
        datetime.now().strftime("%Y%m%d-%H%M%S"),
    )
    run_dir, n = Path(cfg.output.dir) / name, 1
    while run_dir.exists() or run_dir.is_symlink():
        n += 1
        run_dir = Path(cfg.output.dir) / f"{name}-{n}"
    return run_dir


LOGS = ("metrics.jsonl", "samples.jsonl", "evals.jsonl")


def open_run_dir(cfg: Config, run_dir: Path, start: int) -> None:
    """Create the run directory, remove what a killed process left half-written, drop log lines
    written after the checkpoint we resume from (they are rewritten), and save the resolved
    config, with output.dir and output.run_name saying where the run directory is now. A run
    with a generated name says how to resume it (the same command again starts another)."""
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    remove_leftovers(run_dir)
    for name in LOGS:
        truncate_log(run_dir / name, start - 1)
    here = replace(cfg.output, dir=str(run_dir.parent), run_name=run_dir.name)
    write_atomic(run_dir / "config.yaml", to_yaml(replace(cfg, output=here)))
    if not cfg.output.run_name:
        print(
            f"rlsd: new run in {run_dir} (a generated name: the same command again starts "
            f"another run); to continue this one: rlsd train --resume {run_dir}",
            file=sys.stderr,
        )


def remove_leftovers(run_dir: Path) -> None:
    """Delete the temporary checkpoint directories (`.checkpoint-N.*`) and files (`*.tmp`) of
    writes that a kill interrupted: nothing reads them, and each can be as large as a model."""
    for path in run_dir.glob(".checkpoint-*"):
        if path.is_dir() and not path.is_symlink():
            log.info("removing %s, left by an interrupted checkpoint", path)
            shutil.rmtree(path, ignore_errors=True)
    for name in ("latest", "config.yaml", *LOGS):
        leftover = run_dir / f"{name}.tmp"
        if leftover.is_file() and not leftover.is_symlink():
            leftover.unlink()


def truncate_log(path: Path, step: int) -> None:
    """Keep only the lines of steps <= step (atomically): a resumed run rewrites the rest. A
    last line cut short (the process was killed while writing it) is dropped with the rest."""
    if not path.is_file():
        return
    kept = [line for line, record in jsonl_lines(path) if record["step"] <= step]
    write_atomic(path, "".join(kept))
