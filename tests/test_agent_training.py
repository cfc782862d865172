"""Agents on the training loop: episodes of the calculator environment (tool calls, tool
results, final answers) are sampled turn by turn, scored, and trained with GRPO, the tool text
attended but not trained."""

import json

import pytest
import torch

from rlsd.schema.config import ConfigError, load_config
from rlsd.step import sampling, trainer
from rlsd.step.trainer import setup, train


def agent_overrides(tiny_overrides: dict) -> dict:
    return {
        **tiny_overrides,
        "algorithm.name": "grpo",
        "data.source": "calculator",
        "env.environment": "calculator",
        "env.max_turns": "3",
        "env.max_turn_tokens": "12",
        "env.max_tokens": "40",
    }


def test_an_agent_trains_on_its_episodes(tiny_overrides, monkeypatch):
    run = setup(load_config(None, agent_overrides(tiny_overrides)))
    assert run.env is not None and run.records[0].metadata  # the calculator's own tasks
    seen = []
    real_learn = trainer.learn

    def spy(run_, step, rollout, times):
        seen.append(rollout)
        return real_learn(run_, step, rollout, times)

    monkeypatch.setattr(trainer, "learn", spy)
    before = {n: p.detach().clone() for n, p in run.scorer.named_parameters() if p.requires_grad}
    metrics = [trainer.train_step(run, step) for step in (1, 2)]
    run.env.close()
    for m in metrics:
        assert m["env/turns_mean"] >= 1 and 0 <= m["env/truncated_frac"] <= 1
        assert "env/tool_errors" in m and "compute/flops" in m
    batch = seen[0].batch
    assert batch.completion_attention is not None
    assert (batch.completion_mask <= batch.attention).all()  # the model's tokens are attended
    assert len(seen[0].texts) == 8  # B x G final answers, what the verifiers scored
    trained = any(m["train/skipped_update"] == 0 for m in metrics)
    moved = any(
        not torch.equal(p.detach(), before[n])
        for n, p in run.scorer.named_parameters()
        if p.requires_grad
    )
    assert trained and moved  # the length reward splits the tiny model's groups


def test_an_agent_run_writes_its_logs_and_resumes(tiny_overrides):
    over = {**agent_overrides(tiny_overrides), "train.steps": "2", "output.log_samples": "2"}
    run_dir = train(load_config(None, over))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("env/errors" in r for r in rows)
    again = train(load_config(None, {**over, "train.steps": "3"}))
    rows = [json.loads(x) for x in (again / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_agents_train_with_grpo_for_now(tiny_overrides):
    for name in ("rlsd", "opsd"):
        over = {**agent_overrides(tiny_overrides), "algorithm.name": name}
        with pytest.raises(ConfigError, match=f"algorithm.name: {name} with an environment"):
            load_config(None, over)


def test_play_is_seeded_like_sampling(tiny_overrides):
    """Two runs from the same seed play the same episodes (the stream is resumable)."""
    first = setup(load_config(None, agent_overrides(tiny_overrides)))
    recs = first.records[:2]
    a = sampling.play(first, 1, recs)
    b = sampling.play(first, 1, recs)
    first.env.close()
    assert torch.equal(a.batch.completion_ids, b.batch.completion_ids)
    assert a.finals == b.finals
