"""Optional trackers (TensorBoard, W&B, MLflow) get the same numbers as metrics.jsonl; the
peak-memory figure they all log restarts at each run."""

import json
from pathlib import Path

import pytest
import torch

from rlsd.schema import sections
from rlsd.schema.config import ConfigError, load_config
from rlsd.step import tracking
from rlsd.step.trainer import train


def trained(tiny_overrides, trackers: str) -> tuple[Path, list[dict]]:
    cfg = load_config(
        None, {**tiny_overrides, "output.trackers": trackers, "output.project": "rlsd-test"}
    )
    run_dir = train(cfg)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, rows


def test_tensorboard_events_equal_the_jsonl(tiny_overrides):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, rows = trained(tiny_overrides, "[tensorboard]")
    logdir = run_dir / "tensorboard" / "rlsd-test"
    events = EventAccumulator(str(logdir))
    events.Reload()
    for key in ("reward/mean", "reward/accuracy", "perf/step_seconds", "rlsd/weight_mean"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows]


def test_mlflow_run_holds_the_metrics_and_config(tiny_overrides, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir, rows = trained(tiny_overrides, "[mlflow]")
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    [experiment] = [e for e in client.search_experiments() if e.name == "rlsd-test"]
    [found] = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == run_dir.name
    assert found.data.params["algorithm.name"] == "rlsd"
    history = client.get_metric_history(found.info.run_id, "reward/accuracy")
    assert sorted((m.step, m.value) for m in history) == [
        (r["step"], pytest.approx(r["reward/accuracy"])) for r in rows
    ]


def wandb_records(path: Path) -> list:
    """Records of a W&B offline run file: a 7-byte header, then a LevelDB-style log (32 KiB
    blocks; each chunk = crc32 (4) + length (2, little-endian) + type (1: full, 2: first,
    3: middle, 4: last)) of protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, records, pending = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_holds_the_metrics(tiny_overrides, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir, rows = trained(tiny_overrides, "[wandb]")
    [offline] = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    history = [
        r.history for r in wandb_records(offline) if r.WhichOneof("record_type") == "history"
    ]
    assert history and all(h.step.num for h in history)
    values = [
        (h.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in h.item})
        for h in history
    ]
    assert [(step, h["reward/accuracy"]) for step, h in values] == [
        (r["step"], pytest.approx(r["reward/accuracy"])) for r in rows
    ]


def test_tracker_errors_are_clear(tiny_overrides, monkeypatch):
    with pytest.raises(ConfigError, match="output.trackers: unknown tracker 'neptune'"):
        load_config(None, {"output.trackers": "[neptune]"})
    with pytest.raises(ConfigError, match="names a tracker twice"):
        load_config(None, {"output.trackers": "[tensorboard, tensorboard]"})
    monkeypatch.setitem(sections.TRACKERS, "wandb", "wandb_is_not_installed_here")
    with pytest.raises(ConfigError, match=r"wandb is not installed; pip install 'rlsd\[wandb\]'"):
        load_config(None, {"output.trackers": "[wandb]"})


@pytest.mark.skipif(not tracking.PROC_CLEAR_REFS.exists(), reason="needs Linux /proc")
def test_peak_memory_restarts_at_each_run():
    cpu = torch.device("cpu")
    big = torch.ones(96 * 2**20 // 4)  # 96 MiB, written: resident
    during = tracking.peak_memory_mb(cpu)
    del big  # large blocks go back to the system
    assert tracking.reset_peak_memory(cpu) == "run"
    assert tracking.peak_memory_mb(cpu) < during - 48


def test_peak_memory_without_proc_falls_back_to_the_process_peak(monkeypatch, tmp_path):
    cpu = torch.device("cpu")
    monkeypatch.setattr(tracking, "PROC_CLEAR_REFS", tmp_path / "no-proc" / "clear_refs")
    monkeypatch.setattr(tracking, "PROC_STATUS", tmp_path / "no-proc" / "status")
    assert tracking.reset_peak_memory(cpu) == "process"
    usage = type("Usage", (), {"ru_maxrss": 3 * 2**20})
    monkeypatch.setattr(tracking.resource, "getrusage", lambda who: usage)
    monkeypatch.setattr(tracking.sys, "platform", "linux")
    assert tracking.peak_memory_mb(cpu) == 3072.0  # KiB
    monkeypatch.setattr(tracking.sys, "platform", "darwin")
    assert tracking.peak_memory_mb(cpu) == 3.0  # bytes on macOS
