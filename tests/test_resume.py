"""Runs that survive: exact resume, refused config changes, signals, NaN gradients, kill -9."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlsd.commands.cli import main
from rlsd.schema.config import ConfigError, load_config
from rlsd.step.trainer import TrainingStopped, setup, train

from .test_cli import argv


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def weights(run_dir: Path, step: int) -> dict:
    from safetensors.torch import load_file

    ckpt = run_dir / f"checkpoint-{step}"
    files = sorted(ckpt.glob("*model*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize(
    "extra",
    [
        {"teacher.mode": "sync", "teacher.sync_every": "3"},
        {"model.lora": "false", "teacher.mode": "frozen"},
        {"algorithm.name": "grpo", "rollout.dynamic_sampling": "true"},  # extra draws per step
        {"curriculum.enabled": "true", "data.size": "8", "curriculum.min_visits": "1"},  # skips
    ],
)
def test_resume_continues_bit_identically(tiny_overrides, extra):
    base = {**tiny_overrides, **extra, "train.steps": "5", "output.save_every": "2"}
    whole = train(load_config(None, {**base, "output.run_name": "whole"}))
    # the interrupted run: stop after 3 steps, then lose the step-3 checkpoint as if the process
    # had died before writing it (the metrics line of step 3 was already written)
    part_cfg = load_config(None, {**base, "output.run_name": "part", "train.steps": "3"})
    part = train(part_cfg)
    import shutil

    shutil.rmtree(part / "checkpoint-3")
    (part / "latest").unlink()
    assert len(metrics(part)) == 3
    resumed = train(load_config(None, {**base, "output.run_name": "part"}))
    assert metrics(resumed) == metrics(whole)
    for name, tensor in weights(whole, 5).items():
        assert torch.equal(tensor, weights(resumed, 5)[name]), name
    samples = [json.loads(x)["step"] for x in (resumed / "samples.jsonl").read_text().splitlines()]
    assert samples == sorted(samples) and samples.count(3) == 8  # step 3 logged once, not twice


def test_resume_refuses_a_changed_config_and_no_resume_refuses_the_dir(tiny_overrides, capsys):
    train(load_config(None, tiny_overrides))
    run_dir = Path(tiny_overrides["output.dir"]) / "t"
    with pytest.raises(ConfigError, match="train.lr: the run in .* used 0.01, now 0.02"):
        setup(load_config(None, {**tiny_overrides, "train.lr": "0.02"}))
    assert main(["train", *argv(tiny_overrides), "--no-resume"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # more steps is a safe change: --resume continues from step 3
    assert (
        main(
            ["train", "--resume", str(run_dir), "--train.steps", "3", "--output.progress", "false"]
        )
        == 0
    )
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]
    assert main(["train", "x.yaml", "--resume", str(run_dir)]) == 2


def test_keep_last_deletes_old_checkpoints(tiny_overrides):
    run_dir = train(
        load_config(
            None,
            {
                **tiny_overrides,
                "train.steps": "4",
                "output.save_every": "1",
                "output.keep_last": "2",
            },
        )
    )
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_nonfinite_gradients_are_skipped_then_stop_with_a_checkpoint(tiny_overrides, monkeypatch):
    from rlsd.step import trainer

    real = trainer.group_advantages
    monkeypatch.setattr(
        trainer,
        "group_advantages",
        lambda *a, **k: (torch.full_like(real(*a, **k)[0], float("nan")), real(*a, **k)[1]),
    )
    cfg = load_config(
        None, {**tiny_overrides, "train.steps": "5", "train.max_nonfinite_steps": "2"}
    )
    with pytest.raises(TrainingStopped, match="2 consecutive steps with a NaN") as stop:
        train(cfg)
    assert stop.value.exit_code == 1
    run_dir = Path(tiny_overrides["output.dir"]) / "t"
    rows = metrics(run_dir)
    assert [r["train/nonfinite"] for r in rows] == [1.0, 1.0]
    assert (run_dir / "latest").read_text().strip() == "checkpoint-2"
    from safetensors.torch import load_file

    adapter = load_file(run_dir / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in adapter.items() if "lora_B" in k)


def _start(overrides: dict, steps: int) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rlsd",
            "train",
            *argv(overrides),
            "--train.steps",
            str(steps),
            "--output.save_every",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_lines(path: Path, count: int, proc: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {count} lines")


def test_sigterm_writes_a_checkpoint_and_resume_finishes(tiny_overrides):
    proc = _start(tiny_overrides, 40)
    run_dir = Path(tiny_overrides["output.dir"]) / "t"
    _wait_for_lines(run_dir / "metrics.jsonl", 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal SIGTERM" in err and "--resume" in err
    done = len(metrics(run_dir))
    assert (run_dir / "latest").read_text().strip() == f"checkpoint-{done}"


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_the_uninterrupted_run(tiny_overrides):
    steps = 6
    reference = train(
        load_config(
            None,
            {
                **tiny_overrides,
                "output.run_name": "ref",
                "train.steps": str(steps),
                "output.save_every": "1",
            },
        )
    )
    want = metrics(reference)
    rng = random.Random(0)
    for trial in range(10):
        overrides = {**tiny_overrides, "output.run_name": f"kill{trial}"}
        run_dir = Path(overrides["output.dir"]) / f"kill{trial}"
        proc = _start(overrides, steps)
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 2.5))  # during generation, the update or a checkpoint
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "rlsd",
                "train",
                *argv(overrides),
                "--train.steps",
                str(steps),
                "--output.save_every",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert metrics(run_dir) == want, f"trial {trial}"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(tiny_overrides, damage):
    from rlsd.engine.checkpoint import latest_checkpoint

    base = {**tiny_overrides, "train.steps": "3", "output.save_every": "1"}
    run_dir = train(load_config(None, base))
    target = run_dir / "checkpoint-3" / "adapter_model.safetensors"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    else:
        (run_dir / "checkpoint-3" / "optimizer.pt").unlink()
    assert latest_checkpoint(run_dir).name == "checkpoint-2"
    resumed = train(load_config(None, {**base, "train.steps": "4"}))  # redoes step 3
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3, 4]


def test_out_of_memory_is_reported_with_sizes_and_keeps_the_checkpoint(
    tiny_overrides, monkeypatch, capsys
):
    from rlsd.step import sampling

    real = sampling.sample_completions
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample_completions", flaky)
    code = main(["train", *argv(tiny_overrides), "--train.steps", "4", "--output.save_every", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "out of memory during generation at step 3 (2 prompts x 4 samples" in err
    assert "the last checkpoint (checkpoint-2) is kept" in err
    assert "--rollout.batch_size 4" in err and "--resume" in err


def test_corrupt_model_files_are_a_one_line_error(tiny_model_dir, tiny_overrides, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    code = main(["train", *argv({**tiny_overrides, "model.name": str(broken)})])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("rlsd: error: model.name: cannot load") and "\n" not in err
    assert not (Path(tiny_overrides["output.dir"]) / "t").exists()  # nothing written


def test_long_prompts_error_or_skip(tiny_overrides, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"prompt": "1 + 1", "answer": "2"})
        + "\n"
        + json.dumps({"prompt": "9 " * 300, "answer": "9"})
        + "\n"
    )
    base = {
        **tiny_overrides,
        "data.source": "file",
        "data.path": str(data),
        "data.max_prompt_tokens": "200",
    }
    from rlsd.engine.data import DataError

    with pytest.raises(DataError, match="record 1: prompt of .* tokens exceeds"):
        setup(load_config(None, base))
    run = setup(load_config(None, {**base, "data.long_prompts": "skip"}))
    assert [r.prompt for r in run.records] == ["1 + 1"]


def test_a_log_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    from rlsd.engine.rundir import truncate_log
    from rlsd.engine.runfiles import read_jsonl

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
    assert read_jsonl(log) == [{"step": 1, "a": 1}, {"step": 2, "a": 2}]  # e.g. study's finished()
    truncate_log(log, 2)
    assert log.read_text() == '{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n'
    truncate_log(log, 1)
    assert log.read_text() == '{"step": 1, "a": 1}\n'
    log.write_text('{"step": 1}\n{"step": 2, "a"\n{"step": 3}\n')  # damage inside: no guess
    with pytest.raises(ConfigError, match=r"metrics.jsonl:2: not a JSON record"):
        truncate_log(log, 3)
    with pytest.raises(ConfigError, match=r"metrics.jsonl:2: not a JSON record"):
        read_jsonl(log)
    assert log.read_text() == '{"step": 1}\n{"step": 2, "a"\n{"step": 3}\n'  # untouched


def test_write_atomic_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    from rlsd.engine.runfiles import write_atomic

    target = tmp_path / "passk.json"
    write_atomic(target, '{"k": 4}')
    assert target.read_text() == '{"k": 4}' and not list(tmp_path.glob("*.tmp"))

    def killed(*args):
        raise KeyboardInterrupt  # as if stopped between writing the temporary file and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, '{"k": 8}')
    assert target.read_text() == '{"k": 4}'


def _rehash(ckpt: Path) -> None:
    """Rewrite checksums.json to match the files as they are: damage checksums cannot see."""
    from rlsd.engine.checkpoint import file_sha256

    files = [p for p in sorted(ckpt.iterdir()) if p.is_file() and p.name != "checksums.json"]
    (ckpt / "checksums.json").write_text(json.dumps({p.name: file_sha256(p) for p in files}))


def _sums(ckpt: Path) -> dict:
    return json.loads((ckpt / "checksums.json").read_text())


def _write_sums(ckpt: Path, sums: dict) -> None:
    (ckpt / "checksums.json").write_text(json.dumps(sums))


CHECKSUM_DAMAGE = {
    "no checksums.json": lambda c: (c / "checksums.json").unlink(),
    "checksums.json is corrupt": lambda c: (c / "checksums.json").write_bytes(b"\xff{"),
    "checksums.json is malformed": lambda c: (c / "checksums.json").write_text("[1, 2]"),
    "checksums.json does not list optimizer.pt": lambda c: _write_sums(
        c, {k: v for k, v in _sums(c).items() if k != "optimizer.pt"}
    ),
    "extra.bin is not in checksums.json": lambda c: (c / "extra.bin").write_bytes(b"x"),
    "rng.pt does not match its checksum": lambda c: _write_sums(
        c, {**_sums(c), "rng.pt": "0" * 64}
    ),
    "checksums.json is malformed (a path)": lambda c: _write_sums(
        c, {**_sums(c), "../latest": "0" * 64}
    ),
}


def test_a_checkpoint_with_a_missing_or_mismatched_checksum_file_is_skipped(tiny_overrides, caplog):
    """Each way checksums.json can be missing or disagree with the files makes the checkpoint
    damaged (skipped with a warning); resuming redoes its steps exactly."""
    from rlsd.engine.checkpoint import latest_checkpoint, verify

    run_dir = train(
        load_config(None, {**tiny_overrides, "train.steps": "3", "output.save_every": "1"})
    )
    want = metrics(run_dir)
    newest = run_dir / "checkpoint-3"
    assert verify(newest) is None
    pristine = run_dir / "pristine"
    shutil.copytree(newest, pristine)
    for problem, damage in CHECKSUM_DAMAGE.items():
        shutil.rmtree(newest)
        shutil.copytree(pristine, newest)
        damage(newest)
        assert verify(newest) == problem.split(" (")[0], problem
        caplog.clear()
        assert latest_checkpoint(run_dir).name == "checkpoint-2", problem
        assert f"checkpoint-3 is damaged ({problem.split(' (')[0]})" in caplog.text
    shutil.rmtree(pristine)
    (newest / "checksums.json").unlink()
    assert main(["train", "--resume", str(run_dir), "--train.steps", "3"]) == 0
    assert metrics(run_dir) == want  # step 3 redone from checkpoint-2, exactly
    assert verify(newest) is None  # and checkpoint-3 written again, whole


def test_a_run_whose_checkpoints_are_all_damaged_is_refused_not_restarted(tiny_overrides, capsys):
    run_dir = train(load_config(None, {**tiny_overrides, "output.save_every": "1"}))
    log_before = (run_dir / "metrics.jsonl").read_bytes()
    for ckpt in ("checkpoint-1", "checkpoint-2"):
        target = run_dir / ckpt / "adapter_model.safetensors"
        target.write_bytes(target.read_bytes()[:-8] + b"\x00" * 8)
    for command in (
        ["train", "--resume", str(run_dir), "--train.steps", "3"],
        ["train", *argv(tiny_overrides), "--train.steps", "3"],  # the same command again
    ):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"rlsd: error: {run_dir}: no intact checkpoint to resume from (")
        assert "checkpoint-2: adapter_model.safetensors does not match its checksum" in err
        assert "refusing to start over at step 1" in err and "\n" not in err
    assert (run_dir / "metrics.jsonl").read_bytes() == log_before  # its history untouched
    for ckpt in ("checkpoint-1", "checkpoint-2"):  # gone, while `latest` still names one
        shutil.rmtree(run_dir / ckpt)
    assert main(["train", "--resume", str(run_dir)]) == 2
    assert "no intact checkpoint to resume from" in capsys.readouterr().err
    (run_dir / "latest").unlink()  # no checkpoint was ever written: starting at 1 is right
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]


def test_temporary_checkpoints_left_by_a_kill_are_removed_on_the_next_start(tiny_overrides):
    run_dir = train(load_config(None, tiny_overrides))
    stale = run_dir / ".checkpoint-3.x8k2_q"  # as tempfile.mkdtemp names them
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"\x00" * 1024)
    (run_dir / "latest.tmp").write_text("checkpoint-3\n")
    assert main(["train", "--resume", str(run_dir), "--train.steps", "3"]) == 0
    assert not stale.exists() and not (run_dir / "latest.tmp").exists()
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []


class _Payload:
    """A pickle that runs a command when unpickled (what weights_only=True must refuse)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "name, kind",
    [
        ("optimizer.pt", "malicious"),
        ("rng.pt", "malicious"),
        ("optimizer.pt", "not an optimizer state"),
        ("rng.pt", "not an RNG state"),
        ("rng.pt", "garbage"),
    ],
)
def test_an_unreadable_or_malicious_optimizer_or_rng_file_falls_back(
    tiny_overrides, tmp_path, caplog, name, kind
):
    """The file passes its checksum (rewritten to match) yet cannot be loaded safely: the
    checkpoint is skipped with a warning and the run continues, exactly, from the previous."""
    import pickle

    run_dir = train(
        load_config(None, {**tiny_overrides, "train.steps": "3", "output.save_every": "1"})
    )
    want = metrics(run_dir)
    target = run_dir / "checkpoint-3" / name
    marker = tmp_path / "pwned"
    if kind == "malicious":
        target.write_bytes(pickle.dumps(_Payload(marker)))
    elif kind == "not an optimizer state":
        torch.save({"state": {}, "param_groups": []}, target)
    elif kind == "not an RNG state":
        torch.save({"python": [3, [1, 2], None], "numpy": [], "torch": torch.zeros(3)}, target)
    else:
        target.write_bytes(os.urandom(512))
    _rehash(run_dir / "checkpoint-3")
    assert main(["train", "--resume", str(run_dir), "--train.steps", "3"]) == 0
    assert not marker.exists()  # nothing was unpickled
    assert metrics(run_dir) == want  # step 3 redone from checkpoint-2, exactly
    assert "checkpoint-3" in caplog.text
    assert "falling back to the previous checkpoint" in caplog.text


