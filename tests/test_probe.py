"""`rlsd probe`: its statistics by hand on a fixed batch, and the command end to end on the
tiny model."""

import json

import pytest
import torch

from rlsd.commands.cli import main
from rlsd.commands.probe import (
    auc,
    context_stats,
    first_wrong_step,
    groups_line,
    verdict,
    wrong_step_hits,
)

from .test_cli import argv


def test_auc_by_hand():
    assert auc([3.0, 2.0], [1.0, 0.0]) == 1.0
    assert auc([0.0], [1.0]) == 0.0
    assert auc([1.0, 0.0], [1.0]) == pytest.approx(0.25)  # one tie (half), one loss
    assert auc([], [1.0]) is None


def test_first_wrong_step_finds_the_first_bad_arithmetic():
    text = "4 - 1 = 3\n3 - 7 = -3\n-3 + 1 = -2\nAnswer: -2"
    start, end = first_wrong_step(text)
    assert text[start:end] == "3 - 7 = -3"
    assert first_wrong_step("4 - 1 = 3\n3 - 7 = -4\nAnswer: -4") is None
    assert first_wrong_step("2 x 3 = 7") == (0, 9)
    assert first_wrong_step("no steps here") is None


def fixed_batch():
    """Two groups of 2: completions 0 and 2 correct. Pieces spell out each completion."""
    pieces = [
        ["4", " -", " 1", " =", " 3"],
        ["4", " -", " 1", " =", " 2"],
        ["5", " +", " 1", " =", " 6"],
        ["5", " +", " 1", " =", " 7"],
    ]
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2, 4] = False  # one padded token: its Delta must not count
    delta = torch.tensor(
        [
            [0.1, 0.1, 0.1, 0.1, 0.1],
            [0.0, 0.0, 0.0, 0.0, -1.0],  # the worst token is the wrong result
            [0.3, 0.3, 0.3, 0.3, 9.9],
            [-0.5, 0.0, 0.0, 0.0, 0.0],
        ]
    )  # worst before the wrong step
    correct = torch.tensor([True, False, True, False])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    return delta.masked_fill(~mask, 0.0), mask, correct, adv, pieces


def test_context_stats_by_hand():
    delta, mask, correct, adv, pieces = fixed_batch()
    has = torch.ones(4, dtype=torch.bool)
    stats = context_stats(delta, mask, correct, adv, has, 0.2, pieces)
    assert stats["delta_mean_correct"] == pytest.approx((0.5 + 1.2) / 9)
    assert stats["delta_mean_incorrect"] == pytest.approx(-1.5 / 10)
    # mean Delta per completion: 0.1, -0.2, 0.3, -0.1: every correct one above every incorrect
    assert stats["auc"] == 1.0
    # weights exp(sign(A) Delta): low (< 0.8) nowhere; high (> 1.2): row 1's exp(1.0) and row
    # 2's exp(0.3) x 4 and row 3's exp(0.5): 6 of 19 tokens
    assert stats["clip_low_frac"] == pytest.approx(0.0)
    assert stats["clip_high_frac"] == pytest.approx(6 / 19)
    # both incorrect completions hold a wrong step starting at token 0 ("4 - 1 = 2" is one step)
    assert stats["wrong_step_rows"] == 2.0
    assert stats["min_delta_at_or_after_wrong_step"] == 1.0
    assert stats["min_delta_offset_tokens"] == pytest.approx((4 + 0) / 2)
    assert stats["coverage"] == 1.0 and stats["n_correct"] == 2 and stats["n_incorrect"] == 2
    partial = context_stats(
        delta, mask, correct, adv, torch.tensor([True, True, False, False]), 0.2, pieces
    )
    assert partial["coverage"] == 0.5 and partial["n_correct"] == 1 and partial["auc"] == 1.0


def test_wrong_step_position_relative_to_the_worst_token():
    pieces = [["1 + 1 = 2", "\n", "2 + 2", " = 5", "\nAnswer: 5"]]
    delta = torch.tensor([[-2.0, 0.0, 0.0, -0.1, 0.0]])  # the worst token precedes the error
    got = wrong_step_hits(delta, torch.ones(1, 5, dtype=torch.bool), pieces, [0])
    assert got["min_delta_at_or_after_wrong_step"] == 0.0 and got["min_delta_offset_tokens"] == -2
    delta = torch.tensor([[0.0, 0.0, 0.0, -3.0, 0.0]])
    got = wrong_step_hits(delta, torch.ones(1, 5, dtype=torch.bool), pieces, [0])
    assert got["min_delta_in_wrong_step"] == 1.0


