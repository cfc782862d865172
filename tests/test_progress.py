"""What a run tells its user: one line per step without a terminal, a loading line, and the
health stops of runs that cannot learn (a verifier failing on every completion, rewards that
never differ within a group)."""

import io
import json
from pathlib import Path

import pytest

from rlsd.algorithms import method_for
from rlsd.schema.config import load_config
from rlsd.step.progress import StepDisplay, Watch
from rlsd.step.trainer import TrainingStopped, train

from .conftest import TESTS_DIR

REWARDS = TESTS_DIR / "rewards_for_tests.py"


def test_without_a_terminal_each_step_prints_one_line(tiny_overrides, capsys):
    cfg = load_config(None, {**tiny_overrides, "output.progress": "true", "train.steps": "2"})
    train(cfg)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("rlsd: loading ")
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["1/2", "2/2"]
    assert "(last 1 steps)" in steps[0] and "(last 2 steps)" in steps[1]  # what is averaged
    assert all("s/step" in s and "min left" in s for s in steps)


def test_on_a_terminal_the_bar_is_used_and_says_what_it_averages():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    with StepDisplay(True, 3, 0, stream) as display:
        assert display.bar is not None
        display.update(1, [{"reward/mean": 0.5, "reward/accuracy": 0.25, "perf/step_seconds": 1.0}])
    plain = io.StringIO()
    with StepDisplay(True, 3, 0, plain) as display:
        display.update(1, [{"reward/mean": 0.5, "reward/accuracy": 0.25, "perf/step_seconds": 1.0}])
    assert plain.getvalue().startswith("step 1/3  reward 0.500  accuracy 0.250 (last 1 steps)")
    quiet = io.StringIO()
    with StepDisplay(False, 3, 0, quiet) as display:
        display.update(1, [{"reward/mean": 0.5, "reward/accuracy": 0.25, "perf/step_seconds": 1.0}])
    assert quiet.getvalue() == ""


def test_a_verifier_that_always_fails_stops_the_run(tiny_overrides):
    cfg = load_config(
        None,
        {
            **tiny_overrides,
            "reward.verifiers": f"{REWARDS}:crashing_reward",
            "train.steps": "6",
            "reward.max_error_steps": "2",
        },
    )
    with pytest.raises(TrainingStopped, match="verifier failed on every completion") as stop:
        train(cfg)
    assert stop.value.exit_code == 1 and "rlsd check-reward" in str(stop.value)
    assert (  # the message names the error and the record it came from
        "its last error: verifier crashing_reward raised on 8 of 8 completions: "
        "RuntimeError: verifier bug (first: completion 1, record '" in str(stop.value)
    )
    run_dir = Path(cfg.output.dir) / cfg.output.run_name
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["reward/error_frac"] == 1.0
    assert (run_dir / "checkpoint-2").is_dir()


def test_a_run_that_cannot_learn_says_so_and_stops(tiny_overrides, caplog):
    cfg = load_config(
        None,
        {
            **tiny_overrides,
            "reward.verifiers": f"{REWARDS}:always_one",
            "train.steps": "6",
            "train.max_idle_steps": "3",
        },
    )
    with pytest.raises(TrainingStopped, match="could not learn: every reward was 1") as stop:
        train(cfg)
    assert stop.value.exit_code == 1 and "rollout.num_generations" in str(stop.value)
    said = [r.getMessage() for r in caplog.records if "no group carried a gradient" in r.message]
    assert len(said) == 3 and "3 such steps in a row" in said[-1]


def test_watch_counts_consecutive_steps_only():
    cfg = load_config(None, {"train.max_idle_steps": "2", "reward.max_error_steps": "0"})
    watch = Watch(cfg, method_for(cfg))
    idle = {"train/skipped_update": 1.0, "reward/mean": 0.0}
    assert watch.stop_reason(1, idle) is None
    assert watch.stop_reason(2, {"train/skipped_update": 0.0}) is None  # it learnt: reset
    assert watch.stop_reason(3, idle) is None
    assert "every reward was 0" in watch.stop_reason(4, idle)[0]
    assert all(watch.stop_reason(s, {"reward/error_frac": 1.0}) is None for s in range(5, 20))


def test_a_busy_cpu_gets_a_hint_about_threads(monkeypatch, caplog):
    import os

    import torch

    from rlsd.engine.models import busy_cpu_hint, set_threads

    assert busy_cpu_hint(0.9, 2, 2) is None  # not busy
    assert busy_cpu_hint(3.0, 2, 1) is None  # one thread already
    hint = busy_cpu_hint(1.94, 2, 2)
    assert "load average 1.9 on 2 cores" in hint and "--model.threads 1" in hint
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    with caplog.at_level("WARNING", logger="rlsd"):
        set_threads(0, torch.device("cpu"), main=False)  # only the main process says it
        assert caplog.text == ""
        set_threads(3, torch.device("cpu"), main=True)  # the user chose: nothing to say
        assert caplog.text == "" and chosen == [3]
        set_threads(0, torch.device("cpu"), main=True)
    assert "torch will run 4 threads" in caplog.text and chosen == [3]
