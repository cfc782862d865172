"""`rlsd sft CONFIG`: a short supervised warm start on worked solutions, so that RL has steps
for the teacher to judge.

The same config, data, prompt templates, model loading, LoRA and checkpoints as `rlsd train`:
each step takes `sft.batch_size` records (the seeded, resumable prompt stream) and minimises the
cross-entropy of the record's `solution` (a worked solution: `data.solutions: worked` or a
solution column), tokenized and ended with EOS, after the student's prompt. The loss covers the
completion tokens only (the prompt is masked), averaged over every completion token of the step,
so micro-batches accumulate exactly. Records without a solution, or whose solution is longer
than `rollout.max_new_tokens` (RL could never sample it), are left out and counted.

The run directory (`sft-<task>-<time>` under `output.dir`, or `output.run_name`) holds
config.yaml, metrics.jsonl, checkpoints (resumable: rerun the same command) and, at the end,
`model/`: a plain Hugging Face model directory (LoRA merged) with its tokenizer, which
`rlsd train --model.name RUN_DIR/model` trains from. A greedy held-out evaluation of that model
(`train.eval_items` items) reports accuracy and how often it writes its work
(`eval/steps_frac`: completions with at least one "a op b = c" line).
"""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ..engine.data import PromptRenderer, PromptStream, Record, load_records, split_heldout
from ..engine.rollout import join, left_pad
from ..schema.config import Config, ConfigError, to_yaml

log = logging.getLogger(__name__)


def sft_examples(
    renderer: PromptRenderer, tokenizer: Any, records: list[Record], max_tokens: int
) -> tuple[list[tuple[list[int], list[int]]], dict[str, int]]:
    """(prompt ids, target ids) per usable record, and counts of those left out."""
    out, skipped = [], {"no_solution": 0, "too_long": 0}
    for record in records:
        if not record.solution.strip():
            skipped["no_solution"] += 1
            continue
        target = tokenizer(record.solution, add_special_tokens=False)["input_ids"]
        target = [*target, tokenizer.eos_token_id]
        if len(target) > max_tokens:
            skipped["too_long"] += 1
            continue
        out.append((renderer.student_ids(record), target))
    return out, skipped


