"""Dynamic sampling (`rollout.dynamic_sampling`) and the compute count (`compute/*`): the pure
pieces by hand, the sampler on hand-built reward patterns, and the FLOP formula by hand."""

import json

import pytest
import torch

from rlsd.algorithms import mixed_groups
from rlsd.engine.compute import (
    Shape,
    forward_flops,
    generation_flops,
    model_shape,
    scoring_flops,
    training_flops,
)
from rlsd.engine.data import PromptStream, Record
from rlsd.engine.rollout import Batch, concat_batches
from rlsd.schema.config import ConfigError, load_config
from rlsd.step import sampling, trainer
from rlsd.step.records import Rollout, merge_reward_metrics
from rlsd.step.trainer import running_totals, setup, train


def test_mixed_groups_are_the_groups_whose_rewards_differ():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.5])
    assert mixed_groups(rewards, 4).tolist() == [True, False, True]
    assert mixed_groups(torch.zeros(6), 3).tolist() == [False, False]
    with pytest.raises(ValueError, match="groups of 4"):
        mixed_groups(torch.zeros(6), 4)


def test_concat_batches_pads_prompts_left_and_completions_right():
    a = Batch(
        torch.tensor([[5, 6]]),
        torch.tensor([[True, True]]),
        torch.tensor([[7]]),
        torch.tensor([[True]]),
    )
    b = Batch(
        torch.tensor([[1, 2, 3]]),
        torch.tensor([[False, True, True]]),
        torch.tensor([[8, 9, 0]]),
        torch.tensor([[True, True, False]]),
    )
    out = concat_batches([a, b], pad_id=0)
    assert out.prompt_ids.tolist() == [[0, 5, 6], [1, 2, 3]]
    assert out.prompt_mask.tolist() == [[False, True, True], [False, True, True]]
    assert out.completion_ids.tolist() == [[7, 0, 0], [8, 9, 0]]
    assert out.completion_mask.tolist() == [[True, False, False], [True, True, False]]


def rollout_of(answers: list[str], rewards: list[float], group: int = 2) -> Rollout:
    n = len(answers) * group
    batch = Batch(
        torch.arange(n).view(n, 1),
        torch.ones(n, 1, dtype=torch.bool),
        torch.arange(n).view(n, 1) + 100,
        torch.ones(n, 1, dtype=torch.bool),
    )
    records = [Record(f"q{a}", a) for a in answers]
    texts = [f"t{i}" for i in range(n)]
    return Rollout(records, batch, texts, torch.tensor(rewards), [r >= 1 for r in rewards], group)


def test_take_groups_and_merge_keep_whole_groups_in_order():
    first = rollout_of(["1", "2", "3"], [1, 0, 1, 1, 0, 1])
    kept = first.take_groups(torch.tensor([True, False, True]))
    assert [r.answer for r in kept.records] == ["1", "3"]
    assert kept.texts == ["t0", "t1", "t4", "t5"] and kept.rewards.tolist() == [1, 0, 0, 1]
    assert kept.correct == [True, False, False, True]
    assert kept.batch.completion_ids.flatten().tolist() == [100, 101, 104, 105]
    merged = Rollout.merge([kept, rollout_of(["4"], [0, 1])], pad_id=0)
    assert [r.answer for r in merged.records] == ["1", "3", "4"]
    assert merged.rewards.tolist() == [1, 0, 0, 1, 0, 1] and len(merged.texts) == 6
    assert merged.record_of(5).answer == "4"


def test_reward_metrics_of_several_rounds_add_counts_and_weigh_means():
    parts = [
        ({"reward/errors": 2.0, "reward/math/mean": 0.5, "reward/error_frac": 0.25}, 8),
        ({"reward/errors": 1.0, "reward/math/mean": 1.0, "reward/error_frac": 0.0625}, 16),
    ]
    out = merge_reward_metrics(parts)
    assert out["reward/errors"] == 3.0
    assert out["reward/math/mean"] == pytest.approx((0.5 * 8 + 1.0 * 16) / 24)
    assert out["reward/error_frac"] == pytest.approx(3 / 24)


def patterned(monkeypatch, mixed_when):
    """Replace the verifiers' rewards by a pattern of the record: [1, 0, 0, 0] (a mixed group)
    where `mixed_when(record)`, else all 0 (a unanimous group)."""
    real = sampling.grade

    def grade(run, recs, batch, played=None):
        out = real(run, recs, batch, played)
        g = out.group
        rewards = torch.tensor([float(mixed_when(r) and k == 0) for r in recs for k in range(g)])
        metrics = {
            **out.metrics,
            **sampling.outcome_metrics(rewards, [bool(x) for x in rewards], g),
        }
        return Rollout(recs, batch, out.texts, rewards, [bool(x) for x in rewards], g, metrics)

    monkeypatch.setattr(sampling, "grade", grade)


def dynamic_run(tiny_overrides, **extra):
    over = {**tiny_overrides, "algorithm.name": "grpo", "rollout.dynamic_sampling": "true"}
    return setup(load_config(None, {**over, **{k.replace("__", "."): v for k, v in extra.items()}}))


