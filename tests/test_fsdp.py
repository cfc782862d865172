"""FSDP2 (`train.sharding: fsdp`) on two CPU processes (gloo, torchrun): each process holds a
shard (about half the bytes of a whole replica), two processes make the update one process
makes on the whole batch (every method, the teachers' and KL reference's sharded copies),
checkpoints read like unsharded ones and resume exactly, after a kill -9 too. Each launch
starts two Python processes (about 10-30 s); the rarer teacher and method cases are slow."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlsd.commands.cli import main
from rlsd.engine.checkpoint import load_trainable
from rlsd.engine.models import load_model
from rlsd.schema.config import ConfigError, ModelConfig, load_config

from .conftest import TESTS_DIR, build_model_dir
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


def start(mode: str, spec: dict, tmp: Path, out: Path, processes: int = 2) -> subprocess.Popen:
    """tests/fsdp_worker.py MODE under torchrun (or as one plain process), in a session of its
    own (so that `stop` reaches torchrun and its workers)."""
    path = tmp / f"{out.stem}-spec.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [*TORCHRUN, str(processes)] if processes > 1 else [sys.executable]
    return subprocess.Popen(
        [*command, str(TESTS_DIR / "fsdp_worker.py"), mode, str(path), str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen, sig: signal.Signals) -> None:
    """Send `sig` to the launcher and every worker (the whole session), then reap them."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=30)


def launch(mode: str, spec: dict, tmp: Path, out: Path, processes: int = 2) -> None:
    """Run tests/fsdp_worker.py MODE to the end; it must succeed."""
    with start(mode, spec, tmp, out, processes) as done:
        try:
            _, stderr = done.communicate(timeout=300)
        except subprocess.TimeoutExpired:  # a hang (processes out of lockstep)
            stop(done, signal.SIGTERM)  # torchrun stops its workers
            stop(done, signal.SIGKILL)
            raise
    assert done.returncode == 0, stderr[-4000:]


def fsdp(model_dir: Path, out_dir: Path, name: str, kind: str, **extra: str) -> dict[str, str]:
    settings = {"train.steps": "2", "train.sharding": "fsdp", **KINDS[kind], **extra}
    return base(model_dir, out_dir, name, **settings)


# the runs the fixture trains: full fine-tuning with the sync teacher, its snapshot sharded
# (taken at step 1, restored on resume and used in step 2)
TRAINED = {"lora": {}, "full": {"teacher.mode": "sync", "teacher.sync_every": "2"}}


def trained(model_dir: Path, out_dir: Path, kind: str) -> dict[str, str]:
    return fsdp(model_dir, out_dir, kind, kind, **TRAINED[kind])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, dict]:
    """Two steps of the real trainer (rlsd) on 2 processes: LoRA with the live teacher, full
    fine-tuning with the sync one."""
    tmp = tmp_path_factory.mktemp("fsdp")
    out = {}
    for kind in KINDS:
        result = tmp / f"{kind}.json"
        launch("train", {"config": trained(tiny_model_dir, tmp / "runs", kind)}, tmp, result)
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
        # the sync teacher's sharded snapshot, taken at step 1 (the initial weights), whole
        snapshot = load_file(ckpt / "teacher.safetensors")
        initial, _ = load_model(ModelConfig(name=str(tiny_model_dir), lora=False), torch.float32)
        assert snapshot.keys() == {f"lm.{n}" for n, _ in initial.named_parameters()}
        for name, param in initial.named_parameters():
            assert torch.equal(snapshot[f"lm.{name}"], param.detach()), name


def test_a_sharded_run_resumes_exactly(runs, tiny_model_dir, tmp_path):
    """Resumed from checkpoint-1 (LoRA weights and AdamW state re-sharded), step 2 gives the
    same weights and metrics as the run that never stopped (full fine-tuning: the kill -9
    test)."""
    kind = "lora"
    result = runs[kind]
    straight = Path(result["run_dir"])
    copy = tmp_path / "runs" / straight.name
    shutil.copytree(straight, copy)
    shutil.rmtree(copy / "checkpoint-2")
    spec = {"config": trained(tiny_model_dir, tmp_path / "runs", kind)}
    launch("train", spec, tmp_path, tmp_path / "resumed.json")
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert [s["step"] for s in resumed["steps"]] == [2]  # step 1 came from the checkpoint
    assert resumed["steps"][0]["digest"] == result["steps"][1]["digest"]
    before, after = metrics(straight), metrics(copy)
    assert [r["step"] for r in after] == [1, 2]
    for key, value in before[1].items():
        if not key.startswith("perf/"):
            assert after[1][key] == value, key


