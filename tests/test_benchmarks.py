"""The step benchmark runs end to end in its tiny-model smoke mode, TRL included, and writes the
result files in the schema the committed results use."""

import json
import subprocess
import sys

import pytest

from .conftest import TESTS_DIR

BENCH = TESTS_DIR.parent / "benchmarks" / "step_bench.py"


@pytest.mark.slow  # ~50 s: TRL's trainer too; CI runs it with -m slow
def test_step_bench_smoke_writes_its_schema(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--smoke",
            "--only",
            "trl-grpo,grpo-full,grpo,rlsd",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = list(tmp_path.glob("step-smoke-*.json"))
    data = json.loads(result.read_text())
    assert data["smoke"] is True and data["matmul_gflops"] > 0
    assert set(data["configs"]) == {"trl-grpo", "grpo-full", "grpo", "rlsd"}
    for name, config in data["configs"].items():
        assert len(config["step_s"]) == 1 and config["step_s"][0] > 0, name
        assert config["peak_mb"] > 100 and config["params"] > 0
        assert set(config) >= {"phases", "completion_tokens", "trained_frac"}
    assert {g["goal"] for g in data["goals"]} >= {
        "grpo step time <= 0.5 x TRL",
        "rlsd step time <= 1.25 x grpo",
    }
    for goal in data["goals"]:
        assert goal["ratio"] > 0 and isinstance(goal["met"], bool)
    table = result.with_suffix(".md").read_text()
    assert "| trl-grpo |" in table and "| goal | measured ratio | met |" in table


def test_logprob_bench_measures_both_paths_and_they_agree(tmp_path):
    bench = TESTS_DIR.parent / "benchmarks" / "logprob_bench.py"
    done = subprocess.run(
        [
            sys.executable,
            str(bench),
            "--rows",
            "1024",
            "--vocab",
            "16000",
            "--hidden",
            "64",
            "--chunk",
            "128",
            "--name",
            "smoke",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = list(tmp_path.glob("logprob-smoke-*.md"))
    text = result.read_text()
    assert "same values and gradients: yes" in text
    naive, chunked = (
        float(line.split("|")[2])
        for line in text.splitlines()
        if line.startswith(("| naive", "| rlsd chunked"))
    )
    # 1024 x 16000 fp32 logits are 65 MB; the ratio at full size: tests/test_logprobs.py
    assert naive > 100 and 0 < chunked < naive, (naive, chunked)


@pytest.mark.slow  # a benchmark's smoke run; CI runs it with -m slow
def test_trim_bench_smoke_times_every_pass():
    bench = TESTS_DIR.parent / "benchmarks" / "trim_bench.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--smoke"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| teacher", "| policy"))]
    assert len(rows) == 6 and all(float(row.split("|")[2]) > 0 for row in rows), rows