def test_when_no_checkpoint_can_be_read_back_the_run_stops(tiny_overrides, tmp_path, capsys):
    import pickle

    run_dir = train(load_config(None, tiny_overrides))  # one checkpoint: checkpoint-2
    log_before = (run_dir / "metrics.jsonl").read_bytes()
    (run_dir / "checkpoint-2" / "optimizer.pt").write_bytes(
        pickle.dumps(_Payload(tmp_path / "pwned"))
    )
    _rehash(run_dir / "checkpoint-2")
    assert main(["train", "--resume", str(run_dir), "--train.steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rlsd: error: {run_dir}: no checkpoint can be read back (newest: ")
    assert "optimizer.pt cannot be read (UnpicklingError" in err and "\n" not in err
    assert (run_dir / "metrics.jsonl").read_bytes() == log_before
    assert not (tmp_path / "pwned").exists()


def test_ctrl_c_during_start_up_is_one_line_and_exit_code_130(tiny_overrides, tmp_path):
    """A real SIGINT while the model loads (held there by a patched loader)."""
    marker = tmp_path / "loading"
    script = (
        "import sys, time\n"
        "import rlsd.step.run\n"
        "def slow(*a, **k):\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "    time.sleep(120)\n"
        "rlsd.step.run.load_model = slow\n"
        "import faulthandler, signal\n"
        "faulthandler.register(signal.SIGUSR1)\n"  # a hang below prints where it is
        # a background job of a shell starts with SIGINT ignored, and Python then installs no
        # handler: restore Python's own, as a terminal run has it
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from rlsd.commands.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "train", *argv(tiny_overrides)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # say where it hangs (every thread's stack), then fail
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        pytest.fail("no exit 60 s after SIGINT; its stacks:\n" + proc.communicate()[1][-6000:])
    assert proc.returncode == 130, err
    assert err.strip() == (
        "rlsd: interrupted (Ctrl-C) during train; checkpoints and logs already written are kept"
    )


def test_a_model_directory_with_only_pickled_weights_is_refused(
    tiny_model_dir, tiny_overrides, tmp_path, capsys
):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    code = main(["train", *argv({**tiny_overrides, "model.name": str(pickled)})])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(
        f"rlsd: error: model.name: {pickled} holds its weights only as pytorch_model.bin "
        "(a pickle); rlsd reads weights only from safetensors or GGUF. If you trust the "
        "file, convert it once: python -c"
    )
    assert err.endswith(f"{pickled} {pickled}-safetensors")


@pytest.mark.parametrize(
    "line, problem",
    [
        (b"\xff\xfe binary \x00\n", "not UTF-8 text"),
        (b"[1, 2]\n", "a JSON list, not an object"),
        (b'{"reward/mean": 0.5}\n', "no step"),
        (b'{"step": "2", "reward/mean": 0.5}\n', "step '2' is not a step number"),
        (b'{"step": 2, "reward/accuracy": "high"}\n', 'reward/accuracy is "high", not a number'),
        (b'{"step": 2, "reward/mean": null}\n', "reward/mean is null, not a number"),
    ],
)
def test_a_malformed_metrics_line_is_one_line_when_resuming_and_reporting(
    tiny_overrides, capsys, line, problem
):
    run_dir = train(load_config(None, tiny_overrides))
    first = (run_dir / "metrics.jsonl").read_bytes().splitlines(keepends=True)[0]
    (run_dir / "metrics.jsonl").write_bytes(first + line)
    for command in (
        ["train", "--resume", str(run_dir), "--train.steps", "3"],
        ["report", str(run_dir)],
        ["compare", str(run_dir), "--out", str(run_dir.parent / "compare")],
    ):
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"rlsd: error: {run_dir / 'metrics.jsonl'}:2: not a JSON record")
        assert f"({problem}" in err and "\n" not in err, command
