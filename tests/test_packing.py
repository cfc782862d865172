"""The packed layout (rlsd/engine/packing.py) piece by piece, by hand: where each token goes, the
mask, the cost estimate, when it declines; and that it equals scoring every row whole under
eager attention and gradient checkpointing of either kind (float64). The sdpa values and
gradients, with and without LoRA and KL, are tested beside the cache layout in
tests/test_shared_prefix.py."""

from types import SimpleNamespace
from unittest.mock import patch

import pytest
import torch

from rlsd.engine.logprobs import TokenScorer
from rlsd.engine.models import base_model
from rlsd.engine.packing import (
    MAX_MASK_ELEMENTS,
    contiguous_lengths,
    layer_costs,
    packed_hidden,
    packed_layout,
    packed_mask,
    packing_pays,
    supports_packing,
)

from .test_shared_prefix import (  # noqa: F401 (float64_norms: the autouse fixture)
    assert_same_gradients,
    embedded_shapes,
    float64_model,
    float64_norms,
    gradients,
    grouped_inputs,
    packed_width,
)

FLOAT32 = {"rtol": 1e-5, "atol": 1e-6}


def test_layout_by_hand():
    """Prompts of 2 and 3 tokens; rows 0, 2, 3 (lengths 1, 0, 2) share prompt 0, row 1
    (length 2) has prompt 1. Packed: [p p r0 r3 r3] and [p p p r1 r1]."""
    got = packed_layout([2, 3], [1, 2, 0, 2], [0, 1, 0, 0])
    assert got["segment"].tolist() == [[0, 0, 1, 4, 4], [0, 0, 0, 2, 2]]
    assert got["positions"].tolist() == [[0, 1, 2, 2, 3], [0, 1, 2, 3, 4]]
    assert got["token_at"].tolist() == [2, 8, 9, 3, 4]  # r0's token; r1's two; r3's two
    # each token's predictor: the prompt's last position for a first token, else the previous
    assert got["predictor_at"].tolist() == [1, 7, 8, 1, 3]


def test_layout_pads_the_shorter_packed_row():
    got = packed_layout([1, 1], [3, 1], [0, 1])
    assert got["segment"].tolist() == [[0, 1, 1, 1], [0, 2, -1, -1]]
    assert got["positions"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]


def test_mask_by_hand():
    """[prompt prompt | a a | b | pad]: a's tokens see the prompt and the earlier a, b sees the
    prompt and itself, the pad sees the prompt only."""
    mask = packed_mask(torch.tensor([[0, 0, 1, 1, 2, -1]]))
    assert mask.shape == (1, 1, 6, 6)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 0, 0, 0],
    ]


def test_contiguous_lengths():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    assert contiguous_lengths(mask).tolist() == [2, 3, 0]
    assert contiguous_lengths(torch.tensor([[1, 0, 1]], dtype=torch.bool)) is None  # a hole


def config(**kw):
    base = dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1)
    return SimpleNamespace(**{**base, **kw})


def test_layer_costs_by_hand():
    # head_dim 4: q 8x8, k and v 8x4 each, o 8x8 = 192; gate, up, down 3 x 8 x 16 = 384
    assert layer_costs(config()) == (576.0, 16.0)  # per score: 2 heads x 4 x 2 (QK, AV)
    assert layer_costs(config(head_dim=2)) == (8 * 2 * 6 + 384, 8.0)


def test_packing_pays_by_hand():
    """Costs (576 per position, 16 per score). One prompt of 4 (padded width 4), two rows
    padded to width 4 holding 1 token each: packed [p p p p a b] = 6 positions, 36 scores:
    3,456 + 576 = 4,032; shared: 4 + 2 x 4 = 12 positions, 16 + 2 x 4 x 8 = 80 scores:
    6,912 + 1,280 = 8,192. With full rows of 4 each, packed (12 positions, 144 scores:
    6,912 + 2,304 = 9,216) costs more than shared's 8,192."""
    short = torch.tensor([[0, 0, 0, 0, 1, 2]])
    assert packing_pays(config(), short, prompt_width=4, width=4, rows=2)
    full = torch.tensor([[0] * 4 + [1] * 4 + [2] * 4])
    assert not packing_pays(config(), full, prompt_width=4, width=4, rows=2)


def test_packing_never_builds_a_mask_over_the_bound():
    """A prompt of 15,385 tokens shared by 1,000 rows of one token, padded to 64: packed would be
    cheaper by the estimate (576 x 16,385 + 16 x 16,385^2 = 4.31G multiply-adds against
    576 x 79,385 + 16 x (15,385^2 + 64,000 x 15,449) = 19.65G), but its mask would hold
    16,385^2 > 2^28 elements."""
    s = 16_385
    assert s * s > MAX_MASK_ELEMENTS >= (s - 1) ** 2
    segment = torch.zeros(1, s, dtype=torch.long)
    segment[0, -1000:] = torch.arange(1, 1001)
    args = dict(prompt_width=s - 1000, width=64, rows=1000)
    assert not packing_pays(config(), segment, **args)
    with patch("rlsd.engine.packing.MAX_MASK_ELEMENTS", s * s):
        assert packing_pays(config(), segment, **args)


