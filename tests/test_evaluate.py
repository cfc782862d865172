"""Held-out greedy evaluation on a tiny model."""

import torch

from rlsd.config import load_config
from rlsd.data import Record
from rlsd.evaluate import greedy_accuracy, heldout_records
from rlsd.models import load_model, stop_token_ids


def test_heldout_records_exclude_training_questions():
    train = [Record("a", "1"), Record("b", "2")]
    candidates = [Record("b", "2"), Record("c", "3"), Record("a", "1"), Record("d", "4")]
    assert [r.prompt for r in heldout_records(train, candidates, 5)] == ["c", "d"]
    assert [r.prompt for r in heldout_records(train, candidates, 1)] == ["c"]


def test_greedy_accuracy_is_deterministic_and_scored_by_the_first_verifier(tiny_overrides):
    cfg = load_config(None, {**tiny_overrides, "reward.verifiers": "exact"})
    lm, tok = load_model(cfg.model, torch.float32)
    records = [Record("Calculate 1 + 2.", "3"), Record("Calculate 4 - 1.", "3"),
               Record("What is 3 - 5?", "-2")]
    stops = stop_token_ids(lm, tok)
    first = greedy_accuracy(cfg, lm, tok, records, stops, torch.device("cpu"), batch_size=2)
    second = greedy_accuracy(cfg, lm, tok, records, stops, torch.device("cpu"), batch_size=3)
    assert first["completions"] == second["completions"] and len(first["completions"]) == 3
    assert first["n"] == 3
    wanted = sum(c.strip().endswith(f"Answer: {r.answer}") for c, r in
                 zip(first["completions"], records)) / 3
    assert first["accuracy"] == wanted
