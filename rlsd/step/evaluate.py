"""Evaluation: accuracy of a model under a run's prompts and verifiers, on held-out items.

pass@k uses the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374): with n samples of which
c are correct, pass@k = 1 - C(n - c, k) / C(n, k). maj@k takes the most frequent extracted answer
among the k samples (ties go to the answer seen first) and is correct when a completion giving it
is correct.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ..engine.data import PromptRenderer, Record
from ..engine.rewards import build_reward, extract_answer, extract_last_number
from ..engine.rewards.builtin import normalise
from ..engine.rollout import sample_completions
from ..schema.config import Config

# sequences decoded at once in evaluation: on the 2-core CPU, 128 greedy quick-start items take
# 26.5 s at 64 against 40.9 s at 8 (1.55x; 128: 1.73x); a 64-row KV cache is a few hundred MB
EVAL_SEQUENCES = 64


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (k <= n)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_index(answers: list[str | None]) -> int | None:
    """Index of a completion carrying the most frequent answer (ties: the one seen first);
    None when no completion has an answer."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    for i, answer in enumerate(answers):
        if answer is not None and counts[answer] == best:
            return i
    return None  # pragma: no cover


def heldout_records(records: list[Record], candidates: list[Record], n: int) -> list[Record]:
    """The first n candidates whose question does not occur in the training records."""
    seen = {r.prompt for r in records}
    return [r for r in candidates if r.prompt not in seen][:n]


@torch.no_grad()
def evaluate(
    cfg: Config,
    lm: Any,
    tokenizer: Any,
    records: list[Record],
    stop_ids: list[int],
    device: torch.device,
    k: int = 1,
    greedy: bool = True,
    batch_prompts: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Score k completions per record (greedy: one); pass@1, pass@k, maj@k and per-item detail.
    `batch_prompts` 0: as many prompts as make EVAL_SEQUENCES sequences per decode, or as a
    training step decodes when that is more (capped further by `rollout.batch_size`)."""
    renderer = PromptRenderer(cfg.data, tokenizer)
    reward_fn = build_reward(cfg.reward)
    rollout = replace(cfg.rollout, num_generations=k)
    samples = 1 if greedy else k
    per_decode = max(EVAL_SEQUENCES, cfg.train.prompts_per_step * cfg.rollout.num_generations)
    batch_prompts = batch_prompts or max(per_decode // samples, 1)
    try:  # the verifier pool's workers stop with the evaluation
        items = []
        for start in range(0, len(records), batch_prompts):
            chunk = records[start : start + batch_prompts]
            batch = sample_completions(
                lm,
                [renderer.student_ids(r) for r in chunk],
                rollout,
                tokenizer.pad_token_id,
                stop_ids,
                device,
                greedy=greedy,
            )
            texts = tokenizer.batch_decode(
                [i[m].tolist() for i, m in zip(batch.completion_ids, batch.completion_mask)],
                skip_special_tokens=True,
            )
            rows = [r for r in chunk for _ in range(samples)]
            columns = {
                "answer": [r.answer for r in rows],
                "solution": [r.solution for r in rows],
                "metadata": [r.metadata for r in rows],
            }
            _, correct, _ = reward_fn([renderer.student_text(r) for r in rows], texts, columns)
            reward_fn.warn_failures()  # one line per verifier that failed in this batch
            for j, record in enumerate(chunk):
                part = slice(j * samples, (j + 1) * samples)
                items.append(item_result(cfg, record, texts[part], correct[part]))
            if progress:
                progress(len(chunk))
    finally:
        reward_fn.close()
    return summarise(items, samples)


def item_result(cfg: Config, record: Record, texts: list[str], correct: list[bool]) -> dict:
    answers = [extract_answer(t, cfg.reward.extract, cfg.reward.answer_marker) for t in texts]
    answers = [None if a is None else normalise(a) for a in answers]
    majority = majority_index(answers)
    lenient = [
        extract_last_number(t) is not None
        and extract_last_number(t) == extract_last_number(record.answer)
        for t in texts
    ]
    return {
        "prompt": record.prompt,
        "answer": record.answer,
        "completions": texts,
        "correct": correct,
        "majority_correct": majority is not None and correct[majority],
        "lenient": lenient,
    }


def summarise(items: list[dict], samples: int) -> dict[str, Any]:
    n = max(len(items), 1)
    result = {
        "n_items": len(items),
        "samples_per_item": samples,
        "pass@1": sum(pass_at_k(samples, sum(i["correct"]), 1) for i in items) / n,
        f"pass@{samples}": sum(pass_at_k(samples, sum(i["correct"]), samples) for i in items) / n,
        f"maj@{samples}": sum(i["majority_correct"] for i in items) / n,
        "lenient@1": sum(sum(i["lenient"]) / samples for i in items) / n,
        "items": items,
    }
    return result


def greedy_accuracy(
    cfg: Config,
    lm: Any,
    tokenizer: Any,
    records: list[Record],
    stop_ids: list[int],
    device: torch.device,
    batch_size: int = 0,
) -> dict[str, Any]:
    """Greedy accuracy (the first verifier at full marks) and lenient accuracy (the last number
    of the reply equals the answer's), with the completions."""
    result = evaluate(
        cfg, lm, tokenizer, records, stop_ids, device, greedy=True, batch_prompts=batch_size
    )
    return {
        "n": result["n_items"],
        "accuracy": result["pass@1"],
        "lenient_accuracy": result["lenient@1"],
        "completions": [i["completions"][0] for i in result["items"]],
    }


def eval_items(cfg: Config, limit: int) -> tuple[list[Record], str]:
    """Items to evaluate on, and where they come from: the run's held-out split, else fresh
    reasoning-gym items (another seed, none seen in training), else the data itself."""
    from ..engine.data import load_records, split_heldout

    records = load_records(cfg.data)
    if cfg.data.heldout_size:
        return split_heldout(records, cfg.data.heldout_size, cfg.data.seed)[1][
            :limit
        ], "held-out split"
    if cfg.data.source == "reasoning_gym":
        fresh = load_records(replace(cfg.data, seed=cfg.data.seed + 7919, size=4 * limit))
        return heldout_records(records, fresh, limit), "fresh reasoning-gym items"
    return records[:limit], "the training data (no held-out split configured)"


def load_for_eval(target: str, cfg: Config, device: torch.device) -> tuple[Any, Any, str]:
    """(model, tokenizer, description): a run directory's latest checkpoint on its base model,
    or a plain model."""
    from pathlib import Path

    from ..engine.checkpoint import latest_checkpoint, load_trainable
    from ..engine.models import load_model, pick_dtype

    lm, tokenizer = load_model(cfg.model, pick_dtype(cfg.model, device))
    run_dir = Path(target)
    if (run_dir / "config.yaml").is_file():
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            from ..schema.config import ConfigError

            raise ConfigError(f"{run_dir}: no checkpoint to evaluate")
        load_trainable(lm, ckpt, cfg.model.lora)
        return lm.to(device).eval(), tokenizer, f"{run_dir} ({ckpt.name})"
    return lm.to(device).eval(), tokenizer, cfg.model.name
