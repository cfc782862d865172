"""Checkpoints: weights (LoRA adapter or full model, safetensors), optimizer, RNG, trainer state.

A checkpoint is written to a temporary directory, flushed to disk and renamed into place, so a
crash mid-write never leaves a half-written `checkpoint-N`; `latest` names the newest complete
one. Everything is read back without unpickling arbitrary objects: weights from safetensors,
optimizer and RNG state with `torch.load(weights_only=True)`.

A checkpoint is used only when `checksums.json` lists every one of its files with the right
SHA-256; one without it, with a damaged one, or whose files cannot be read back is skipped with
a warning and the previous one used. A run whose checkpoints are all damaged is refused, never
started over on top of its own history.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..schema.config import Config, ConfigError, to_dict, unused_fields
from .runfiles import write_atomic
from .sharding import shard_optimizer_state

if TYPE_CHECKING:  # the types restore() fills, for the reader only
    from .context import ContextMemory
    from .curriculum import PassRates
    from .data import PromptStream
    from .teacher import Teacher

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


def _rng_parts(state: dict[str, Any]) -> tuple[tuple, tuple, torch.Tensor]:
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    numpy_state = (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    return (version, tuple(internal), gauss), numpy_state, state["torch"]


def check_rng_state(state: Any) -> None:
    """Raise unless `state` is what `rng_state` returns: tried on throwaway generators, so a
    malformed state is found before anything of the run changes."""
    python, numpy_state, torch_state = _rng_parts(state)
    random.Random().setstate(python)
    np.random.RandomState().set_state(numpy_state)
    torch.Generator().set_state(torch_state)


def set_rng_state(state: dict[str, Any]) -> None:
    python, numpy_state, torch_state = _rng_parts(state)
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer | dict[str, Any],
    state: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
    keep_last: int = 0,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write run_dir/checkpoint-<step> atomically, point run_dir/latest at it, and delete all
    but the newest `keep_last` checkpoints (0 keeps all). `weights` (the model's state dict)
    and an optimizer state dict, when given, are written instead of the model's and the
    optimizer's own: a sharded model's, gathered whole (sharding.full_state)."""
    final = run_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=run_dir))
    try:
        given = {} if weights is None else {"state_dict": weights}
        model.save_pretrained(tmp, safe_serialization=True, **given)
        optimizer_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        torch.save(optimizer_state, tmp / "optimizer.pt")
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


REQUIRED = ("trainer_state.json", "optimizer.pt", "rng.pt")  # besides the weights
SHA256 = re.compile(r"[0-9a-f]{64}")
CHECKPOINT = re.compile(r"checkpoint-([0-9]+)")


class DamagedCheckpoint(ConfigError):
    """A checkpoint whose files cannot be read back; the message names the file."""


def verify(ckpt: Path) -> str | None:
    """None when checksums.json lists every file of the checkpoint (the required ones among
    them) and each matches its SHA-256; else what is wrong. A checkpoint without checksums
    cannot be trusted and counts as damaged."""
    try:
        return _verify(ckpt)
    except OSError as exc:  # a directory or file that cannot be read
        return f"cannot be read ({_first_line(exc)})"


