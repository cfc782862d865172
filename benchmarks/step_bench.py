"""Seconds per training step and peak memory: rlsd's methods and TRL's GRPOTrainer, side by side.

    python benchmarks/step_bench.py [--steps 3] [--only NAME,...]   # the real model (minutes)
    python benchmarks/step_bench.py --smoke                          # a tiny model (seconds)

Every configuration runs in a fresh subprocess (so peak memory is its own): one warm-up step,
then `--steps` timed steps; medians and min-max spread are reported. All share the model
(SmolLM2-135M-Instruct, or the tiny test model with --smoke), the prompts (the quick start's
basic_arithmetic, rendered with the chat template), the verifier, the batch (4 prompts x 4
samples, at most 64 new tokens), fp32 on the CPU, seed 0, no KL term, learning rate 0 (every
step then samples from the same weights, so our configurations draw the very same completions
and differ only in what they compute; the work per step is unchanged by the learning rate):

- `trl-grpo`: TRL's GRPOTrainer, full fine-tuning, beta 0, no gradient checkpointing;
- `grpo-full`: ours, the same work (full fine-tuning, every row trained as TRL does; rlsd
  normally skips the rows of all-equal groups, exactly, which early in training is nearly all);
- `grpo-full-gc`: the same with `train.gradient_checkpointing` (memory for time);
- `grpo`, `rlsd`, `opd`: ours with LoRA (r 16), rlsd with its default live self-teacher, opd
  with an external teacher of the same size;
- `*-noshare`: the same with `train.share_prefix: false`, every row scoring its whole
  [prompt ; completion] (the path before issue 24), beside the shared-prefix default;
- `*-cache`: the shared prompt always as its own pass whose keys and values the padded
  completions reuse (`TokenScorer.layout = "cache"`, rlsd/engine/prefix.py), beside the default that
  packs each group's completions behind its prompt where that is estimated cheaper
  (rlsd/engine/packing.py).

Also measured: the machine's fp32 matmul rate, and from it the FLOP floor of each step (forward
and backward over the trained tokens, the decode, the teacher forward), so the achieved GFLOP/s
can be read against the peak. Writes benchmarks/results/step-<name>-<date>.{json,md} and prints
the goal ratios of issue 5 with pass or fail. TRL is a benchmark-only dependency (`pip install
trl`); without it the TRL row is skipped and said so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = {
    "train.prompts_per_step": "4",
    "rollout.num_generations": "4",
    "rollout.max_new_tokens": "64",
    "train.lr": "0",
    "train.micro_batch_size": "16",
    "train.seed": "0",
    "output.progress": "false",
    "output.report": "false",
    "output.save_every": "0",
    "output.log_samples": "1",
}
CONFIGS = {
    "trl-grpo": {"model.lora": "false"},
    "trl-grpo-lora": {},  # TRL with a peft LoraConfig built from our model.lora_* defaults
    "grpo-full": {"algorithm.name": "grpo", "model.lora": "false"},
    "grpo-full-gc": {
        "algorithm.name": "grpo",
        "model.lora": "false",
        "train.gradient_checkpointing": "true",
    },
    "grpo": {"algorithm.name": "grpo"},
    # bf16 weights and compute: worth it only on CPUs with native bf16 (AVX512-BF16, AMX)
    "grpo-bf16": {"algorithm.name": "grpo", "model.dtype": "bfloat16"},
    "rlsd": {"algorithm.name": "rlsd"},
    "opd": {"algorithm.name": "opd", "teacher.mode": "external"},
}
NOSHARE = ("grpo-full", "grpo-full-gc", "grpo", "rlsd", "opd")  # each with a -noshare row
CONFIGS.update({f"{n}-noshare": {**CONFIGS[n], "train.share_prefix": "false"} for n in NOSHARE})
CACHE = ("grpo-full", "grpo", "rlsd")  # each with a -cache row (the layout set in the child)
CONFIGS.update({f"{n}-cache": CONFIGS[n] for n in CACHE})
GOALS = (
    [  # (text, numerator, denominator, key, bound)
        ("grpo step time <= 0.5 x TRL", "grpo-full", "trl-grpo", "step_s", 0.5),
        ("grpo peak memory <= 0.5 x TRL", "grpo-full", "trl-grpo", "peak_mb", 0.5),
        ("grpo step time <= 0.5 x TRL, LoRA", "grpo", "trl-grpo-lora", "step_s", 0.5),
        ("grpo peak memory <= 0.5 x TRL, LoRA", "grpo", "trl-grpo-lora", "peak_mb", 0.5),
        (
            "grpo step time <= 0.5 x TRL, gradient checkpointing",
            "grpo-full-gc",
            "trl-grpo",
            "step_s",
            0.5,
        ),
        (
            "grpo peak memory <= 0.5 x TRL, gradient checkpointing",
            "grpo-full-gc",
            "trl-grpo",
            "peak_mb",
            0.5,
        ),
        ("rlsd step time <= 1.25 x grpo", "rlsd", "grpo", "step_s", 1.25),
        ("rlsd step time <= 1.10 x grpo (issue 24)", "rlsd", "grpo", "step_s", 1.10),
        ("rlsd peak memory <= 1.05 x grpo (LoRA, frozen teacher)", "rlsd", "grpo", "peak_mb", 1.05),
        ("rlsd peak memory <= 0.6 x opd (same-size teacher)", "rlsd", "opd", "peak_mb", 0.6),
    ]
    + [  # the shared prefix (the default) against every row scored whole, per configuration
        (f"{n} step time, shared prefix <= 1.0 x unshared", n, f"{n}-noshare", "step_s", 1.0)
        for n in NOSHARE
    ]
    + [  # packing where it pays (the default) against the cache layout everywhere
        (f"{n} step time, packed <= 1.0 x cache layout", n, f"{n}-cache", "step_s", 1.0)
        for n in CACHE
    ]
)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def overrides_for(name: str, model: str, out: str) -> dict[str, str]:
    extra = dict(CONFIGS[name])
    if name.startswith("opd"):
        extra["teacher.model"] = model
    return {**SHARED, **extra, "model.name": model, "output.dir": out}


def child_ours(name: str, steps: int, model: str) -> dict:
    from rlsd.schema.config import load_config
    from rlsd.step import trainer
    from rlsd.step.tracking import quiet_libraries

    quiet_libraries(debug=False)
    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml", overrides_for(name, model, tempfile.mkdtemp())
    )
    cfg.train.steps = steps + 1
    import torch

    if name.endswith("-cache"):
        from rlsd.engine.logprobs import TokenScorer

        TokenScorer.layout = "cache"

    # Every row trained, as TRL does: early in training nearly every group has zero advantage
    # and rlsd skips them (exactly), which would leave nothing but generation to time.
    trainer.trained_rows = lambda method, kl_coef, adv: torch.ones_like(adv, dtype=torch.bool)
    run = trainer.setup(cfg)
    rows = [trainer.train_step(run, step) for step in range(1, steps + 2)][1:]
    phases = {
        p: [r[f"perf/{p}_seconds"] for r in rows]
        for p in ("step", "generate", "reward", "teacher", "train")
    }
    return {
        "step_s": phases.pop("step"),
        "phases": {k: statistics.median(v) for k, v in phases.items()},
        "completion_tokens": [r["completion/length_mean"] * 16 for r in rows],
        "trained_frac": [1 - r["adv/zero_group_frac"] for r in rows],
        "params": sum(p.numel() for p in run.lm.parameters()),
        "trainable": sum(p.numel() for p in run.lm.parameters() if p.requires_grad),
        "peak_mb": peak_rss_mb(),
    }


def child_trl(steps: int, model: str, name: str = "trl-grpo") -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlsd.engine.data import PromptRenderer, load_records
    from rlsd.engine.models import lora_config, resolve_model_path
    from rlsd.engine.rewards import build_reward
    from rlsd.schema.config import load_config

    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml", overrides_for(name, model, tempfile.mkdtemp())
    )
    where = resolve_model_path(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(where, padding_side="left")
    lm = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32)
    renderer = PromptRenderer(cfg.data, tokenizer)
    records = load_records(cfg.data)
    rows = [
        {
            "prompt": tokenizer.decode(renderer.student_ids(r)),
            "answer": r.answer,
            "solution": r.solution,
        }
        for r in records
    ]
    verify = build_reward(cfg.reward)

    def reward(prompts, completions, answer, solution, **_):  # our verifier, TRL's signature
        scores, _, _ = verify(
            prompts,
            completions,
            {"answer": answer, "solution": solution, "metadata": [{}] * len(answer)},
        )
        return [s if s is not None else 0.0 for s in scores]

    times, lengths = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"] * 16)

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=64,
        beta=0.0,
        learning_rate=0.0,
        max_steps=steps + 1,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        temperature=1.0,
        seed=0,
        disable_tqdm=True,
        shuffle_dataset=True,
    )
    trainer = GRPOTrainer(
        model=lm,
        peft_config=lora_config(cfg.model) if cfg.model.lora else None,  # our adapter
        reward_funcs=[reward],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    trainer.train()
    return {
        "step_s": times[1:],
        "phases": {},
        "completion_tokens": lengths[1:],
        "trained_frac": [],
        "params": sum(p.numel() for p in lm.parameters()),
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "peak_mb": peak_rss_mb(),
    }


def matmul_gflops(seconds: float = 2.0) -> float:
    """The machine's fp32 matmul rate (2048 x 2048), the peak the FLOP floor is taken at."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * 2048**3 * count / (time.perf_counter() - start) / 1e9