def decoder_of(model):
    return base_model(model).get_decoder()


def test_declines(tiny_model_dir):
    model, tokenizer = float64_model(tiny_model_dir)
    decoder = decoder_of(model)
    ids, attn, c_mask = grouped_inputs(tokenizer, [0, 0, 1, 1], torch.Generator().manual_seed(0))
    assert supports_packing(decoder)
    assert packed_hidden(decoder, ids, attn, c_mask, always=True) is not None
    holed = c_mask.clone()
    holed[2, 0] = False  # row 2's first token masked, its later ones not
    assert packed_hidden(decoder, ids, attn, holed, always=True) is None
    distinct = grouped_inputs(tokenizer, [0, 1, 2], torch.Generator().manual_seed(0))
    assert packed_hidden(decoder, *distinct, always=True) is None  # no prompt shared
    config = decoder.config
    config._attn_implementation = "flash_attention_2"  # takes no custom mask (not run)
    assert not supports_packing(decoder)
    config._attn_implementation = "sdpa"
    config.layer_types = ["sliding_attention"] + ["full_attention"] * (config.num_hidden_layers - 1)
    config.sliding_window = 4
    assert not supports_packing(decoder)


@pytest.mark.parametrize("rows", [[0, 0, 1, 1, 2], [2, 0, 2, 0]], ids=["runs", "scattered"])
def test_eager_attention_equals_the_unshared_path(tiny_model_dir, rows):
    """The eager implementation takes an additive float mask; values and gradients as whole, to
    float32 rounding: eager attention computes its softmax in float32 whatever the model's
    dtype, and a packed row's softmax sums over a wider, differently masked row."""
    model, tokenizer = float64_model(tiny_model_dir)
    model.set_attn_implementation("eager")
    assert decoder_of(model).config._attn_implementation == "eager"
    ids, attn, c_mask = grouped_inputs(tokenizer, rows, torch.Generator().manual_seed(2))
    scorer = TokenScorer(model, chunk_rows=3).train()
    scorer.layout = "packed"
    shapes = embedded_shapes(model)
    with torch.no_grad():
        torch.testing.assert_close(
            scorer(ids, attn, c_mask, share_prefix=True), scorer(ids, attn, c_mask), **FLOAT32
        )
    assert shapes[0] == (len(set(rows)), packed_width(rows, c_mask))
    inputs = (ids, attn, c_mask)
    plain = gradients(model, scorer, inputs, share=False)
    packed = gradients(model, scorer, inputs, share=True)
    assert packed.keys() == plain.keys() and plain
    for name in plain:
        torch.testing.assert_close(packed[name], plain[name], **FLOAT32, msg=name)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_of_either_kind_composes(tiny_model_dir, reentrant):
    """One forward with no cache: the packed layout runs under reentrant checkpointing too
    (where the cache layout declines), with the same gradients."""
    model, tokenizer = float64_model(tiny_model_dir, lora=True)
    scorer = TokenScorer(model).train()
    scorer.layout = "packed"
    inputs = grouped_inputs(tokenizer, [1, 1, 1, 0, 0, 0], torch.Generator().manual_seed(4))
    plain = gradients(model, scorer, inputs, share=False)
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    base.enable_input_require_grads()
    shapes = embedded_shapes(model)
    assert_same_gradients(gradients(model, scorer, inputs, share=True), plain)
    assert shapes[0] == (2, packed_width([1, 1, 1, 0, 0, 0], inputs[2]))


def test_auto_takes_the_cheaper_layout(tiny_model_dir):
    """Short completions of unequal length pack; when every completion fills the width, the
    dense attention over a packed row costs more and `auto` takes the cache layout."""
    model, tokenizer = float64_model(tiny_model_dir)
    scorer = TokenScorer(model)
    ids, attn, c_mask = grouped_inputs(tokenizer, [0, 0, 0, 0], torch.Generator().manual_seed(0))
    shapes = embedded_shapes(model)
    with torch.no_grad():
        scorer(ids, attn, c_mask, share_prefix=True)
        assert shapes == [(1, packed_width([0] * 4, c_mask))]
        shapes.clear()
        full = torch.ones(8, 40, dtype=torch.bool)
        long_ids = torch.cat([ids[:1].expand(8, -1)[:, :6], torch.randint(3, 300, (8, 40))], 1)
        scorer(long_ids, torch.ones_like(long_ids), full, share_prefix=True)
        assert shapes == [(1, 6), (8, 40)]  # the prompt once, then the padded completions
