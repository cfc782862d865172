"""Held-out greedy evaluation on a tiny model."""

import pytest
import torch

from rlsd.engine.data import Record
from rlsd.engine.models import load_model, stop_token_ids
from rlsd.schema.config import load_config
from rlsd.step.evaluate import greedy_accuracy, heldout_records


def test_heldout_records_exclude_training_questions():
    train = [Record("a", "1"), Record("b", "2")]
    candidates = [Record("b", "2"), Record("c", "3"), Record("a", "1"), Record("d", "4")]
    assert [r.prompt for r in heldout_records(train, candidates, 5)] == ["c", "d"]
    assert [r.prompt for r in heldout_records(train, candidates, 1)] == ["c"]


def test_greedy_accuracy_is_deterministic_and_scored_by_the_first_verifier(tiny_overrides):
    cfg = load_config(None, {**tiny_overrides, "reward.verifiers": "exact"})
    lm, tok = load_model(cfg.model, torch.float32)
    records = [
        Record("Calculate 1 + 2.", "3"),
        Record("Calculate 4 - 1.", "3"),
        Record("What is 3 - 5?", "-2"),
    ]
    stops = stop_token_ids(lm, tok)
    first = greedy_accuracy(cfg, lm, tok, records, stops, torch.device("cpu"), batch_size=2)
    second = greedy_accuracy(cfg, lm, tok, records, stops, torch.device("cpu"), batch_size=3)
    auto = greedy_accuracy(cfg, lm, tok, records, stops, torch.device("cpu"))  # all at once
    assert first["completions"] == second["completions"] == auto["completions"]
    assert len(first["completions"]) == 3
    assert first["n"] == 3
    wanted = (
        sum(
            c.strip().endswith(f"Answer: {r.answer}") for c, r in zip(first["completions"], records)
        )
        / 3
    )
    assert first["accuracy"] == wanted


def test_evaluation_decodes_as_many_sequences_as_a_training_step_when_that_is_more(
    tiny_overrides, monkeypatch
):
    """64 sequences a decode, or a step's prompts x generations when larger; pass@k decodes
    k sequences a prompt (rollout.batch_size splits a decode further, inside the sampler)."""
    from rlsd.step import evaluate as ev

    sizes: list[int] = []
    real = ev.sample_completions

    def spy(lm, prompts, *args, **kwargs):
        sizes.append(len(prompts))
        return real(lm, prompts, *args, **kwargs)

    monkeypatch.setattr(ev, "sample_completions", spy)
    records = [Record(f"Calculate {i} + 1.", str(i + 1)) for i in range(160)]
    for over, k, wanted in (
        ({}, 1, [64, 64, 32]),  # 2 x 4 a step: the 64 floor
        ({"train.prompts_per_step": 20, "rollout.num_generations": 8}, 1, [160]),  # 160 a step
        ({"train.prompts_per_step": 20, "rollout.num_generations": 8}, 4, [40] * 4),
    ):  # pass@4: 160 sequences are 40 prompts
        cfg = load_config(None, {**tiny_overrides, "rollout.max_new_tokens": 2, **over})
        lm, tok = load_model(cfg.model, torch.float32)
        sizes.clear()
        ev.evaluate(
            cfg, lm, tok, records, stop_token_ids(lm, tok), torch.device("cpu"), k=k, greedy=k == 1
        )
        assert sizes == wanted, over


def test_pass_at_k_by_hand():
    from rlsd.step.evaluate import pass_at_k

    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0 and pass_at_k(1, 1, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_majority_vote_with_ties():
    from rlsd.step.evaluate import majority_index

    assert majority_index(["3", "4", "4", "3", "5"]) == 0  # 3 and 4 tie: 3 was seen first
    assert majority_index([None, "7", "8", "8"]) == 2
    assert majority_index([None, None]) is None


def test_eval_command_on_a_run(tiny_overrides, capsys):
    import json
    from pathlib import Path

    from rlsd.commands.cli import main

    from .test_cli import argv

    assert main(["train", *argv({**tiny_overrides, "data.heldout_size": "6"})]) == 0
    run_dir = Path(tiny_overrides["output.dir"]) / "t"
    out = run_dir / "e.json"
    assert main(["eval", str(run_dir), "--n", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_items"] == 6 and result["samples_per_item"] == 3
    assert result["items_from"] == "held-out split" and "checkpoint-2" in result["model"]
    assert all(len(i["completions"]) == 3 for i in result["items"])
    assert 0 <= result["pass@1"] <= result["pass@3"] <= 1
    assert "pass@1" in capsys.readouterr().out
    assert main(["eval", str(run_dir), "x.yaml"]) == 2


def test_evaluation_during_training_is_logged(tiny_overrides):
    import json

    from rlsd.schema.config import load_config
    from rlsd.step.trainer import train

    run_dir = train(
        load_config(
            None,
            {
                **tiny_overrides,
                "train.steps": "4",
                "train.eval_every": "2",
                "train.eval_items": "5",
                "data.heldout_size": "5",
            },
        )
    )
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert ["eval/pass@1" in r for r in rows] == [False, True, False, True]
    assert all(r["eval/items"] == 5 for r in rows if "eval/items" in r)
    evals = [json.loads(x) for x in (run_dir / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4]  # per-item results, for studies and bootstraps
    for e, row in zip(evals, [r for r in rows if "eval/pass@1" in r]):
        assert len(e["correct"]) == len(e["completions"]) == len(e["answers"]) == 5
        assert sum(e["correct"]) / 5 == row["eval/pass@1"]