def expected_kept(run, rounds: int, mixed_when) -> tuple[list[str], int]:
    """Replays the prompt stream: the first prompts_per_step mixed prompts, and the rounds."""
    stream = PromptStream(len(run.records), run.cfg.train.seed)
    kept, per = [], run.cfg.train.prompts_per_step
    for n in range(1, rounds + 1):
        for i in stream.next(per):
            if mixed_when(run.records[i]) and len(kept) < per:
                kept.append(run.records[i].prompt)
        if len(kept) == per:
            return kept, n
    return kept, rounds


def test_dynamic_sampling_keeps_the_first_mixed_groups_it_draws(tiny_overrides, monkeypatch):
    def even(record):
        return int(record.answer) % 2 == 0

    patterned(monkeypatch, even)
    run = dynamic_run(tiny_overrides, rollout__max_rounds="8", train__prompts_per_step="4")
    want, rounds = expected_kept(run, 8, even)
    assert len(want) == 4 and rounds > 1  # the pattern makes it draw more than one round
    captured = {}
    real_learn = trainer.learn

    def spy(run_, step, rollout, times):
        captured["rollout"] = rollout
        return real_learn(run_, step, rollout, times)

    monkeypatch.setattr(trainer, "learn", spy)
    metrics = trainer.train_step(run, 1)
    rollout = captured["rollout"]
    assert [r.prompt for r in rollout.records] == want
    assert rollout.rewards.view(-1, 4).tolist() == [[1.0, 0.0, 0.0, 0.0]] * 4
    assert metrics["sampling/rounds"] == rounds
    assert metrics["sampling/kept_frac"] == pytest.approx(4 / (4 * rounds))
    assert metrics["sampling/filled_frac"] == 1.0
    assert metrics["sampling/completions_per_trained_group"] == pytest.approx(rounds * 16 / 4)
    assert metrics["sampling/trained_accuracy"] == 0.25
    # reward/* describe everything drawn: one correct completion per mixed group drawn
    mixed_drawn = sum(
        even(run.records[i])
        for i in PromptStream(len(run.records), run.cfg.train.seed).next(4 * rounds)
    )
    assert metrics["reward/accuracy"] == pytest.approx(mixed_drawn / (16 * rounds))
    assert metrics["adv/zero_group_frac"] == 0.0  # every trained group carries a gradient
    assert run.stream.state_dict()["pos"] == 4 * rounds  # the stream saw every round's draw


def test_a_step_without_any_mixed_group_trains_nothing(tiny_overrides, monkeypatch):
    patterned(monkeypatch, lambda record: False)
    run = dynamic_run(tiny_overrides, rollout__max_rounds="3")
    metrics = trainer.train_step(run, 1)
    assert metrics["sampling/rounds"] == 3 and metrics["sampling/kept_frac"] == 0.0
    assert metrics["sampling/completions_per_trained_group"] == 0.0
    assert metrics["train/skipped_update"] == 1.0 and metrics["reward/accuracy"] == 0.0
    assert run.stream.state_dict()["pos"] == 3 * 2


def test_dynamic_sampling_is_refused_for_the_dense_methods(tiny_overrides):
    for name in ("opsd", "grpo_opsd"):
        over = {**tiny_overrides, "algorithm.name": name, "rollout.dynamic_sampling": "true"}
        with pytest.raises(ConfigError, match=f"rollout.dynamic_sampling: {name} learns from"):
            load_config(None, over)
    with pytest.raises(ConfigError, match="rollout.max_rounds: only applies"):
        load_config(None, {**tiny_overrides, "rollout.max_rounds": "2"})


def test_a_dynamic_run_logs_its_sampling_and_compute(tiny_overrides):
    run_dir = train(
        load_config(
            None, {**tiny_overrides, "rollout.dynamic_sampling": "true", "train.steps": "2"}
        )
    )
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert 1 <= row["sampling/rounds"] <= 4 and 0 <= row["sampling/kept_frac"] <= 1
        assert row["compute/flops"] == pytest.approx(
            row["compute/generation_flops"]
            + row["compute/teacher_flops"]
            + row["compute/policy_flops"]
        )
        assert row["compute/generated_tokens"] > 0
    assert rows[1]["compute/flops_total"] == pytest.approx(
        rows[0]["compute/flops"] + rows[1]["compute/flops"]
    )


# --- the compute count, by hand ----------------------------------------------------------------


def test_forward_flops_by_hand():
    shape = Shape(weights=1000, layers=2, width=8)
    assert forward_flops(shape, 3) == 2 * 1000 * 3 + 2 * 2 * 8 * 9  # 6288
    assert training_flops(shape, [3, 1], passes=2) == 3 * 2 * (6288 + 2 * 1000 + 2 * 2 * 8)
    assert scoring_flops(shape, [3]) == 6288
    # a prompt of 2 prefilled once, completions of 1 and 3 tokens after it
    prefill = forward_flops(shape, 2)
    want = prefill + (forward_flops(shape, 3) - prefill) + (forward_flops(shape, 5) - prefill)
    assert generation_flops(shape, 2, [1, 3]) == want


