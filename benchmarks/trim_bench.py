"""Passes cut at their longest completion against passes over the batch's whole width, and
rows sorted by length before they are split into micro-batches, phase by phase.

    python benchmarks/trim_bench.py [--reps 3]     # SmolLM2-135M, LoRA (a few minutes)
    python benchmarks/trim_bench.py --smoke        # the tiny test model

The shapes of `prefix_bench.py`: 4 quick-start prompts x 4 completions of 7-64 tokens (mean
25), fp32 on the CPU, passes of 8 rows (the default train.micro_batch_size), prompts shared
(train.share_prefix). Timed, interleaved `--reps` times (medians): the teacher pass and the
policy's forward and backward, each over the whole width (what rlsd did before), cut at each
pass's longest completion (what it does now), and cut with the rows sorted by length first
(which splits groups, so a pass holds more distinct prompts). Writes
benchmarks/results/trim-<name>-<date>.md.
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
sys.path.insert(0, str(ROOT))


def policy_pass(scorer, batch, order, cut: bool) -> float:
    import torch

    from rlsd.engine.teacher import used_width
    from rlsd.step.update import _scoring_inputs

    start = time.perf_counter()
    for s in range(0, len(order), 8):
        part = batch.select(torch.tensor(order[s : s + 8]))
        width = used_width(part.completion_mask) if cut else None
        ids, attn, c_mask = _scoring_inputs(part, slice(None), "cpu", width)
        scorer(ids, attn, c_mask, share_prefix=True).sum().backward()
    scorer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def teacher_pass(teacher, batch, order, cut: bool) -> float:
    """prefix_bench's timed teacher pass (prompts shared) over the rows in `order`; `cut` off:
    every pass runs the batch's whole width."""
    import torch

    import rlsd.engine.teacher
    from benchmarks.prefix_bench import teacher_pass as timed

    real = rlsd.engine.teacher.used_width
    rlsd.engine.teacher.used_width = real if cut else (lambda mask: mask.shape[1])
    try:
        return timed(teacher, batch.select(torch.tensor(order)), True)
    finally:
        rlsd.engine.teacher.used_width = real


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--name", default="cpu2")
    args = parser.parse_args()
    import torch

    from benchmarks.prefix_bench import LENGTHS, inputs, interleaved
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
    lm, tokenizer = load_model(cfg.model, torch.float32)
    renderer, records = PromptRenderer(cfg.data, tokenizer), load_records(cfg.data)
    scorer = TokenScorer(lm).train()
    student, taught = (inputs(renderer, records, tokenizer, t) for t in (False, True))
    teacher = Teacher("live", scorer, cfg.model.lora, 8)
    sampled = list(range(16))
    by_length = sorted(sampled, key=lambda i: LENGTHS[i])
    cases = {}
    for phase, fn, batch in (("teacher", teacher_pass, taught), ("policy", policy_pass, student)):
        obj = teacher if phase == "teacher" else scorer
        for label, order, cut in (
            ("whole width", sampled, False),
            ("cut", sampled, True),
            ("sorted by length, cut", by_length, True),
        ):
            cases[f"{phase}: {label}"] = lambda f=fn, o=obj, b=batch, r=order, c=cut: f(o, b, r, c)
    times = interleaved(cases, args.reps)
    lines = [
        f"# Cut passes ({args.name}, {date.today()}, LoRA, {torch.get_num_threads()} threads)",
        "",
        f"Command: `python benchmarks/trim_bench.py {' '.join(sys.argv[1:])}`",
        "",
        f"16 rows (4 prompts x 4), completions of {min(LENGTHS)}-{max(LENGTHS)} tokens "
        f"(sum {sum(LENGTHS)}), passes of 8 rows, shared prompts.",
        "",
        "| pass | s (median) | min-max | vs whole width |",
        "|---|---|---|---|",
    ]
    for name, values in times.items():
        base = statistics.median(times[name.split(":")[0] + ": whole width"])
        lines.append(
            f"| {name} | {statistics.median(values):.2f} | {min(values):.2f}-{max(values):.2f} "
            f"| {statistics.median(values) / base:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = (
        ROOT
        / "benchmarks"
        / "results"
        / f"trim-{'smoke' if args.smoke else args.name}-{date.today()}.md"
    )
    if not args.smoke:
        out.write_text(text)
        print(f"written: {out}")


if __name__ == "__main__":
    main()