def flops(result: dict, name: str, prompt_tokens: int = 60) -> float:
    """Model FLOPs of one step (every row trained): 2 N per prefilled prompt token (once per
    prompt with our decoder, once per sample with TRL's) and per decoded token, 6 N per trained
    token (forward and backward over prompt and completion; LoRA still back-propagates through
    the base; a shared prefix counts each prompt once), and 2 N per token the teacher scores
    (rlsd, opd)."""
    n, completion = result["params"], statistics.median(result["completion_tokens"] or [0])
    rows, prompts = 16, 4
    trl = name.startswith("trl-")
    prefill = (rows if trl else prompts) * prompt_tokens
    shared = not trl and not name.endswith("-noshare")
    trained = (prompts if shared else rows) * prompt_tokens + completion
    teacher = 2 * n * trained if name.startswith(("rlsd", "opd")) else 0
    return 2 * n * (prefill + completion) + 6 * n * trained + teacher


def run_child(name: str, steps: int, model: str, smoke: bool) -> dict | None:
    cmd = [sys.executable, __file__, "--child", name, "--steps", str(steps), "--model", model]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        cmd + (["--smoke"] if smoke else []), capture_output=True, text=True, env=env, timeout=3600
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def summarise(results: dict[str, dict], peak: float) -> tuple[list[str], list[dict]]:
    lines = [
        "| config | s/step (median) | min-max | tokens/s | peak MB | GFLOP/s | floor s | "
        "generate | teacher | train |",
        "|" + "---|" * 10,
    ]
    for name, r in results.items():
        step = statistics.median(r["step_s"])
        tokens = statistics.median(r["completion_tokens"] or [0])
        work = flops(r, name)
        p = r["phases"]
        lines.append(
            f"| {name} | {step:.2f} | {min(r['step_s']):.2f}-{max(r['step_s']):.2f} | "
            f"{tokens / step:.1f} | {r['peak_mb']:.0f} | {work / step / 1e9:.1f} | "
            f"{work / peak / 1e9:.2f} | {p.get('generate', float('nan')):.2f} | "
            f"{p.get('teacher', float('nan')):.2f} | {p.get('train', float('nan')):.2f} |"
        )
    goals = []
    for name, r in results.items():  # the step within 2 x its FLOP floor at the matmul peak
        ratio = statistics.median(r["step_s"]) / (flops(r, name) / peak / 1e9)
        goals.append(
            {"goal": f"{name} step time <= 2 x its FLOP floor", "ratio": ratio, "met": ratio <= 2.0}
        )
    for text, top, bottom, key, bound in GOALS:
        if top in results and bottom in results:
            value = statistics.median(results[top][key]) if key == "step_s" else results[top][key]
            base = (
                statistics.median(results[bottom][key]) if key == "step_s" else results[bottom][key]
            )
            goals.append({"goal": text, "ratio": value / base, "met": value / base <= bound})
    lines += ["", "| goal | measured ratio | met |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['ratio']:.2f} | {'yes' if g['met'] else 'NO'} |" for g in goals]
    return lines, goals


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default=",".join(CONFIGS))
    parser.add_argument("--smoke", action="store_true", help="a tiny model, one step: seconds")
    parser.add_argument("--name", default="cpu2", help="machine name for the result files")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--child")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--table", metavar="JSON", help="only rebuild the tables of a result")
    args = parser.parse_args()
    if args.table:
        data = json.loads(Path(args.table).read_text())
        print("\n".join(summarise(data["configs"], data["matmul_gflops"])[0]))
        return
    if args.smoke:
        SHARED.update({"rollout.max_new_tokens": "8", "data.size": "32", "model.threads": "1"})
    if args.child:
        sys.path.insert(0, str(ROOT))
        result = (
            child_trl(args.steps, args.model, args.child)
            if args.child.startswith("trl-")
            else child_ours(args.child, args.steps, args.model)
        )
        print("RESULT " + json.dumps(result))
        return
    model, steps = args.model, args.steps
    if args.smoke:
        sys.path.insert(0, str(ROOT))
        from tests.conftest import build_model_dir

        model, steps = str(build_model_dir(Path(tempfile.mkdtemp()) / "tiny")), 1
    names = [n for n in args.only.split(",") if n]
    if importlib.util.find_spec("trl") is None:
        for name in [n for n in names if n.startswith("trl-")]:
            print(f"{name}: skipped (pip install trl to compare with TRL)")
            names.remove(name)
    results = {}
    for name in names:  # one line per configuration as it finishes: a long run shows progress
        start = time.perf_counter()
        results[name] = run_child(name, steps, model, args.smoke)
        step = statistics.median(results[name]["step_s"])
        print(f"{name}: {step:.2f} s/step ({time.perf_counter() - start:.0f} s)", flush=True)
    peak = matmul_gflops(0.3 if args.smoke else 2.0)
    lines, goals = summarise(results, peak)
    command = "python benchmarks/step_bench.py " + " ".join(sys.argv[1:])
    header = [
        f"# Step benchmark ({args.name}, {date.today()}, {os.cpu_count()} CPUs, fp32 "
        f"matmul peak {peak:.0f} GFLOP/s)",
        "",
        f"Command: `{command}`",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"step-{'smoke' if args.smoke else args.name}-{date.today()}"
    payload = {
        "machine": args.name,
        "date": str(date.today()),
        "matmul_gflops": peak,
        "steps": steps,
        "smoke": args.smoke,
        "command": command,
        "configs": results,
        "goals": goals,
    }
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    (out / f"{stem}.md").write_text(text)
    print(f"written: {out / stem}.json and .md")


if __name__ == "__main__":
    main()