def test_model_shape_counts_the_head_once_whether_tied_or_not():
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {"vocab_size": 50, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2}

    def model(tied):
        heads = {"num_attention_heads": 2, "num_key_value_heads": 2}
        return LlamaForCausalLM(LlamaConfig(**sizes, **heads, tie_word_embeddings=tied))

    tied, untied = model(True), model(False)
    total = sum(p.numel() for p in tied.parameters())  # the table counted once
    assert model_shape(tied) == Shape(total, 2, 8)  # the table is the head: every weight
    assert model_shape(untied) == Shape(total, 2, 8)  # the head's own weight, not the table


def test_running_totals_continue_from_the_last_logged_step():
    history = [{"compute/flops": 5.0, "compute/flops_total": 5.0, "compute/generated_tokens": 2}]
    now = {"compute/flops": 7.0, "compute/generated_tokens": 3.0}
    assert running_totals(history, now) == {
        "compute/flops_total": 12.0,
        "compute/generated_tokens_total": 3.0,  # a history without the total starts at 0
    }
    assert running_totals([], now)["compute/flops_total"] == 7.0


# --- the pass-rate curriculum ---------------------------------------------------------------


def test_pass_rates_settle_skip_and_recheck_by_hand():
    from rlsd.engine.curriculum import PassRates

    rates = PassRates(capacity=2, window=2)
    settled = {"low": 0.0, "high": 1.0, "min_visits": 2, "recheck_every": 2}
    rates.observe("a", 1.0)
    assert not rates.skips("a", **settled)  # seen once: not settled yet
    rates.observe("a", 1.0)
    assert rates.skips("a", **settled) and rates.skips("a", **settled)  # solved twice
    assert not rates.skips("a", **settled)  # after 2 skips: sampled again (a fresh look)
    rates.observe("a", 0.5)  # [1.0, 0.5]: the window keeps the last 2, mean 0.75
    assert not rates.skips("a", **settled)
    rates.observe("b", 0.0)
    rates.observe("b", 0.0)
    assert rates.skips("b", **settled)  # failed twice
    assert not rates.skips("unknown", **settled)
    rates.observe("c", 0.5)  # a third prompt: the least recently updated ("a") goes
    assert [e["key"] for e in rates.state_dict()] == ["b", "c"]
    copy = PassRates(2, 2)
    copy.load_state_dict(json.loads(json.dumps(rates.state_dict())))
    assert copy.state_dict() == rates.state_dict()
    loose = {**settled, "high": 0.7}  # a mean of 0.75 counts as solved under high 0.7
    rates.observe("c", 1.0)
    assert rates.skips("c", **loose) and not rates.skips("c", **settled)


def test_the_curriculum_stops_drawing_solved_prompts(tiny_overrides, monkeypatch):
    def solved(record):  # even answers: every completion correct; odd: one in four
        return int(record.answer) % 2 == 0

    real = sampling.grade

    def grade(run, recs, batch, played=None):
        out = real(run, recs, batch, played)
        g = out.group
        correct = [solved(r) or k == 0 for r in recs for k in range(g)]
        rewards = torch.tensor([float(c) for c in correct])
        metrics = {**out.metrics, **sampling.outcome_metrics(rewards, correct, g)}
        return Rollout(recs, batch, out.texts, rewards, correct, g, metrics)

    monkeypatch.setattr(sampling, "grade", grade)
    over = {
        **tiny_overrides,
        "algorithm.name": "grpo",
        "data.size": "12",
        "curriculum.enabled": "true",
        "curriculum.recheck_every": "0",
        "curriculum.min_visits": "1",  # settled after one group
        "curriculum.window": "1",
    }
    run = setup(load_config(None, over))
    evens = {r.prompt for r in run.records if solved(r)}
    assert evens and len(evens) < len(run.records)
    drawn = []
    real_learn = trainer.learn

    def spy(run_, step, rollout, times):
        drawn.append([r.prompt for r in rollout.records])
        return real_learn(run_, step, rollout, times)

    monkeypatch.setattr(trainer, "learn", spy)
    metrics = [trainer.train_step(run, step) for step in range(1, 13)]
    seen: dict[str, int] = {}
    cap = 3 * run.cfg.train.prompts_per_step  # skips a round may make before it takes any
    for step, prompts in enumerate(drawn):
        capped = metrics[step]["curriculum/skipped"] >= cap
        for prompt in prompts:
            if prompt in evens and not capped:
                assert prompt not in seen, (step, prompt)  # never again once solved
            seen[prompt] = seen.get(prompt, 0) + 1
    assert sum(m["curriculum/skipped"] for m in metrics) > 0
    assert sum(m["curriculum/skipped"] < cap for m in metrics) >= len(metrics) // 2  # checked
    assert metrics[-1]["curriculum/size"] == len({p for ps in drawn for p in ps})
    with pytest.raises(ConfigError, match="curriculum.low: 0.5 must be below"):
        load_config(None, {**over, "curriculum.low": "0.5", "curriculum.high": "0.5"})
    with pytest.raises(ConfigError, match="curriculum.window: only applies"):
        load_config(None, {**tiny_overrides, "curriculum.window": "3"})
