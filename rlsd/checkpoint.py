"""Checkpoints: weights (LoRA adapter or full model, safetensors), optimizer state, trainer state.

A checkpoint is written to a temporary directory and renamed into place, so a crash mid-write
never leaves a half-written `checkpoint-N`; `latest` names the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def save_checkpoint(run_dir: Path, step: int, model: Any, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    """Write run_dir/checkpoint-<step> atomically and point run_dir/latest at it."""
    final = run_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=run_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        for path in tmp.iterdir():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = run_dir / ".latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, run_dir / "latest")
    return final

