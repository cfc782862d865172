"""Two CPU processes (gloo) through `accelerate launch`: both finish, one set of files, weights
identical on every process after every step, the same update as one process on the whole batch,
and resume. Each launch starts two Python processes (about 10-20 s)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlsd.engine.distributed import reduce_metrics, shard

from .conftest import TESTS_DIR

ROOT = TESTS_DIR.parent
LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--config_file",
    str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"),
]


def base(model_dir: Path, out_dir: Path, name: str, **extra: str) -> dict[str, str]:
    return {
        "model.name": str(model_dir),
        "model.lora_r": "4",
        "model.threads": "1",
        "data.size": "64",
        "rollout.max_new_tokens": "10",
        "rollout.num_generations": "4",
        "train.prompts_per_step": "4",
        "train.micro_batch_size": "4",
        "train.steps": "3",
        "train.lr": "0.01",
        "reward.verifiers": f"{TESTS_DIR / 'rewards_for_tests.py'}:length_reward",
        "output.dir": str(out_dir),
        "output.run_name": name,
        "output.progress": "false",
        "output.log_samples": "0",
        "output.save_every": "1",
        "output.report": "false",
        **extra,
    }


def launch(args: list[str], tmp: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` to the end; it must succeed. On a hang (processes out of lockstep)
    every process it started is killed: its workers run in sessions of their own, so killing
    the launcher alone would leave them waiting in a collective."""
    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [*LAUNCH, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for child in [*psutil.Process(proc.pid).children(recursive=True), proc]:
                child.kill()
            proc.communicate()
            raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert done.returncode == 0, (
        "\n".join(  # the workers' own lines, not the launcher's
            line for line in done.stderr.splitlines() if line.startswith("[rank")
        )[-4000:]
    )
    return done


def worker(mode: str, overrides: dict, tmp: Path, out: Path) -> None:
    spec = tmp / f"{out.stem}-overrides.json"
    spec.write_text(json.dumps(overrides))
    launch([str(TESTS_DIR / "ddp_worker.py"), mode, str(spec), str(out)], tmp)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    out = {}
    settings = {
        "rlsd": {"algorithm.name": "rlsd"},
        "grpo": {"algorithm.name": "grpo"},
        "grpo-dynamic": {"algorithm.name": "grpo", "rollout.dynamic_sampling": "true"},
        "grpo-curriculum": {
            "algorithm.name": "grpo",
            "curriculum.enabled": "true",
            "curriculum.min_visits": "1",
            "data.size": "8",
        },
    }
    for name, extra in settings.items():
        result = tmp / f"{name}.json"
        worker("train", base(tiny_model_dir, tmp / "runs", name, **extra), tmp, result)
        out[name] = json.loads(result.read_text())
    return out


@pytest.mark.parametrize("method", ["rlsd", "grpo", "grpo-dynamic", "grpo-curriculum"])
def test_two_processes_train_with_identical_weights(runs, method):
    result = runs[method]
    assert [s["step"] for s in result["steps"]] == [1, 2, 3]
    for step in result["steps"]:  # every process holds the same weights after every step
        assert len(step["digests"]) == 2 and step["digests"][0] == step["digests"][1]
    assert result["steps"][0]["digests"][0] != result["steps"][-1]["digests"][0]  # it trained
    run_dir = Path(result["run_dir"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one file, written by one process
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    if method.endswith("-dynamic"):  # the main process's kept groups (1 or 2), or a round
        per_step = [sum(x["step"] == r["step"] for x in samples) for r in rows]
        assert all(n in (4, 8) for n in per_step), per_step
        assert all(r["sampling/rounds"] == int(r["sampling/rounds"]) for r in rows)  # agreed
        assert all(1 <= r["sampling/rounds"] <= 4 for r in rows)
    else:
        assert len(samples) == 3 * 2 * 4  # the main process's 2 prompts x 4 samples per step
    assert all(0.0 <= r["reward/accuracy"] <= 1.0 for r in rows)
    assert all(r["perf/peak_mem_scope"] == "run" for r in rows)  # text passes the reduction


def test_every_process_keeps_the_same_memory_of_successes(tiny_model_dir, tmp_path):
    """Each process remembers the successes of every process (gathered in rank order), so the
    store the main process checkpoints is the one every process uses."""
    extra = {"teacher.context": "sibling,memory,reference", "data.size": "4"}
    worker(
        "train",
        base(tiny_model_dir, tmp_path / "runs", "mem", **extra),
        tmp_path,
        tmp_path / "mem.json",
    )
    steps = json.loads((tmp_path / "mem.json").read_text())["steps"]
    for step in steps:
        assert len(step["memories"]) == 2 and step["memories"][0] == step["memories"][1]
        assert step["digests"][0] == step["digests"][1]
    # non-empty, so equal stores mean the successes were shared: without the gather, each
    # process would hold only its own prompts' successes
    assert json.loads(steps[-1]["memories"][0]), "some completion was correct and remembered"


def one_and_two(mode: str, spec: dict, tmp_path: Path) -> tuple[dict, dict]:
    """The worker's `mode` on one process, then on two: what each main process wrote."""
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    (tmp_path / "one.json").write_text(json.dumps({**spec, "output.run_name": "one"}))
    done = subprocess.run(
        [
            sys.executable,
            str(TESTS_DIR / "ddp_worker.py"),
            mode,
            str(tmp_path / "one.json"),
            str(one),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    worker(mode, {**spec, "output.run_name": "two"}, tmp_path, two)
    return load_file(one), load_file(two)


def test_two_halves_make_the_same_update_as_one_whole(tiny_model_dir, tmp_path):
    spec = base(tiny_model_dir, tmp_path / "runs", "x", **{"train.micro_batch_size": "3"})
    whole, halves = one_and_two("equiv", spec, tmp_path)
    assert whole.keys() == halves.keys() and any(k.startswith("grad.") for k in whole)
    assert any(whole[k].abs().max() > 0 for k in whole if k.startswith("grad."))
    for key in whole:
        torch.testing.assert_close(halves[key], whole[key], rtol=1e-5, atol=1e-7)


def test_a_process_without_trained_rows_joins_every_update(tiny_model_dir, tmp_path):
    """Two optimizer steps per rollout batch with the teacher's credit, and the second process's
    groups all equal: it has no row to score or credit, joins both steps with a zero loss, and
    the update is the one process's on the whole batch."""
    extra = {"train.ppo_epochs": "2", "train.micro_batch_size": "3", "algorithm.name": "rlsd"}
    whole, halves = one_and_two(
        "equiv-idle", base(tiny_model_dir, tmp_path / "runs", "x", **extra), tmp_path
    )
    assert any(whole[k].abs().max() > 0 for k in whole if k.startswith("grad."))
    for key in whole:
        torch.testing.assert_close(halves[key], whole[key], rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # ~30 s of subprocesses; CI runs it with -m slow
def test_a_two_process_run_resumes_where_it_stopped(runs, tiny_model_dir, tmp_path):
    overrides = base(tiny_model_dir, tmp_path / "runs", "rlsd", **{"train.steps": "2"})
    worker("train", overrides, tmp_path, tmp_path / "first.json")
    worker("train", {**overrides, "train.steps": "3"}, tmp_path, tmp_path / "second.json")
    resumed = json.loads((tmp_path / "second.json").read_text())
    assert [s["step"] for s in resumed["steps"]] == [3]  # steps 1-2 came from the checkpoint
    straight = runs["rlsd"]["steps"][-1]["digests"]
    assert resumed["steps"][0]["digests"] == straight  # as if it had never stopped
    run_dir = Path(resumed["run_dir"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reference = [
        json.loads(x)
        for x in (Path(runs["rlsd"]["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["reward/mean"] == reference[-1]["reward/mean"]


def test_shards_and_reduction_with_one_process():
    assert shard([1, 2, 3, 4], 1, 2) == [3, 4]
    with pytest.raises(ValueError, match="do not split over 3"):
        shard([1, 2, 3, 4], 0, 3)

    class One:
        num_processes = 1

    metrics = {"step": 1, "reward/mean": 0.5}
    assert reduce_metrics(One(), metrics, 10) is metrics


def test_prompts_must_split_evenly(tiny_model_dir, tmp_path):
    spec = base(tiny_model_dir, tmp_path / "runs", "odd", **{"train.prompts_per_step": "3"})
    (tmp_path / "odd.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            *LAUNCH,
            "-m",
            "rlsd.commands.cli",
            "train",
            *[x for k, v in spec.items() for x in (f"--{k}", v)],
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "train.prompts_per_step: 3 prompts do not split evenly over 2 processes" in done.stderr


ENDS_ITS_GROUP = """
import sys, tempfile
import torch.distributed as dist
from rlsd.commands.cli import main

for argv in ({argv_ok}, {argv_bad}):
    store = dist.FileStore(tempfile.mktemp(), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    code = main(argv)
    print(argv[0], code, dist.is_initialized())
"""


def test_a_command_ends_the_process_group_it_ran_in(tmp_path):
    """A launched `rlsd` process destroys its process group as the command ends, after success
    and after a user error (else gloo's threads can abort the process at exit: SIGABRT after a
    run that succeeded)."""
    script = ENDS_ITS_GROUP.format(
        argv_ok=["tasks"], argv_bad=["eval", str(tmp_path / "missing-run")]
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("tasks", "eval"))]
    assert lines == ["tasks 0 False", "eval 2 False"], done.stdout[-3000:]


LEAVES = """
import atexit, sys, tempfile
import torch.distributed as dist
from rlsd.commands.cli import run

dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp(), 1), rank=0, world_size=1)
atexit.register(lambda: print("finalized"))  # skipped when the process leaves by os._exit
sys.argv = ["rlsd", *sys.argv[1:]]
print("before", flush=False)  # still buffered when the command ends: leave() must flush it
run()
"""


@pytest.mark.parametrize("args, code", [(["tasks"], 0), (["eval", "/nonexistent/run"], 2)])
def test_a_launched_command_leaves_without_finalization(args, code):
    """Under a launcher (LOCAL_RANK set) the `rlsd` command ends its process group and leaves
    through os._exit with the command's exit code, its output flushed; no atexit handler runs
    (interpreter finalization is where gloo can abort a finished process)."""
    done = subprocess.run(
        [sys.executable, "-c", LEAVES, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "LOCAL_RANK": "0"},
    )
    assert done.returncode == code, done.stderr[-3000:]
    assert done.stdout.startswith("before") and "finalized" not in done.stdout, done.stdout
    plain = subprocess.run(  # without a launcher: a normal exit, atexit handlers run
        [sys.executable, "-c", LEAVES, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "LOCAL_RANK"},
    )
    assert plain.returncode == code and plain.stdout.rstrip().endswith("finalized"), plain.stdout