def kill_9_when_paused(marker: Path, proc: subprocess.Popen) -> None:
    """Wait until both workers wrote their process ids to MARKER-RANK (fsdp_worker.py's
    pause), then SIGKILL them and torchrun."""
    deadline, files = time.time() + 300, [Path(f"{marker}-{rank}") for rank in (0, 1)]
    while time.time() < deadline and proc.poll() is None and not all(f.is_file() for f in files):
        time.sleep(0.05)
    time.sleep(0.2)  # the ids written whole
    pids = [int(f.read_text()) for f in files if f.is_file()]
    for pid in (*pids, proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert len(pids) == 2, f"the workers never paused (exit code {proc.returncode})"


@pytest.mark.slow  # two launches and a kill (~30 s): CI runs it with -m slow
def test_kill_9_during_a_sharded_step_then_resume_equals_the_uninterrupted_run(
    runs, tiny_model_dir, tmp_path
):
    """Both processes and torchrun SIGKILLed in step 2 (checkpoint-1 written), between the two
    optimizer steps of its update (`train.ppo_epochs` 2); the resumed run redoes step 2 from
    checkpoint-1 and ends with the weights, AdamW state and metrics of
    the run that never stopped, bit for bit (full fine-tuning: every weight, AdamW state and
    the sync teacher's snapshot sharded, gathered into the checkpoint and re-sharded)."""
    straight = Path(runs["full"]["run_dir"])
    spec = {"config": trained(tiny_model_dir, tmp_path / "runs", "full")}
    killed = tmp_path / "runs" / "full"
    marker = tmp_path / "paused"
    pause = {"step": 2, "marker": str(marker)}  # after step 2's first optimizer step
    proc = start("train", {**spec, "pause": pause}, tmp_path, tmp_path / "killed.json")
    kill_9_when_paused(marker, proc)
    assert proc.returncode == -signal.SIGKILL
    assert (killed / "latest").read_text().strip() == "checkpoint-1"
    assert not (killed / "checkpoint-2").exists()
    launch("train", spec, tmp_path, tmp_path / "resumed.json")
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert [s["step"] for s in resumed["steps"]] == [2]  # step 1 came from checkpoint-1
    assert resumed["steps"][0]["digest"] == runs["full"]["steps"][1]["digest"]
    assert not list(killed.glob(".checkpoint-*"))  # what the kill left was removed
    for name in ("model.safetensors", "optimizer.pt"):
        mine, theirs = killed / "checkpoint-2" / name, straight / "checkpoint-2" / name
        assert mine.read_bytes() == theirs.read_bytes(), name
    before, after = metrics(straight), metrics(killed)
    assert [r["step"] for r in after] == [1, 2]
    for key, value in before[1].items():
        if not key.startswith("perf/"):
            assert after[1][key] == value, key


SLOW = pytest.mark.slow
SAME_BATCH = [  # (kind, overrides, idle)
    # rlsd with the frozen teacher (the base model, adapter off) and the KL reference; two
    # passes per batch (old log-probs first)
    pytest.param(
        "lora",
        {"teacher.mode": "frozen", "algorithm.kl_coef": "0.1", "train.ppo_epochs": "2"},
        False,
        id="lora-frozen-kl",
    ),
    # the second process's groups all have equal rewards: it trains no row and joins each
    # optimizer step with a zero loss while the first runs three micro-batches
    pytest.param(
        "full",
        {"algorithm.name": "grpo", "train.ppo_epochs": "2"},
        True,
        id="full-grpo-idle",
        marks=SLOW,
    ),
    # two sharded frozen copies: the sync teacher's snapshot, refreshed from the sharded
    # policy before each update, and the KL reference
    pytest.param(
        "full",
        {"teacher.mode": "sync", "teacher.sync_every": "1", "algorithm.kl_coef": "0.1"},
        False,
        id="full-sync-kl",
    ),
    pytest.param("full", {"teacher.mode": "frozen"}, False, id="full-frozen", marks=SLOW),
    pytest.param(
        "lora",
        {"teacher.mode": "sync", "teacher.sync_every": "1"},
        False,
        id="lora-sync",
        marks=SLOW,
    ),
    # distillation with LoRA at lower lrs: AdamW's first step is lr x g / (|g| + 1e-8), so a
    # gradient element near 0 (about 1e-9, equal in both runs to 1e-10 but not in ratio)
    # moves its weight by a share of lr that differs; the gradients match to 1e-6 regardless
    pytest.param(
        "lora", {"algorithm.name": "opsd", "train.lr": "0.0001"}, False, id="lora-opsd", marks=SLOW
    ),
    pytest.param("full", {"algorithm.name": "grpo_opsd"}, False, id="full-grpo_opsd", marks=SLOW),
    # the external teacher (another tiny model), sharded and gathered with the policy; lr as
    # above
    pytest.param(
        "lora",
        {"algorithm.name": "opd", "teacher.mode": "external", "train.lr": "0.001"},
        False,
        id="lora-opd",
        marks=SLOW,
    ),
]


CASES = {case.id: case.values for case in SAME_BATCH}


@pytest.fixture(scope="module")
def same_batch(tiny_model_dir, tmp_path_factory):
    """outcome(case) -> {"none": ..., "fsdp": ...}: (gradients and weights, bytes held per
    process) after two updates on one fixed batch, by 1 unsharded process with all of it and
    by 2 FSDP2 processes with half each; each case launched once."""
    done: dict[str, dict] = {}

    def outcome(case: str) -> dict[str, tuple[dict, list[dict]]]:
        if case in done:
            return done[case]
        kind, extra, idle = CASES[case]
        tmp = tmp_path_factory.mktemp(case)
        if extra.get("teacher.mode") == "external":  # same tokenizer, other weights
            extra = {**extra, "teacher.model": str(build_model_dir(tmp / "teacher", seed=1))}
        done[case] = {}
        for sharding, processes in (("none", 1), ("fsdp", 2)):
            overrides = fsdp(tiny_model_dir, tmp / "runs", sharding, kind, **extra)
            config = {**overrides, "train.sharding": sharding}
            out = tmp / f"{sharding}.safetensors"
            launch("equiv", {"config": config, "updates": 2, "idle": idle}, tmp, out, processes)
            held = json.loads(out.with_suffix(".json").read_text())
            done[case][sharding] = (load_file(out), held)
        return done[case]

    return outcome


@pytest.mark.parametrize("case", [pytest.param(c.id, marks=c.marks, id=c.id) for c in SAME_BATCH])
def test_two_shards_make_the_update_of_one_whole(case, same_batch):
    """Two updates on one fixed batch: 2 processes under FSDP2, each with half of it, give
    the gradients and weights of 1 unsharded process with all of it (fp32; the reduction
    order differs)."""
    (whole, _), (halves, _) = same_batch(case)["none"], same_batch(case)["fsdp"]
    assert whole.keys() == halves.keys()
    assert any(whole[k].abs().max() > 0 for k in whole if k.startswith("grad."))
    for key in whole:
        atol = 1e-6 if key.startswith("grad.") else 1e-5
        torch.testing.assert_close(halves[key], whole[key], rtol=1e-4, atol=atol, msg=key)


PARTS = ("parameters", "gradients", "optimizer")


@pytest.mark.parametrize("case", ["full-sync-kl", "lora-frozen-kl"])
def test_each_process_holds_about_half_of_what_ddp_holds(case, same_batch):
    """Parameters + gradients + AdamW state per process: FSDP2's local shards on 2 processes
    against one unsharded process (what every DDP process holds: a whole replica, and DDP's
    gradient buckets besides, not counted). The first
    process holds ceil(rows / 2) of each weight, a bit over half; AdamW's step counters (one
    scalar per parameter) are whole on each. The frozen copies (the sync teacher's snapshot
    and the KL reference) are halved too."""
    (_, [whole]), (_, sharded) = same_batch(case)["none"], same_batch(case)["fsdp"]
    assert len(sharded) == 2
    for mine in sharded:
        ratio = sum(mine[p] for p in PARTS) / sum(whole[p] for p in PARTS)
        assert 0.45 <= ratio <= 0.6, (ratio, mine, whole)
        for part in PARTS:
            assert mine[part] <= 0.6 * whole[part], part
    for part in ("parameters", "copies"):  # every weight is sharded: nothing held twice
        assert sum(s[part] for s in sharded) == whole[part], part


def test_what_is_sharded_is_accepted():
    for overrides in (
        {},
        {"model.lora": "false"},
        {"teacher.mode": "frozen"},
        {"teacher.mode": "frozen", "model.lora": "false"},
        {"teacher.mode": "sync"},
        {"teacher.mode": "sync", "model.lora": "false", "algorithm.kl_coef": "0.1"},
        {"algorithm.kl_coef": "0.1"},
        {"algorithm.kl_coef": "0.1", "model.lora": "false"},
        {"algorithm.name": "grpo", "model.lora": "false", "algorithm.kl_coef": "0"},
        {"algorithm.name": "opsd"},
        {"algorithm.name": "grpo_opsd", "model.lora": "false"},
        {"algorithm.name": "opd", "teacher.mode": "external", "teacher.model": "x"},
    ):
        assert load_config(None, {"train.sharding": "fsdp", **overrides}).train.sharding == "fsdp"
    with pytest.raises(ConfigError, match="train.sharding"):
        load_config(None, {"train.sharding": "deepspeed"})


@pytest.mark.parametrize(
    ("name", "processes", "machines"), [("fsdp2-8gpu", 8, 1), ("fsdp2-2nodes", 16, 2)]
)
def test_the_fsdp2_launcher_files_start_processes_for_rlsds_own_sharding(name, processes, machines):
    """accelerate reads them, starts the processes as for DDP (its FSDP plugin is refused:
    run.SHARDED), and their command turns train.sharding fsdp on."""
    from accelerate.commands.config.config_args import load_config_from_file

    from rlsd.step.run import SHARDED

    path = ROOT / "configs" / "accelerate" / f"{name}.yaml"
    launcher = load_config_from_file(str(path))
    assert launcher.distributed_type.value not in SHARDED
    assert (launcher.num_processes, launcher.num_machines) == (processes, machines)
    assert "--train.sharding fsdp" in path.read_text()
