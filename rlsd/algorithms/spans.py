"""Token spans of a completion found on its decoded text: the reasoning span and the answer.

Tags such as `<think>` / `</think>` are matched on text, never on token ids. With a BPE tokenizer
the ids of a tag depend on its context ("<think>" after a space or glued to a word becomes other
tokens, e.g. " <" + "think" + ">"), so id matching misses tags. Instead each completion token is
decoded on its own (`token_pieces`); the pieces are concatenated, and token t covers the characters
[sum(len(p) for p in pieces[:t]), sum(len(p) for p in pieces[:t + 1])) of that text.

The rule for the reasoning span (`reasoning_span_mask`): scan the text for the open tag; the span
starts right after it and ends right before the first close tag after it (or at the end of the
completion when the span is never closed); the next open tag is searched after that close tag. A
close tag without an open tag is ignored, and so is an open tag inside a span. A token is in the
span only when every character of it lies inside the span: a token that overlaps any character of
a tag (e.g. " </" holding a space of the span and the start of the close tag) is a tag token and
is not in the span. A zero-length token lying inside a span counts as inside.

Limits. A multi-byte character split over several tokens decodes to replacement characters, one
per piece, so the pieces' text is not the completion's text there; tags are matched on the
concatenated pieces, which is exact for ASCII tags (their bytes are never split that way). Decoders
that drop a piece's leading space when it is decoded alone (SentencePiece "▁") shift offsets by
the lost spaces but still find tags, since the tags themselves hold no space.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from itertools import accumulate
from typing import Any

import torch


def token_pieces(
    tokenizer: Any, completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> list[list[str]]:
    """For each row, the decoded text of each real (mask True) completion token, in order.

    `tokenizer` only needs `batch_decode` (a Hugging Face tokenizer, duck-typed). Tokens are
    decoded one at a time, special tokens kept, spaces not cleaned up.
    """
    out = []
    for row in range(completion_ids.shape[0]):
        ids = completion_ids[row][completion_mask[row].bool()].tolist()  # (L,)
        out.append(
            list(
                tokenizer.batch_decode(
                    [[i] for i in ids],
                    skip_special_tokens=False,
                    clean_up_tokenization_spaces=False,
                )
            )
            if ids
            else []
        )
    return out


def _span_chars(text: str, open_tag: str, close_tag: str) -> list[tuple[int, int]]:
    """[(first, stop)) character ranges strictly between each open tag and its close tag."""
    spans, pos = [], 0
    while (start := text.find(open_tag, pos)) >= 0:
        inner = start + len(open_tag)
        end = text.find(close_tag, inner)
        stop = len(text) if end < 0 else end
        spans.append((inner, stop))
        if end < 0:
            break
        pos = end + len(close_tag)
    return spans


def reasoning_span_mask(
    pieces: list[list[str]], open_tag: str, close_tag: str, width: int
) -> torch.Tensor:
    """(N, width) True on tokens lying wholly inside a reasoning span (see the module docstring).

    `pieces[i]` holds the decoded text of each of row i's completion tokens, in order (from
    `token_pieces`). Tag tokens, tokens outside spans and columns past a row's pieces are False.
    """
    if not open_tag or not close_tag:
        raise ValueError("reasoning_span_mask: open_tag and close_tag must be non-empty")
    out = torch.zeros(len(pieces), width, dtype=torch.bool)  # (N, width)
    for row, parts in enumerate(pieces):
        ends = list(accumulate(len(p) for p in parts))
        starts = [0, *ends[:-1]] if parts else []
        for inner, stop in _span_chars("".join(parts), open_tag, close_tag):
            first = bisect_left(starts, inner)  # first token starting at or after the span start
            last = bisect_right(ends, stop)  # tokens before this one end at or before its stop
            if first < last:
                out[row, first : min(last, width)] = True
    return out


def answer_span_mask(pieces: list[list[str]], anchor: str, width: int) -> torch.Tensor:
    """(N, width) True from the token holding the start of the last `anchor` (e.g. "Answer:")
    to the end of the completion: the final-answer tokens; a row without the anchor has none.
    `pieces[i]` holds the decoded text of each of row i's completion tokens, in order."""
    out = torch.zeros(len(pieces), width, dtype=torch.bool)  # (N, width)
    for row, parts in enumerate(pieces):
        pos = "".join(parts).rfind(anchor)
        end = 0
        for t, part in enumerate(parts if pos >= 0 else []):
            end += len(part)
            if end > pos:
                out[row, t : len(parts)] = True
                break
    return out


def span_split(
    multiplier: torch.Tensor, span_mask: torch.Tensor, completion_mask: torch.Tensor
) -> dict[str, float]:
    """Mean credit multiplier inside the reasoning span and outside it (the answer)."""
    out = {}
    for name, where in (("thought", span_mask.bool()), ("answer", ~span_mask.bool())):
        where = where & completion_mask.bool()  # (N, T)
        if where.any():
            out[f"rlsd/multiplier_mean_{name}"] = multiplier[where].mean().item()
    return out