def _verify(ckpt: Path) -> str | None:
    sums_file = ckpt / "checksums.json"
    if not sums_file.is_file():
        return "no checksums.json"
    try:
        sums = json.loads(sums_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return "checksums.json is corrupt"
    if not isinstance(sums, dict) or not all(
        isinstance(name, str)
        and name not in ("", ".", "..", "checksums.json")
        and Path(name).name == name
        and isinstance(want, str)
        and SHA256.fullmatch(want)
        for name, want in sums.items()
    ):
        return "checksums.json is malformed"
    weights = [n for n in sums if n == "adapter_model.safetensors" or n.startswith("model")]
    for name in (*REQUIRED, *([] if weights else ["the model weights"])):
        if name not in sums:
            return f"checksums.json does not list {name}"
    present = {p.name for p in ckpt.iterdir() if p.is_file()} - {"checksums.json"}
    unlisted = sorted(present - set(sums))
    if unlisted:
        return f"{unlisted[0]} is not in checksums.json"
    for name, want in sums.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != want:
            return f"{name} does not match its checksum"
    return None


def checkpoint_step(ckpt: Path) -> int:
    return int(CHECKPOINT.fullmatch(ckpt.name).group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (complete or not)."""
    found = [p for p in run_dir.glob("checkpoint-*") if CHECKPOINT.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=checkpoint_step)


def intact_checkpoints(run_dir: Path, before: int | None = None) -> Iterator[Path]:
    """The checkpoints (of steps below `before`) whose files all match their checksums, newest
    first, each verified when reached; a damaged one is skipped with a warning."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        if before is not None and checkpoint_step(ckpt) >= before:
            continue
        problem = verify(ckpt)
        if problem is None:
            yield ckpt
        else:
            log.warning(
                "%s is damaged (%s); falling back to the previous checkpoint", ckpt, problem
            )


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files all match their checksums; damaged ones are skipped
    with a warning (the previous one is used)."""
    return next(intact_checkpoints(run_dir), None)


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a run directory resumes from: its newest intact one, or None when the run
    stopped before its first checkpoint. When it had checkpoints (or a `latest`) and none is
    intact, resuming would start over at step 1 on top of its history: refused."""
    ckpt = latest_checkpoint(run_dir)
    found = list_checkpoints(run_dir)
    if ckpt is not None or not (found or (run_dir / "latest").exists()):
        return ckpt
    raise ConfigError(
        f"{run_dir}: no intact checkpoint to resume from ("
        + (", ".join(f"{c.name}: {verify(c)}" for c in found[-3:]) or "latest names one, none left")
        + "); refusing to start over at step 1 on top of the run's history. Restore a "
        "checkpoint, or move the run directory away to start afresh"
    )


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read(ckpt: Path, name: str, read: Any) -> Any:
    """read(path) of one file of a checkpoint; any failure is a DamagedCheckpoint naming it."""
    try:
        return read(ckpt / name)
    except Exception as exc:  # unreadable, truncated, not what it claims to be, or malicious
        raise DamagedCheckpoint(f"{ckpt / name} cannot be read ({_first_line(exc)})") from None


def read_weights(ckpt: Path, lora: bool) -> dict[str, torch.Tensor]:
    """The trainable weights of a checkpoint (LoRA adapter or full model), from safetensors."""
    names = (
        ["adapter_model.safetensors"]
        if lora
        else sorted(p.name for p in ckpt.glob("model*.safetensors"))
    )
    if not names or not (ckpt / names[0]).is_file():
        raise DamagedCheckpoint(f"{ckpt}: no model weights in the checkpoint")
    state: dict[str, torch.Tensor] = {}
    for name in names:
        state.update(_read(ckpt, name, load_file))
    return state


def load_trainable(model: Any, ckpt: Path, lora: bool) -> None:
    """Load a checkpoint's weights into the (freshly built) policy, exactly."""
    apply_weights(model, read_weights(ckpt, lora), lora, ckpt)


def apply_weights(model: Any, state: dict[str, torch.Tensor], lora: bool, ckpt: Path) -> None:
    """Copy weights read by `read_weights` into the policy (sharded or not); keys that do not
    fit are an error."""
    if lora:  # peft lays whole tensors out like sharded parameters itself
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
        return
    from .sharding import like_params

    try:
        missing, unexpected = model.load_state_dict(like_params(model, state), strict=False)
    except RuntimeError as exc:  # shapes that differ: another model than the run's
        raise ConfigError(f"{ckpt}: weights do not match the model ({_first_line(exc)})") from None
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ConfigError(
            f"{ckpt}: weights do not match the model (missing "
            f"{sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})"
        )


@dataclass
class Saved:
    """A checkpoint read back into memory and checked, before anything of the run changes."""

    state: dict[str, Any]  # trainer_state.json: step, data cursor, teacher sync, memory
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    teacher: dict[str, torch.Tensor] | None
    weights: dict[str, torch.Tensor]


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary unpickling


def _json_load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_state(ckpt: Path, lora: bool) -> Saved:
    """Read every file of a checkpoint (trainer state, optimizer, RNG, teacher snapshot,
    weights) and check its shape; anything unreadable or malformed raises DamagedCheckpoint."""
    state = _read(ckpt, "trainer_state.json", _json_load)
    data = state.get("data") if isinstance(state, dict) else None
    if not (
        isinstance(data, dict)
        and _is_count(state.get("step"))
        and state["step"] == checkpoint_step(ckpt)
        and _is_count(data.get("epoch"))
        and _is_count(data.get("pos"))
        and _is_count(state.get("teacher_synced_at", 0))
    ):
        raise DamagedCheckpoint(f"{ckpt / 'trainer_state.json'} is malformed")
    optimizer = _read(ckpt, "optimizer.pt", _torch_load)
    if not (
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("state"), dict)
        and isinstance(optimizer.get("param_groups"), list)
    ):
        raise DamagedCheckpoint(f"{ckpt / 'optimizer.pt'} is not an optimizer state")
    rng = _read(ckpt, "rng.pt", _torch_load)
    try:
        check_rng_state(rng)
    except Exception as exc:
        raise DamagedCheckpoint(
            f"{ckpt / 'rng.pt'} is not an RNG state ({_first_line(exc)})"
        ) from None
    teacher = None
    if (ckpt / "teacher.safetensors").is_file():
        teacher = _read(ckpt, "teacher.safetensors", load_file)
    return Saved(state, optimizer, rng, teacher, read_weights(ckpt, lora))


# Fields that may differ between a run and its resumption; any other change is refused.
RESUME_SAFE = {
    "train.steps",
    "sft.steps",
    "train.max_idle_steps",
    "reward.max_error_steps",
    "reward.memory_mb",
    "reward.worker_items",
    "reward.isolate_completions",
    "train.max_nonfinite_steps",
    "rlsd.max_spanless_steps",
    "train.eval_every",
    "train.eval_items",
    "model.threads",
    "train.share_prefix",  # the same values, summed in another order (as threads, batch sizes)
    "teacher.batch_size",
    "rollout.batch_size",
    "reward.workers",
    "output.save_every",
    "output.keep_last",
    "output.log_samples",
    "output.progress",
}
# Where the run directory is and what it is called: the directory itself is the run's
# identity, so a run resumes from any working directory, by any spelling of its path, after
# being moved or copied. These are never compared (the saved values say where it last started).
LOCATION = {"output.dir", "output.run_name"}


def check_resumable(saved: Config, new: Config, where: str) -> None:
    """Refuse to resume a run under a config that changes what the run computes. Fields that
    apply to neither config's data source (`config.unused_fields`: a file run's data.task, say)
    are not compared: the saved config leaves them out, so they load as defaults."""
    old_values, new_values = to_dict(saved), to_dict(new)
    ignored = RESUME_SAFE | LOCATION | (unused_fields(saved) & unused_fields(new))
    for section, fields in old_values.items():
        for name, value in fields.items():
            key = f"{section}.{name}"
            if key not in ignored and new_values[section][name] != value:
                raise ConfigError(
                    f"{key}: the run in {where} used {value!r}, now "
                    f"{new_values[section][name]!r}; resuming would not continue "
                    "the same run (only " + ", ".join(sorted(RESUME_SAFE)) + " may change)"
                )


def restore(
    ckpt: Path,
    lm: Any,
    optimizer: Any,
    stream: PromptStream,
    teacher: Teacher | None,
    lora: bool,
    memory: ContextMemory | None = None,
    pass_rates: PassRates | None = None,
) -> int:
    """Load a checkpoint into the freshly built run; returns the first step still to run.
    The frozen teacher was copied from the initial weights before this, so it stays the
    initial policy.

    Everything is read and checked before the policy changes. A checkpoint that cannot be read
    back (an unreadable or malicious optimizer or RNG file, say: `torch.load(weights_only=True)`
    refuses it) is skipped with a warning and the previous intact one used; when none can be,
    the run stops rather than start over at step 1 on top of its history."""
    problems = []
    older = intact_checkpoints(ckpt.parent, before=checkpoint_step(ckpt))  # verified lazily
    for candidate in itertools.chain([ckpt], older):
        try:
            saved = load_state(candidate, lora)
            check_optimizer_state(optimizer, saved.optimizer)
            # replaced whole by a fallback's; laid out like the parameters (sharding.py)
            optimizer.load_state_dict(shard_optimizer_state(optimizer, saved.optimizer))
            if teacher is not None:  # the sync snapshot, replaced whole by a fallback's
                teacher.load_state(saved.state.get("teacher_synced_at", 0), saved.teacher)
            if memory is not None:
                memory.load_state_dict(saved.state.get("context_memory", []))
            if pass_rates is not None:  # a run saved before the curriculum starts it empty
                pass_rates.load_state_dict(saved.state.get("pass_rates", []))
        except (DamagedCheckpoint, ValueError, KeyError, TypeError, RuntimeError) as exc:
            problem = str(exc) if isinstance(exc, DamagedCheckpoint) else f"{candidate}: {exc}"
            problems.append(problem)
            log.warning("%s; falling back to the previous checkpoint", problem)
            continue
        stream.load_state_dict(saved.state["data"])
        apply_weights(lm, saved.weights, lora, candidate)
        set_rng_state(saved.rng)  # checked when read: the last change, nothing draws after it
        return saved.state["step"] + 1
    raise ConfigError(
        f"{ckpt.parent}: no checkpoint can be read back (newest: {problems[0]}); refusing to "
        "start over at step 1 on top of the run's history. Restore a checkpoint, or move the "
        "run directory away to start afresh"
    )


def check_optimizer_state(optimizer: Any, saved: dict[str, Any]) -> None:
    """Raise ValueError unless `saved` holds the optimizer's parameter groups, and each state
    tensor the shape of its parameter (torch checks the counts, not the shapes)."""
    groups, params = saved["param_groups"], [g["params"] for g in optimizer.param_groups]
    ids = [g.get("params") if isinstance(g, dict) else None for g in groups]
    if len(ids) != len(params) or any(
        not isinstance(i, list) or len(i) != len(p) for i, p in zip(ids, params)
    ):
        raise ValueError("optimizer.pt: its parameter groups are not this run's")
    shapes = {i: p.shape for group, ps in zip(ids, params) for i, p in zip(group, ps)}
    for index, values in saved["state"].items():
        if index not in shapes or not isinstance(values, dict):
            raise ValueError(f"optimizer.pt: state of an unknown parameter {index!r}")
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"optimizer.pt: {name!r} of parameter {index} is no tensor")
            if value.dim() and value.shape != shapes[index]:
                raise ValueError(
                    f"optimizer.pt: {name!r} of parameter {index} has shape "
                    f"{tuple(value.shape)}, not {tuple(shapes[index])}"
                )
