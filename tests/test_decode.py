"""The own KV-cache sampler: greedy ids equal `generate`'s, the cached loop equals a naive loop
that recomputes every sequence (same random draws), and the filters equal transformers'."""

import pytest
import torch

from rlsd.engine.decode import decode, filter_logits, next_tokens, sample_rows
from rlsd.engine.rollout import left_pad


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def prompts(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    texts = ["Calculate 12 + 7.", "What is 3 - 5? Think.", "Hi"]
    return left_pad([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)


def frequent_token(tokens: torch.Tensor, pad: int) -> int:
    """A token generated mid-sequence by some rows: as a stop id it makes rows finish early."""
    middle = tokens[:, 1:6].flatten()
    return int(middle[middle != pad].mode().values)


def test_greedy_equals_generate_with_rows_finishing_early(lm):
    model, tok = lm
    ids, mask = prompts(tok)
    pad = tok.pad_token_id
    free = model.generate(
        input_ids=ids,
        attention_mask=mask.long(),
        do_sample=False,
        max_new_tokens=12,
        pad_token_id=pad,
        eos_token_id=[pad],
    )[:, ids.shape[1] :]
    stops = [pad, frequent_token(free, pad)]
    ref = model.generate(
        input_ids=ids,
        attention_mask=mask.long(),
        do_sample=False,
        max_new_tokens=12,
        pad_token_id=pad,
        eos_token_id=stops,
    )[:, ids.shape[1] :]
    ours = decode(model, ids, mask, 1, 12, stops, pad, greedy=True)
    assert (ours == pad).any() and (ours[:, -1] != pad).any()  # some rows stopped early
    assert torch.equal(ours, ref[:, : ours.shape[1]])
    assert (ref[:, ours.shape[1] :] == pad).all()
    grouped = decode(model, ids, mask, 3, 12, stops, pad, greedy=True)  # prefill shared by 3
    assert torch.equal(grouped, ours.repeat_interleave(3, 0))


def naive_decode(model, ids, mask, group, max_new, stops, pad, **sampling) -> torch.Tensor:
    """No cache: every step re-runs each live row's whole sequence; same draws as `decode`."""
    ids, mask = ids.repeat_interleave(group, 0), mask.long().repeat_interleave(group, 0)
    rows = ids.shape[0]
    tokens = torch.full((rows, max_new), pad)
    alive = torch.arange(rows)
    for t in range(max_new):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        chosen = next_tokens(logits, False, **sampling)
        tokens[alive, t] = chosen
        keep = ~torch.isin(chosen, torch.tensor(stops))
        if t == max_new - 1 or not keep.any():
            return tokens[:, : t + 1]
        alive, chosen, ids, mask = alive[keep], chosen[keep], ids[keep], mask[keep]
        ids = torch.cat([ids, chosen.unsqueeze(1)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return tokens


@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)],
)
def test_sampling_equals_a_naive_loop(lm, sampling):
    model, tok = lm
    ids, mask = prompts(tok)
    pad = tok.pad_token_id
    stops = [pad, *range(5, len(tok), 9)]  # ~1 in 9 tokens ends a row: rows stop at random
    torch.manual_seed(1)
    ours = decode(model, ids, mask, 4, 10, stops, pad, **sampling)
    torch.manual_seed(1)
    ref = naive_decode(model, ids, mask, 4, 10, stops, pad, **sampling)
    assert torch.equal(ours, ref)
    assert (ours == pad).any() and (ours[:, -1] != pad).any()  # rows stopped at different times
    assert len({tuple(r.tolist()) for r in ours}) > 3  # sampled, not all the same


def test_sample_rows_draws_from_the_distribution(monkeypatch):
    probs = torch.tensor(
        [[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1, 0.6]]
    )
    torch.manual_seed(0)
    draws = torch.stack([sample_rows(probs) for _ in range(20000)])  # (20000, 3)
    for row in range(3):
        freq = torch.bincount(draws[:, row], minlength=5).double() / len(draws)
        assert torch.allclose(freq, probs[row].double(), atol=0.012), (row, freq)
    assert not torch.isin(draws[:, 0], torch.tensor([1, 4])).any()  # zero mass: never drawn
    assert (draws[:, 1] == 4).all()
    # u at the very top of the range (rounded up to the total) still picks a real id
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(*a, **k))
    assert sample_rows(torch.tensor([[0.25, 0.75, 0.0]])).tolist() == [1]


def test_filters_equal_transformers_processors():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    ids = torch.zeros(5, 1, dtype=torch.long)
    expected = TopPLogitsWarper(0.8)(
        ids, TopKLogitsWarper(10)(ids, TemperatureLogitsWarper(0.6)(ids, logits.clone()))
    )
    assert torch.equal(filter_logits(logits, 0.6, 10, 0.8), expected)
    assert torch.equal(filter_logits(logits, 1.0, 0, 1.0), logits)
    kept = torch.isfinite(filter_logits(logits, 1.0, 3, 1.0)).sum(-1)
    assert kept.tolist() == [3] * 5


@pytest.mark.parametrize("decoder", ["own", "generate"])
def test_top_k_zero_samples_the_whole_vocabulary(lm, decoder):
    """top_k 0 means no top-k filter in both decoders (generate's default would be 50)."""
    from rlsd.engine.rollout import sample_completions
    from rlsd.schema.config import RolloutConfig

    model, tok = lm
    prompt = tok("Calculate 12 + 7.")["input_ids"]
    cfg = RolloutConfig(num_generations=600, max_new_tokens=1, decoder=decoder)
    torch.manual_seed(0)
    first = sample_completions(
        model, [prompt], cfg, tok.pad_token_id, [tok.pad_token_id], torch.device("cpu")
    ).completion_ids[:, 0]
    with torch.no_grad():
        probs = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
    top50 = torch.topk(probs, 50).indices
    outside = (~torch.isin(first, top50)).float().mean().item()
    expected = 1 - probs[top50].sum().item()
    assert expected > 0.5  # the tiny model spreads its mass: the test can tell
    assert outside == pytest.approx(expected, abs=0.08)
