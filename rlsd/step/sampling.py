"""Which completions a step trains on: its prompts sampled and graded by the verifiers, in one
round or, with `rollout.dynamic_sampling`, in rounds until the step holds its groups whose
rewards differ; and what sampling them cost (`compute/*`).

`draw` returns the step's `Rollout` (records.py). Every round's prompts come from the run's
seeded stream, drawn by every process, and each round is seeded from the step, the round and
the process, so a resumed run draws exactly what the uninterrupted one drew.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from ..algorithms import group_outcomes, mixed_groups
from ..engine.compute import Shape, generation_flops
from ..engine.data import Record
from ..engine.distributed import anywhere, shard, world
from ..engine.envs.rollout import EpisodeRollout, episode_rewards, sample_episodes
from ..engine.rollout import Batch, sample_completions
from ..engine.sharding import gathered
from .records import Rollout, merge_reward_metrics
from .run import Run


def draw(run: Run, step: int, times: dict[str, float]) -> Rollout:
    """The step's rollout: one round of `train.prompts_per_step` prompts, G samples each; with
    `rollout.dynamic_sampling`, rounds until this process holds its share of groups whose
    rewards differ (at most `rollout.max_rounds`). Every process draws every round's prompts
    from the shared stream, so all take the same number of rounds and the stream (saved in
    checkpoints) stays in step; a process that is already full skips a round's sampling. Sets
    `times["generate"]` and `times["reward"]` as if generation and grading had run back to
    back. With the sampler, the rollout's metrics hold the verifiers' counts over every
    completion drawn and the `sampling/*` metrics."""
    cfg, acc = run.cfg, run.accelerator
    dynamic, size = cfg.rollout.dynamic_sampling, acc.num_processes
    share = cfg.train.prompts_per_step // size  # the groups this process trains at most
    drawn, kept, have, spent, rounds = [], [], 0, {"generate": 0.0, "reward": 0.0}, 0
    skipped = 0
    for round_ in range(cfg.rollout.max_rounds if dynamic else 1):
        rounds += 1
        ids, passed = next_prompts(run, cfg.train.prompts_per_step)
        skipped += passed
        recs = shard([run.records[i] for i in ids], *world(acc))
        if have < share:
            start = time.perf_counter()
            played = play(run, step, recs, round_) if run.env is not None else None
            batch = played.batch if played is not None else sample(run, step, recs, round_)
            graded = time.perf_counter()
            rollout = grade(run, recs, batch, played)
            run.reward_fn.warn_failures(f"step {step}: ", " this step")  # a line per verifier
            spent["generate"] += graded - start
            spent["reward"] += time.perf_counter() - graded
            drawn.append(rollout)
            keep = mixed_groups(rollout.rewards, rollout.group)  # (B,)
            keep &= keep.long().cumsum(0) <= share - have  # the first ones that still fit
            if keep.any():
                kept.append(rollout.take_groups(keep))
                have += int(keep.sum())
        if not dynamic or not anywhere(acc, have < share):
            break
    times["reward"] = time.perf_counter()
    times["generate"] = times["reward"] - spent["reward"]
    settled = remember_pass_rates(run, drawn, skipped)
    if not dynamic:
        return replace(drawn[0], metrics={**drawn[0].metrics, **settled})
    pad = run.tokenizer.pad_token_id
    rollout = Rollout.merge(kept, pad) if kept else drawn[-1]  # none mixed: trains nothing
    graded = merge_reward_metrics([(r.metrics, len(r.texts)) for r in drawn])  # all it saw
    found = sampling_metrics(drawn, rollout, have, rounds, share)
    return replace(rollout, metrics={**graded, **found, **settled})


def next_prompts(run: Run, count: int) -> tuple[list[int], int]:
    """`count` prompt indices from the run's stream and how many were skipped on the way: with
    `curriculum.enabled`, prompts whose recent pass rate is settled are passed over, at most
    3 x count of them (then the next ones are taken as they come). Every process keeps the same
    pass rates, so every process skips the same prompts and the stream stays in step."""
    rates, c = run.pass_rates, run.cfg.curriculum
    if rates is None:
        return run.stream.next(count), 0
    chosen, skipped = [], 0
    while len(chosen) < count:
        [index] = run.stream.next(1)
        key = run.renderer.student_text(run.records[index])
        if skipped < 3 * count and rates.skips(key, c.low, c.high, c.min_visits, c.recheck_every):
            skipped += 1
        else:
            chosen.append(index)
    return chosen, skipped


def remember_pass_rates(run: Run, drawn: list[Rollout], skipped: int) -> dict[str, float]:
    """Record every drawn group's pass rate (from every process, in rank order, so every
    process keeps the same store); the `curriculum/*` metrics. Nothing without the curriculum."""
    if run.pass_rates is None:
        return {}
    seen = [
        (
            run.renderer.student_text(record),
            sum(r.correct[g * r.group : (g + 1) * r.group]) / r.group,
        )
        for r in drawn
        for g, record in enumerate(r.records)
    ]
    if run.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        seen = gather_object(seen)
    for key, rate in seen:
        run.pass_rates.observe(key, rate)
    return {"curriculum/skipped": float(skipped), "curriculum/size": float(len(run.pass_rates))}


def sampling_metrics(
    drawn: list[Rollout], trained: Rollout, kept: int, rounds: int, share: int
) -> dict[str, float]:
    """The step's outcomes over every completion drawn (`reward/*`, as without the sampler),
    and what dynamic sampling cost and found: rounds drawn, the share of sampled groups kept
    (mixed), how full the step got, completions sampled per trained group, and the accuracy of
    the trained groups."""
    rewards = torch.cat([r.rewards for r in drawn])
    correct = [c for r in drawn for c in r.correct]
    groups = sum(len(r.records) for r in drawn)
    return {
        **outcome_metrics(rewards, correct, drawn[0].group),
        "sampling/rounds": float(rounds),
        "sampling/kept_frac": kept / max(groups, 1),
        "sampling/filled_frac": kept / max(share, 1),
        "sampling/completions_per_trained_group": len(correct) / kept if kept else 0.0,
        "sampling/trained_accuracy": sum(trained.correct) / len(trained.correct) if kept else 0.0,
    }


def outcome_metrics(rewards: torch.Tensor, correct: list[bool], group: int) -> dict[str, float]:
    """The rewards and verdicts of the completions a step sampled."""
    groups = group_outcomes(torch.tensor(correct), group)
    return {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std(unbiased=False).item(),
        "reward/accuracy": sum(correct) / len(correct),
        "reward/all_correct_group_frac": groups["all_correct"],  # nothing left to learn
        "reward/all_wrong_group_frac": groups["all_wrong"],  # no advantage, no RLSD credit
    }


def seed_round(run: Run, step: int, round_: int) -> None:
    """A resumable sampling stream, one per process and round (a step's first round is seeded
    as before dynamic sampling existed)."""
    rank, size = world(run.accelerator)
    torch.manual_seed((run.cfg.train.seed * 1_000_003 + step) * size + rank + round_ * 2**40)


def sample(run: Run, step: int, recs: list[Record], round_: int = 0) -> Batch:
    """G completions of each prompt."""
    seed_round(run, step, round_)
    prompts = [run.renderer.student_ids(r) for r in recs]
    with gathered(*run.models):  # FSDP2: whole weights to decode with (train_step gathered them)
        return sample_completions(
            run.lm, prompts, run.cfg.rollout, run.tokenizer.pad_token_id, run.stop_ids, run.device
        )


def play(run: Run, step: int, recs: list[Record], round_: int = 0) -> EpisodeRollout:
    """G episodes of the run's environment on each record (`env.*`): turn by turn, the
    environment's replies attended but not trained (the batch's two masks)."""
    seed_round(run, step, round_)
    r = run.cfg.rollout
    with gathered(*run.models):  # FSDP2: whole weights to decode with (train_step gathered them)
        return sample_episodes(
            run.lm,
            run.tokenizer,
            recs,
            run.env,
            r.num_generations,
            run.cfg.env,
            stop_ids=run.stop_ids,
            pad_id=run.tokenizer.pad_token_id,
            temperature=r.temperature,
            top_k=r.top_k,
            top_p=r.top_p,
            system_prompt=run.cfg.data.system_prompt,
        )


def grade(
    run: Run, recs: list[Record], batch: Batch, played: EpisodeRollout | None = None
) -> Rollout:
    """The completions (an episode's final answer) scored by the verifiers; an episode's
    reward adds the environment's (`env.reward_weight`, `env.truncated_reward`)."""
    group = run.cfg.rollout.num_generations
    rows = [r for r in recs for _ in range(group)]
    if played is None:
        texts = run.tokenizer.batch_decode(
            [ids[mask].tolist() for ids, mask in zip(batch.completion_ids, batch.completion_mask)],
            skip_special_tokens=True,
        )
    else:
        texts = list(played.finals)
    columns = {
        "answer": [r.answer for r in rows],
        "solution": [r.solution for r in rows],
        "metadata": [r.metadata for r in rows],
    }
    prompts = [run.renderer.student_text(r) for r in rows]
    rewards, correct, metrics = run.reward_fn(prompts, texts, columns)
    # 1.0 when verifiers failed as often as there are completions (one failing on every one)
    metrics["reward/error_frac"] = min(metrics.get("reward/errors", 0.0) / max(len(texts), 1), 1.0)
    if played is not None:
        rewards = episode_rewards(rewards, played, run.cfg.env)
        metrics.update(played.metrics)
    rewards = torch.tensor(rewards, dtype=torch.float32)
    metrics.update(outcome_metrics(rewards, correct, group))
    metrics.update(generation_cost(run.shape, batch, group))
    return Rollout(recs, batch, texts, rewards, correct, group, metrics)


def generation_cost(shape: Shape, batch: Batch, group: int) -> dict[str, float]:
    """Tokens sampled and the FLOPs of sampling them (each prompt prefilled once per group)."""
    prompts = batch.prompt_mask[::group].sum(1).tolist()  # (B,)
    lengths = batch.attention.sum(1).view(-1, group).tolist()  # (B, G) all an episode ran
    return {
        "compute/generated_tokens": float(batch.completion_mask.sum()),  # sampled by the model
        "compute/generation_flops": sum(
            generation_flops(shape, p, c) for p, c in zip(prompts, lengths)
        ),
    }
