"""The shared-prompt layouts against scoring every row whole, phase by phase: `cache` (each
prompt runs once and the padded completions reuse its keys and values, rlsd/engine/prefix.py),
`packed` (each prompt's completions packed behind it in one row, rlsd/engine/packing.py) and `auto`
(what rlsd does: packed where its estimated cost is lower, else cache).

    python benchmarks/prefix_bench.py [--reps 3] [--lora true]   # SmolLM2-135M (minutes)
    python benchmarks/prefix_bench.py --smoke                    # the tiny test model

The step's shapes of `step_bench.py`: 4 prompts of the quick start (basic_arithmetic, chat
template) x 4 completions, lengths fixed at the step bench's mean (25 tokens, 7 to 64),
fp32 on the CPU. Timed, each configuration interleaved with the others `--reps` times
(medians):
- the teacher pass (no gradient, the reference teacher prompts) in passes of 16 and 8 rows;
- the policy's forward and backward over the 16 rows in one micro-batch;
- micro-batches of 6 rows, where groups of 4 straddle the boundaries: split by row count
  (each part's prompts run once per part: 5 prefix passes for 4 prompts) against micro-batches
  that hold whole groups (4 of 4 rows: 4 prefix passes, one more, smaller, micro-batch).
Writes benchmarks/results/prefix-<name>-<date>.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = [64, 12, 30, 8, 22, 64, 17, 9, 40, 14, 26, 11, 35, 19, 7, 28]  # mean 25.4


def inputs(renderer, records, tokenizer, teacher: bool):
    import torch

    from rlsd.engine.rollout import Batch, left_pad

    pad = tokenizer.pad_token_id
    ids = [renderer.teacher_ids(r) if teacher else renderer.student_ids(r) for r in records[:4]]
    p_ids, p_mask = left_pad([ids[i // 4] for i in range(16)], pad)
    gen = torch.Generator().manual_seed(0)
    c_ids = torch.randint(3, min(len(tokenizer), 40000), (16, max(LENGTHS)), generator=gen)
    c_mask = torch.arange(max(LENGTHS)) < torch.tensor(LENGTHS).unsqueeze(1)
    return Batch(p_ids, p_mask, c_ids.masked_fill(~c_mask, pad), c_mask)


LAYOUTS = ("unshared", "cache", "packed", "auto")


def policy_pass(scorer, batch, parts: list[list[int]], layout: str) -> float:
    import torch

    from rlsd.step.update import _scoring_inputs

    share = layout != "unshared"
    scorer.layout = layout if share else "auto"
    start = time.perf_counter()
    for rows in parts:
        ids, attn, c_mask = _scoring_inputs(batch.select(torch.tensor(rows)), slice(None), "cpu")
        scorer(ids, attn, c_mask, share_prefix=share).sum().backward()
    scorer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def teacher_pass(teacher, batch, layout: str) -> float:
    share = layout != "unshared"
    teacher.scorer.layout = layout if share else "auto"
    start = time.perf_counter()
    teacher.logprobs(
        batch.prompt_ids,
        batch.prompt_mask,
        batch.completion_ids,
        batch.completion_mask,
        "cpu",
        share_prefix=share,
    )
    return time.perf_counter() - start


def interleaved(cases: dict, reps: int) -> dict[str, list[float]]:
    """Each case's seconds over `reps` rounds, the cases interleaved, after one warm-up each."""
    for case in cases.values():
        case()
    times = {name: [] for name in cases}
    for _ in range(reps):
        for name, case in cases.items():
            times[name].append(case())
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--lora", default="true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--name", default="cpu2")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from rlsd.engine.data import PromptRenderer, load_records
    from rlsd.engine.logprobs import TokenScorer
    from rlsd.engine.models import load_model
    from rlsd.engine.teacher import Teacher
    from rlsd.schema.config import load_config

    model = "smollm2-135m-instruct"
    if args.smoke:
        from tests.conftest import build_model_dir

        model, args.reps = str(build_model_dir(Path(tempfile.mkdtemp()) / "tiny")), 1
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", {"model.name": model})
    cfg.model.lora = args.lora == "true"
    lm, tokenizer = load_model(cfg.model, torch.float32)
    renderer, records = PromptRenderer(cfg.data, tokenizer), load_records(cfg.data)
    scorer = TokenScorer(lm).train()
    student, teacher_batch = (inputs(renderer, records, tokenizer, t) for t in (False, True))
    teachers = {n: Teacher("live", scorer, cfg.model.lora, n) for n in (16, 8)}
    rows = list(range(16))
    split = [rows[0:6], rows[6:12], rows[12:16]]  # groups of 4 straddle the 6-row parts
    whole = [rows[i : i + 4] for i in range(0, 16, 4)]  # whole groups, at most 6 rows

    def teach(n: int, layout: str):
        return lambda: teacher_pass(teachers[n], teacher_batch, layout)

    def train(parts: list[list[int]], layout: str):
        return lambda: policy_pass(scorer, student, parts, layout)

    cases = {}
    for n in (16, 8):
        cases |= {f"teacher, passes of {n}: {x}": teach(n, x) for x in LAYOUTS}
    cases |= {f"policy, 1 x 16 rows: {x}": train([rows], x) for x in LAYOUTS}
    cases |= {f"policy, 6-row parts by count: {x}": train(split, x) for x in LAYOUTS}
    cases["policy, whole groups (4 x 4): cache"] = train(whole, "cache")
    times = interleaved(cases, args.reps)
    prompt_tokens = [int(m.sum()) for m in (student.prompt_mask, teacher_batch.prompt_mask)]
    lines = [
        f"# Shared-prefix benchmark ({args.name}, {date.today()}, "
        f"{'LoRA' if cfg.model.lora else 'full fine-tuning'}, {torch.get_num_threads()} threads)",
        "",
        f"Command: `python benchmarks/prefix_bench.py {' '.join(sys.argv[1:])}`",
        "",
        f"16 rows (4 prompts x 4), completion tokens {sum(LENGTHS)} (7-64), prompt tokens per "
        f"row {prompt_tokens[0] // 16} (student) and {prompt_tokens[1] // 16} (teacher).",
        "",
        "| pass | s (median) | min-max | vs unshared |",
        "|---|---|---|---|",
    ]
    for name, values in times.items():
        base = times.get(name.rsplit(":", 1)[0] + ": unshared")
        if name.startswith("policy, whole"):  # against the same 6-row memory bound
            base = times["policy, 6-row parts by count: unshared"]
        ratio = statistics.median(values) / statistics.median(base)
        lines.append(
            f"| {name} | {statistics.median(values):.2f} | {min(values):.2f}-{max(values):.2f} "
            f"| {ratio:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"prefix-{'smoke' if args.smoke else args.name}-{date.today()}"
    (out / f"{stem}.md").write_text(text)
    print(f"written: {out / stem}.md")


if __name__ == "__main__":
    main()