def padded_targets(targets: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded target ids (n, T) and their mask."""
    width = max(len(t) for t in targets)
    ids = torch.full((len(targets), width), pad, dtype=torch.long)
    mask = torch.zeros(len(targets), width, dtype=torch.bool)
    for i, t in enumerate(targets):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = True
    return ids, mask


def sft_step(
    scorer: Any,
    optimizer: Any,
    batch: list[tuple[list[int], list[int]]],
    pad: int,
    micro: int,
    max_grad_norm: float,
    device: torch.device,
) -> dict[str, float]:
    """One optimizer step of token-mean cross-entropy on the targets; returns its metrics."""
    tokens = sum(len(t) for _, t in batch)
    total = 0.0
    scorer.train()
    for s in range(0, len(batch), micro):
        part = batch[s : s + micro]
        p_ids, p_mask = left_pad([p for p, _ in part], pad)
        c_ids, c_mask = padded_targets([t for _, t in part], pad)
        ids, attn = join(p_ids, p_mask, c_ids, c_mask)
        logps = scorer(ids.to(device), attn.to(device), c_mask.to(device))  # (mb, T)
        loss = -logps.masked_fill(~c_mask.to(device), 0.0).sum() / tokens
        loss.backward()
        total += loss.item()
    params = [p for p in scorer.parameters() if p.requires_grad]
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")))
    if math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss/sft": total,
        "sft/grad_norm": norm,
        "sft/tokens": float(tokens),
        "train/nonfinite": float(not math.isfinite(norm)),
    }


def sft_run_dir(cfg: Config) -> Path:
    name = cfg.output.run_name or "sft-{}-{}".format(
        cfg.data.task if cfg.data.source == "reasoning_gym" else cfg.data.source,
        datetime.now().strftime("%Y%m%d-%H%M%S"),
    )
    return Path(cfg.output.dir) / name


def resume_point(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint to continue from (None: a new run); a changed config is refused."""
    from ..engine.checkpoint import check_resumable, resume_checkpoint
    from ..engine.rundir import saved_config

    if not (run_dir / "config.yaml").is_file():
        return None
    check_resumable(saved_config(run_dir), cfg, str(run_dir))  # an emptied file is refused
    return resume_checkpoint(run_dir)


def sft(cfg: Config) -> Path:
    """Train the warm start; returns the run directory (its merged model under model/)."""
    from ..engine.checkpoint import apply_weights, load_state, save_checkpoint, set_rng_state
    from ..engine.logprobs import TokenScorer
    from ..engine.models import load_model, pick_device, pick_dtype
    from ..engine.rundir import truncate_log
    from ..engine.runfiles import JsonlWriter

    device = pick_device(cfg.model)
    run_dir = sft_run_dir(cfg)
    ckpt = resume_point(cfg, run_dir)
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    torch.manual_seed(cfg.train.seed)
    records, _ = split_heldout(load_records(cfg.data), cfg.data.heldout_size, cfg.data.seed)
    lm, tokenizer = load_model(cfg.model, pick_dtype(cfg.model, device))
    lm = lm.to(device)
    renderer = PromptRenderer(cfg.data, tokenizer)
    examples, skipped = sft_examples(renderer, tokenizer, records, cfg.rollout.max_new_tokens)
    if not examples:
        raise ConfigError(
            f"data: no record has a usable solution for sft ({skipped}); use "
            "data.solutions: worked or a solution column"
        )
    if any(skipped.values()):
        log.warning(
            "sft: left out %d records without a solution and %d with a solution "
            "longer than rollout.max_new_tokens",
            skipped["no_solution"],
            skipped["too_long"],
        )
    scorer = TokenScorer(lm, temperature=1.0)
    params = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.sft.lr, weight_decay=cfg.train.weight_decay)
    stream, start = PromptStream(len(examples), cfg.train.seed), 1
    if ckpt is not None:
        saved = load_state(ckpt, cfg.model.lora)
        apply_weights(lm, saved.weights, cfg.model.lora, ckpt)
        optimizer.load_state_dict(saved.optimizer)
        stream.load_state_dict(saved.state["data"])
        set_rng_state(saved.rng)
        start = saved.state["step"] + 1
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    truncate_log(run_dir / "metrics.jsonl", start - 1)  # a resumed run rewrites later steps
    metrics = JsonlWriter(run_dir / "metrics.jsonl")
    try:
        for step in range(start, cfg.sft.steps + 1):
            began = time.perf_counter()
            batch = [examples[i] for i in stream.next(cfg.sft.batch_size)]
            row = sft_step(
                scorer,
                optimizer,
                batch,
                tokenizer.pad_token_id,
                cfg.train.micro_batch_size,
                cfg.train.max_grad_norm,
                device,
            )
            row.update(step=step, **{"perf/step_seconds": time.perf_counter() - began})
            metrics.write(row)
            every = cfg.output.save_every
            if step == cfg.sft.steps or (every and step % every == 0):
                save_checkpoint(
                    run_dir,
                    step,
                    lm,
                    optimizer,
                    {"data": stream.state_dict()},
                    None,
                    cfg.output.keep_last,
                )
    finally:
        metrics.close()
    return finish(cfg, run_dir, lm, tokenizer, device)


def finish(cfg: Config, run_dir: Path, lm: Any, tokenizer: Any, device: torch.device) -> Path:
    """Write RUN_DIR/model (LoRA merged) and the held-out evaluation of it (eval.json)."""
    from ..engine.models import stop_token_ids
    from ..step.evaluate import eval_items, greedy_accuracy
    from .probe import STEP

    model = lm.merge_and_unload() if cfg.model.lora else lm
    out = run_dir / "model"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    items, source = eval_items(cfg, cfg.train.eval_items)
    result = greedy_accuracy(
        cfg, model.eval(), tokenizer, items, stop_token_ids(model, tokenizer), device
    )
    shows = [bool(STEP.search(t)) for t in result["completions"]]
    summary = {
        "items": result["n"],
        "items_from": source,
        "eval/pass@1": result["accuracy"],
        "eval/lenient@1": result["lenient_accuracy"],
        "eval/steps_frac": sum(shows) / max(len(shows), 1),
        "completions": result["completions"][:16],
    }
    (run_dir / "eval.json").write_text(json.dumps(summary, indent=1))
    return run_dir