def test_verdicts():
    base = {"n_correct": 10, "n_incorrect": 10}
    assert verdict({**base, "auc": 0.7}).startswith("separates")
    assert verdict({**base, "auc": 0.6}).startswith("weak")
    assert verdict({**base, "auc": 0.5}).startswith("no signal")
    assert verdict({**base, "auc": 0.3}).startswith("inverted")
    assert verdict({"n_correct": 2, "n_incorrect": 10, "auc": 0.9}).startswith("too few")


def test_groups_line_says_what_is_left_to_learn_from():
    few = groups_line({"all_correct": 0.625, "all_wrong": 0.125, "mixed": 0.25})
    assert few.startswith("Groups: 62 % all correct, 12 % all wrong, 25 % mixed.")
    assert "`rollout.num_generations`" in few
    enough = groups_line({"all_correct": 0.25, "all_wrong": 0.25, "mixed": 0.5})
    assert "50 % mixed" in enough and "Few groups" not in enough


def test_probe_command_end_to_end(tiny_overrides, tmp_path, capsys):
    overrides = {
        **tiny_overrides,
        "data.task": "chain_sum",
        "data.task_params": "{min_terms: 2, max_terms: 3, min_digits: 1, max_digits: 2}",
    }
    out = tmp_path / "probe"
    code = main(["probe", *argv(overrides), "--items", "3", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "probe.json").read_text())
    assert set(result["contexts"]) == {"answer", "solution", "worked", "sibling", "memory"}
    assert result["items"] == 3 and result["judged_completions"] == 12
    shares = result["groups"]  # 3 groups of 4: each share is a multiple of 1/3
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(round(3 * v, 6) == round(3 * v) for v in shares.values())
    assert shares["all_correct"] <= result["accuracy"] <= 1 - shares["all_wrong"]
    assert "% mixed" in (out / "probe.md").read_text()
    assert result["contexts"]["answer"]["coverage"] == 1.0
    assert result["contexts"]["worked"]["coverage"] == 1.0  # chain sums have worked solutions
    assert result["contexts"]["solution"]["coverage"] == 0.0  # reasoning-gym has no column
    assert "| answer |" in capsys.readouterr().out
    assert main(["probe", *argv(overrides), "--contexts", "bogus"]) == 2


def test_probe_scores_each_prompt_once_with_the_same_values(tiny_model_dir):
    """`logps_after` with `share_prefix` (the probe follows train.share_prefix) runs each
    distinct prompt once and gives the log-probs of scoring every row whole."""
    from rlsd.commands.probe import logps_after
    from rlsd.engine.logprobs import TokenScorer
    from rlsd.engine.models import load_model
    from rlsd.engine.rollout import Batch, completion_mask_from, left_pad
    from rlsd.schema.config import ModelConfig

    model, tokenizer = load_model(ModelConfig(name=str(tiny_model_dir), lora=False), torch.float64)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12]] * 3 + [[13, 14, 15]] * 3  # two groups of three
    c_ids = torch.randint(3, 300, (6, 5), generator=torch.Generator().manual_seed(0))
    c_ids[1, 2] = eos
    c_mask = completion_mask_from(c_ids, [eos])
    p_ids, p_mask = left_pad(prompts, pad)
    batch = Batch(p_ids, p_mask, c_ids.masked_fill(~c_mask, pad), c_mask)
    tokens: list[int] = []
    model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: tokens.append(args[0].numel())
    )
    scorer = TokenScorer(model, temperature=0.7)
    whole = logps_after(scorer, prompts, batch, pad, "cpu", rows=6)
    whole_tokens, tokens[:] = sum(tokens), []
    shared = logps_after(scorer, prompts, batch, pad, "cpu", rows=6, share_prefix=True)
    torch.testing.assert_close(shared, whole, rtol=1e-6, atol=1e-8)  # float32 RMSNorm inside
    assert whole.abs().sum() > 0 and sum(tokens) < whole_tokens
