"""Checkpoints: weights (LoRA adapter or full model, safetensors), optimizer, RNG, trainer state.

A checkpoint is written to a temporary directory, flushed to disk and renamed into place, so a
crash mid-write never leaves a half-written `checkpoint-N`; `latest` names the newest complete
one. Everything is read back without unpickling arbitrary objects: weights from safetensors,
optimizer and RNG state with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import Config, ConfigError, to_dict
from .tracking import write_atomic

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain lists and tensors (safe to load)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
    keep_last: int = 0,
) -> Path:
    """Write run_dir/checkpoint-<step> atomically, point run_dir/latest at it, and delete all
    but the newest `keep_last` checkpoints (0 keeps all)."""
    final = run_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=run_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        if extra_tensors:
            save_file(
                {k: v.contiguous() for k, v in extra_tensors.items()}, tmp / "teacher.safetensors"
            )
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        sums = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "checksums.json").write_text(json.dumps(sums, indent=2))
        for path in tmp.iterdir():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(run_dir / "latest", final.name + "\n")
    if keep_last:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(ckpt: Path) -> str | None:
    """None when every file of the checkpoint matches its recorded checksum, else what is wrong."""
    sums_file = ckpt / "checksums.json"
    if not sums_file.is_file():  # written before checksums existed: cannot be verified
        log.info("%s has no checksums.json; using it unverified", ckpt)
        return None if (ckpt / "trainer_state.json").is_file() else "no trainer_state.json"
    try:
        sums = json.loads(sums_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "checksums.json is corrupt"
    for name, want in sums.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != want:
            return f"{name} does not match its checksum"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (complete or not)."""
    found = [p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files all match their checksums; damaged ones are skipped
    with a warning (the previous one is used)."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        log.warning("%s is damaged (%s); falling back to the previous checkpoint", ckpt, problem)
    return None


def load_trainable(model: Any, ckpt: Path, lora: bool) -> None:
    """Load a checkpoint's weights into the (freshly built) policy, exactly."""
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
        return
    files = sorted(ckpt.glob("model*.safetensors"))
    if not files:
        raise ConfigError(f"{ckpt}: no model weights in the checkpoint")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ConfigError(
            f"{ckpt}: weights do not match the model (missing "
            f"{sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})"
        )


def load_state(
    ckpt: Path,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, torch.Tensor] | None]:
    """(trainer state, optimizer state, RNG state, teacher tensors or None) of a checkpoint."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    optimizer = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    rng = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)
    teacher_file = ckpt / "teacher.safetensors"
    teacher = load_file(teacher_file) if teacher_file.is_file() else None
    return state, optimizer, rng, teacher


# Fields that may differ between a run and its resumption; any other change is refused.
RESUME_SAFE = {
    "train.steps",
    "train.max_nonfinite_steps",
    "rlsd.max_spanless_steps",
    "train.eval_every",
    "train.eval_items",
    "model.threads",
    "teacher.batch_size",
    "rollout.batch_size",
    "reward.workers",
    "output.save_every",
    "output.keep_last",
    "output.log_samples",
    "output.progress",
}


def check_resumable(saved: Config, new: Config, where: str) -> None:
    """Refuse to resume a run under a config that changes what the run computes."""
    old_values, new_values = to_dict(saved), to_dict(new)
    for section, fields in old_values.items():
        for name, value in fields.items():
            key = f"{section}.{name}"
            if key not in RESUME_SAFE and new_values[section][name] != value:
                raise ConfigError(
                    f"{key}: the run in {where} used {value!r}, now "
                    f"{new_values[section][name]!r}; resuming would not continue "
                    "the same run (only " + ", ".join(sorted(RESUME_SAFE)) + " may change)"
                )
