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
            "trl-grpo,trl-grpo-lora,grpo-full,grpo,grpo-cache,rlsd",
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
    assert set(data["configs"]) == {
        "trl-grpo",
        "trl-grpo-lora",
        "grpo-full",
        "grpo",
        "grpo-cache",
        "rlsd",
    }
    for name, config in data["configs"].items():
        assert len(config["step_s"]) == 1 and config["step_s"][0] > 0, name
        assert config["peak_mb"] > 100 and config["params"] > 0
        assert set(config) >= {"phases", "completion_tokens", "trained_frac"}
    configs = data["configs"]
    for full in ("trl-grpo", "grpo-full"):  # every weight trained
        assert configs[full]["trainable"] == configs[full]["params"], full
    lora = configs["trl-grpo-lora"]["trainable"]  # TRL trains the adapter ours does, nothing else
    assert 0 < lora == configs["grpo"]["trainable"] < configs["trl-grpo"]["params"]
    assert {g["goal"] for g in data["goals"]} >= {
        "grpo step time <= 0.5 x TRL",
        "grpo step time <= 0.5 x TRL, LoRA",
        "rlsd step time <= 1.25 x grpo",
        "grpo step time, packed <= 1.0 x cache layout",
    }
    for goal in data["goals"]:
        assert goal["ratio"] > 0 and isinstance(goal["met"], bool)
    table = result.with_suffix(".md").read_text()
    assert "| trl-grpo |" in table and "| trl-grpo-lora |" in table
    assert "| goal | measured ratio | met |" in table


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


def test_credit_shift_reads_the_teachers_multipliers(tmp_path):
    """Hand-computed: only completions with a gradient count; the bound is lambda * eps_w."""
    sys.path.insert(0, str(TESTS_DIR.parent / "benchmarks"))
    from credit_shift import shifts

    (tmp_path / "config.yaml").write_text("rlsd: {lambda: 0.5, eps_w: 0.2}\n")
    samples = [
        {"advantage": 1.0, "correct": True, "credit_multiplier": [1.0, 0.9, 1.005]},
        {"advantage": -0.5, "correct": False, "credit_multiplier": [1.1, 1.02]},
        {"advantage": 0.0, "correct": True, "credit_multiplier": [0.5, 0.5]},  # no gradient
    ]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    s = shifts(tmp_path)
    assert s["tokens"] == 5 and s["bound"] == pytest.approx(0.1)
    assert s["within_1pct"] == pytest.approx(2 / 5) and s["at_bound"] == pytest.approx(2 / 5)
    assert s["mean_abs_shift"] == pytest.approx((0 + 0.1 + 0.005 + 0.1 + 0.02) / 5)
    assert s["mean_correct"] == pytest.approx((1.0 + 0.9 + 1.005) / 3)
    assert s["mean_incorrect"] == pytest.approx(1.06)


def test_warm_model_rebuilds_the_merged_model_and_refuses_another(tiny_model_dir, tmp_path):
    """The committed-adapter route: --record, then a rebuild that must match the digest; the
    merged model scores as the adapter on its base does; a changed digest stops the rebuild."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(TESTS_DIR.parent / "benchmarks"))
    from warm_model import main

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, param in lora.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: a zero adapter would merge to the base
            param.data.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        want = lora(ids).logits
    assert main(["--adapter", str(adapter), "--base", str(tiny_model_dir), "--record",
                 "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    assert main(["--adapter", str(adapter), "--out", str(tmp_path / "b")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32)
    with torch.no_grad():
        got = merged(ids).logits
        fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        plain = fresh(ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)
    assert (tmp_path / "b" / "tokenizer.json").is_file()
    record = json.loads((adapter / "merged.json").read_text())
    record["weights_sha256"] = "0" * 64
    (adapter / "merged.json").write_text(json.dumps(record))
    assert main(["--adapter", str(adapter), "--out", str(tmp_path / "c")]) == 1
