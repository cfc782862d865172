"""FSDP2 (`train.sharding: fsdp`) on two CPU processes (gloo, torchrun): each process holds a
shard, two processes make the update one process makes on the whole batch, checkpoints read
like unsharded ones and resume exactly, and what is not sharded yet is refused. Each launch
starts two Python processes (about 10-30 s)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlsd.checkpoint import load_trainable
from rlsd.cli import main
from rlsd.config import ConfigError, ModelConfig, load_config
from rlsd.models import load_model

from .conftest import TESTS_DIR
from .test_distributed import base

ROOT = TESTS_DIR.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
KINDS = {  # LoRA and full fine-tuning; micro-batches of 3 rows: uneven counts per process
    "lora": {"train.micro_batch_size": "3", "train.gradient_checkpointing": "true"},
    "full": {
        "train.micro_batch_size": "3",
        "model.lora": "false",
        "train.lr": "0.001",
        "train.ppo_epochs": "2",  # a second optimizer step gathers the updated weights
    },
}


def launch(mode: str, spec: dict, tmp: Path, out: Path, processes: int = 2) -> None:
    """tests/fsdp_worker.py MODE under torchrun (or as one plain process)."""
    path = tmp / f"{out.stem}-spec.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [*TORCHRUN, str(processes)] if processes > 1 else [sys.executable]
    with subprocess.Popen(
        [*command, str(TESTS_DIR / "fsdp_worker.py"), mode, str(path), str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp,
        start_new_session=True,
    ) as done:
        try:
            _, stderr = done.communicate(timeout=300)
        except subprocess.TimeoutExpired:  # a hang (processes out of lockstep)
            with contextlib.suppress(ProcessLookupError):  # torchrun stops its workers
                os.killpg(done.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                done.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(done.pid, signal.SIGKILL)
            raise
    assert done.returncode == 0, stderr[-4000:]


def fsdp(model_dir: Path, out_dir: Path, name: str, kind: str, **extra: str) -> dict[str, str]:
    settings = {"train.steps": "2", "train.sharding": "fsdp", **KINDS[kind], **extra}
    return base(model_dir, out_dir, name, **settings)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, dict]:
    """Two steps of the real trainer (rlsd, live teacher) on 2 processes, LoRA and full."""
    tmp = tmp_path_factory.mktemp("fsdp")
    out = {}
    for kind in KINDS:
        result = tmp / f"{kind}.json"
        launch("train", {"config": fsdp(tiny_model_dir, tmp / "runs", kind, kind)}, tmp, result)
        out[kind] = {**json.loads(result.read_text()), "tmp": tmp, "result": result}
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_each_process_holds_a_shard_of_every_weight(runs, kind):
    result = runs[kind]
    assert [s["step"] for s in result["steps"]] == [1, 2]
    assert result["steps"][0]["digest"] != result["steps"][1]["digest"]  # it trained
    first, second = result["steps"][-1]["shapes"]  # {name: [global, local]} per process
    assert first.keys() == second.keys() and len(first) > 10  # every weight is a DTensor
    for name, (whole, mine) in first.items():
        theirs = second[name][1]
        assert mine[0] == math.ceil(whole[0] / 2) and mine[0] + theirs[0] == whole[0], name
        assert mine[1:] == theirs[1:] == whole[1:], name
    trained = load_file(result["result"].with_suffix(".safetensors"))
    lora = [name for name in trained if "lora_" in name]
    assert len(lora) == (len(trained) if kind == "lora" else 0)  # LoRA: only the adapter
    rows = metrics(Path(result["run_dir"]))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["perf/gather_seconds"] > 0 and math.isfinite(r["loss/policy"]) for r in rows)


@pytest.mark.parametrize("kind", KINDS)
def test_a_sharded_checkpoint_reads_like_an_unsharded_one(runs, kind, tiny_model_dir, tmp_path):
    """The main process writes the whole weights in the usual files: `load_trainable` (what
    rlsd eval uses) and rlsd export read them on a plain model."""
    result, lora = runs[kind], kind == "lora"
    ckpt = Path(result["run_dir"]) / "checkpoint-2"
    trained = load_file(result["result"].with_suffix(".safetensors"))
    lm, _ = load_model(ModelConfig(name=str(tiny_model_dir), lora=lora, lora_r=4), torch.float32)
    load_trainable(lm, ckpt, lora)
    loaded = {f"lm.{n}": p.detach() for n, p in lm.named_parameters() if p.requires_grad}
    assert loaded.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(loaded[name], value), name
    assert main(["export", result["run_dir"], "--to", str(tmp_path / "exported")]) == 0
    if not lora:  # the exported weights are the trained ones
        exported = load_file(tmp_path / "exported" / "model.safetensors")
        for name, value in trained.items():
            assert torch.equal(exported[name.removeprefix("lm.")], value), name


@pytest.mark.parametrize("kind", KINDS)
def test_a_sharded_run_resumes_exactly(runs, kind, tiny_model_dir, tmp_path):
    """Resumed from checkpoint-1 (weights and AdamW state re-sharded), step 2 gives the same
    weights and metrics as the run that never stopped."""
    result = runs[kind]
    straight = Path(result["run_dir"])
    copy = tmp_path / "runs" / straight.name
    shutil.copytree(straight, copy)
    shutil.rmtree(copy / "checkpoint-2")
    spec = {"config": fsdp(tiny_model_dir, tmp_path / "runs", kind, kind)}
    launch("train", spec, tmp_path, tmp_path / "resumed.json")
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert [s["step"] for s in resumed["steps"]] == [2]  # step 1 came from the checkpoint
    assert resumed["steps"][0]["digest"] == result["steps"][1]["digest"]
    before, after = metrics(straight), metrics(copy)
    assert [r["step"] for r in after] == [1, 2]
    for key, value in before[1].items():
        if not key.startswith("perf/"):
            assert after[1][key] == value, key


SAME_BATCH = {
    # rlsd with the frozen teacher (the base model, adapter off) and the KL reference; two
    # passes per batch (old log-probs first)
    "lora-frozen-kl": (
        "lora",
        {"teacher.mode": "frozen", "algorithm.kl_coef": "0.1", "train.ppo_epochs": "2"},
        False,
    ),
    # the second process's groups all have equal rewards: it trains no row and joins each
    # optimizer step with a zero loss while the first runs three micro-batches
    "full-grpo-idle": ("full", {"algorithm.name": "grpo", "train.ppo_epochs": "2"}, True),
}


@pytest.mark.parametrize("case", SAME_BATCH)
def test_two_shards_make_the_update_of_one_whole(case, tiny_model_dir, tmp_path):
    """Two updates on one fixed batch: 2 processes under FSDP2, each with half of it, give
    the gradients and weights of 1 unsharded process with all of it (fp32; the reduction
    order differs)."""
    kind, extra, idle = SAME_BATCH[case]
    files = {}
    for sharding, processes in (("none", 1), ("fsdp", 2)):
        overrides = fsdp(tiny_model_dir, tmp_path / "runs", sharding, kind, **extra)
        spec = {"config": {**overrides, "train.sharding": sharding}, "updates": 2, "idle": idle}
        files[sharding] = tmp_path / f"{sharding}.safetensors"
        launch("equiv", spec, tmp_path, files[sharding], processes)
    whole, halves = load_file(files["none"]), load_file(files["fsdp"])
    assert whole.keys() == halves.keys()
    assert any(whole[k].abs().max() > 0 for k in whole if k.startswith("grad."))
    for key in whole:
        atol = 1e-6 if key.startswith("grad.") else 1e-5
        torch.testing.assert_close(halves[key], whole[key], rtol=1e-4, atol=atol, msg=key)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"teacher.mode": "sync"}, "teacher.mode: sync is not supported with train.sharding"),
        (
            {"algorithm.name": "opd", "teacher.mode": "external", "teacher.model": "x"},
            "teacher.mode: external is not supported with train.sharding",
        ),
        (
            {"teacher.mode": "frozen", "model.lora": "false"},
            "teacher.mode: frozen without model.lora is not supported",
        ),
        (
            {"algorithm.kl_coef": "0.1", "model.lora": "false"},
            "algorithm.kl_coef: a KL reference without model.lora is not supported",
        ),
    ],
)
def test_what_is_not_sharded_yet_is_refused(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, {"train.sharding": "fsdp", **overrides})
    load_config(None, overrides)  # fine without sharding


def test_what_is_sharded_is_accepted():
    for overrides in (
        {},
        {"model.lora": "false"},
        {"teacher.mode": "frozen"},
        {"algorithm.kl_coef": "0.1"},
        {"algorithm.name": "grpo", "model.lora": "false", "algorithm.kl_coef": "0"},
    ):
        assert load_config(None, {"train.sharding": "fsdp", **overrides}).train.sharding == "fsdp"
    with pytest.raises(ConfigError, match="train.sharding"):
        load_config(None, {"train.sharding": "deepspeed"})
