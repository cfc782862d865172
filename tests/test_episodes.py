"""Multi-turn decoding from the KV cache: episodes equal, token for token, a naive loop that
re-runs each whole sequence (prompt, model turns and environment replies as plain tokens) at
every step, greedy and sampled (same random draws); the limits end turns and episodes as
documented; `model_mask` marks exactly the sampled tokens; the prompt is prefilled once per
group and replies run from the cache, never re-prefilling an episode."""

import subprocess
import sys

import pytest
import torch

from rlsd.engine.decode import next_tokens
from rlsd.engine.episodes import decode_episodes
from rlsd.engine.rollout import left_pad

from .conftest import TESTS_DIR

TEXTS = ["Calculate 12 + 7.", "What is 3 - 5? Think.", "Hi"]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():  # sharper attention and logits: a wrong position or mask shows
        for weight in model.parameters():
            weight.mul_(4)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] for t in TEXTS]


class Scripted:
    """A row's environment: answers turn n with the n-th of `lengths` (cycled) reply ids made
    from the row and the turn, and is done after `done_after` turns (never if None). Records
    every turn it saw and every reply it gave."""

    def __init__(self, row: int, done_after: int | None, lengths: list[int], none=False):
        self.row, self.done_after, self.lengths, self.none = row, done_after, lengths, none
        self.seen: list[list[int]] = []
        self.replies: list[list[int]] = []

    def __call__(self, turn: list[int]) -> tuple[list[int] | None, bool]:
        self.seen.append(turn)
        n = len(self.seen)
        length = self.lengths[(n - 1) % len(self.lengths)]
        reply = [3 + (self.row * 31 + n * 7 + k) % 300 for k in range(length)]
        done = self.done_after is not None and n >= self.done_after
        self.replies.append([] if done else reply)
        if done or (self.none and not reply):
            return None, done
        return reply, False


def envs(rows: int, done_after: list, lengths: list[list[int]], none=False) -> list[Scripted]:
    return [
        Scripted(r, done_after[r % len(done_after)], lengths[r % len(lengths)], none)
        for r in range(rows)
    ]


@torch.no_grad()
def naive_episodes(model, prompts, group, respond, limits, stops, greedy=False, **sampling):
    """No cache: every step re-runs each live row's prompt and trajectory from the start, the
    environment's replies appended as plain tokens; the same draws as `decode_episodes` (one
    `next_tokens` call a step over the live rows, in row order)."""
    turn_tokens, max_tokens, max_turns = limits
    sampling = dict(temperature=1.0, top_k=0, top_p=1.0) | sampling
    rows = [list(p) for p in prompts for _ in range(group)]
    ids, sampled = [[] for _ in rows], [[] for _ in rows]
    turn, turns, truncated = [[] for _ in rows], [0] * len(rows), [False] * len(rows)
    alive = list(range(len(rows)))
    while alive:
        logits = torch.stack(
            [model(input_ids=torch.tensor([rows[r] + ids[r]])).logits[0, -1] for r in alive]
        )
        still = []
        for r, t in zip(alive, next_tokens(logits, greedy, **sampling).tolist()):
            ids[r].append(t), sampled[r].append(True), turn[r].append(t)
            if t in stops or len(turn[r]) == turn_tokens:
                turns[r] += 1
                reply, done = respond[r](turn[r])
                reply, turn[r] = reply or [], []
                if done:
                    continue
                if turns[r] == max_turns or len(ids[r]) + len(reply) >= max_tokens:
                    truncated[r] = True
                    continue
                ids[r] += reply
                sampled[r] += [False] * len(reply)
            elif len(ids[r]) == max_tokens:
                truncated[r] = True
                continue
            still.append(r)
        alive = still
    return ids, sampled, turns, truncated


def ours(model, prompts, group, respond, limits, stops, pad, **sampling):
    turn_tokens, max_tokens, max_turns = limits
    return decode_episodes(
        model,
        prompts,
        group,
        respond,
        max_turn_tokens=turn_tokens,
        max_tokens=max_tokens,
        max_turns=max_turns,
        stop_ids=stops,
        pad_id=pad,
        **sampling,
    )


def assert_equal(out, ref, pad):
    """The record equals the naive loop's lists, padding and masks included."""
    ids, sampled, turns, truncated = ref
    width = max(len(r) for r in ids)
    assert out.ids.shape == (len(ids), width)
    assert out.ids.tolist() == [r + [pad] * (width - len(r)) for r in ids]
    assert out.attention.tolist() == [[True] * len(r) + [False] * (width - len(r)) for r in ids]
    assert out.model_mask.tolist() == [r + [False] * (width - len(r)) for r in sampled]
    assert out.turns.tolist() == turns
    assert out.truncated.tolist() == truncated


def assert_layout(out, respond):
    """Each row is its turns (model_mask True) and the replies appended after them (False), in
    order, then at most one turn the episode-token limit cut (never shown to the environment)."""
    for row, env in enumerate(respond):
        real = out.attention[row]
        got = list(zip(out.ids[row][real].tolist(), out.model_mask[row][real].tolist()))
        model_ids = [t for t, m in got if m]
        cut = len(model_ids) > sum(len(turn) for turn in env.seen)
        appended = env.replies if cut else env.replies[:-1]
        expected = []
        for n, turn in enumerate(env.seen):
            expected += [(t, True) for t in turn]
            expected += [(t, False) for t in (appended[n] if n < len(appended) else [])]
        assert got[: len(expected)] == expected, row
        assert all(m for _, m in got[len(expected) :]), row
        assert not cut or out.truncated[row], row
        assert out.turns[row] == len(env.seen), row


def frequent_token(model, prompts, pad) -> int:
    """A token greedy decoding emits mid-sequence: as a stop id, some turns end at it."""
    from rlsd.engine.decode import decode

    ids, mask = left_pad(prompts, pad)
    free = decode(model, ids, mask, 1, 12, [pad], pad, greedy=True)
    middle = free[:, 1:8].flatten()
    return int(middle[middle != pad].mode().values)


def test_greedy_equals_a_naive_re_prefilled_loop(lm):
    """The issue's acceptance test: rows finish at different turns, done or truncated, with
    replies of different lengths (0 included), and G = 2 rows per prompt diverging after the
    first reply."""
    model, tok = lm
    pad, group = tok.pad_token_id, 2
    stops = [pad, frequent_token(model, prompts(tok), pad)]
    limits = (6, 40, 4)
    done_after = [1, 2, 3, None, 2, None]
    lengths = [[4], [0, 5], [2, 7], [3], [6, 1], [0, 2]]
    respond = envs(6, done_after, lengths)
    out = ours(model, prompts(tok), group, respond, limits, stops, pad, greedy=True)
    ref = naive_episodes(
        model, prompts(tok), group, envs(6, done_after, lengths), limits, stops, greedy=True
    )
    assert_equal(out, ref, pad)
    assert_layout(out, respond)
    assert len(set(out.turns.tolist())) >= 3  # rows finished at different turns
    assert out.truncated.any() and not out.truncated.all()
    assert any(turn[-1] in stops for env in respond for turn in env.seen)  # ended by a stop
    assert any(len(turn) == 6 for env in respond for turn in env.seen)  # ended by the limit
    assert (out.attention & ~out.model_mask).any()  # replies were appended


@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)],
)
def test_sampling_equals_a_naive_loop(lm, sampling):
    model, tok = lm
    pad, group = tok.pad_token_id, 3
    stops = [pad, *range(5, len(tok), 9)]  # ~1 in 9 tokens ends a turn
    limits = (8, 48, 5)
    done_after, lengths = [2, None, 4, 3], [[3], [0, 6], [5, 0, 2]]
    respond = envs(9, done_after, lengths)
    torch.manual_seed(1)
    out = ours(model, prompts(tok), group, respond, limits, stops, pad, **sampling)
    torch.manual_seed(1)
    ref = naive_episodes(
        model, prompts(tok), group, envs(9, done_after, lengths), limits, stops, **sampling
    )
    assert_equal(out, ref, pad)
    assert_layout(out, respond)
    assert len({tuple(r.tolist()) for r in out.ids}) > 6  # sampled, not all the same
    assert len(set(out.turns.tolist())) >= 2


@pytest.mark.parametrize("none", [False, True])
def test_an_empty_reply_lets_the_model_go_on(lm, none):
    """A reply of no tokens (or None with done False) appends nothing: the next turn follows
    the last one directly, every real token is the model's."""
    model, tok = lm
    pad = tok.pad_token_id
    limits = (5, 60, 6)
    respond = envs(3, [3], [[0]], none=none)
    out = ours(model, prompts(tok), 1, respond, limits, [], pad, greedy=True)
    ref = naive_episodes(model, prompts(tok), 1, envs(3, [3], [[0]]), limits, [], greedy=True)
    assert_equal(out, ref, pad)
    assert torch.equal(out.model_mask, out.attention)
    assert out.turns.tolist() == [3, 3, 3] and not out.truncated.any()
    assert out.attention.sum(-1).tolist() == [15, 15, 15]  # three turns of 5


def test_turn_limit_ends_turns_and_max_turns_truncates(lm):
    model, tok = lm
    pad = tok.pad_token_id
    respond = envs(3, [None], [[2]])
    out = ours(model, prompts(tok), 1, respond, (4, 100, 3), [], pad, greedy=True)
    assert all(len(turn) == 4 for env in respond for turn in env.seen)  # no stop: the limit
    assert out.turns.tolist() == [3, 3, 3] and out.truncated.all()
    assert out.attention.sum(-1).tolist() == [4 + 2 + 4 + 2 + 4] * 3  # the last reply dropped
    assert out.model_mask.sum(-1).tolist() == [12] * 3
    assert_layout(out, respond)


@pytest.mark.parametrize(
    "max_tokens, sampled, turns_seen",
    [(12, 7, 1), (13, 8, 2)],  # cut in the second turn / the reply after it does not fit
)
def test_episode_token_limit(lm, max_tokens, sampled, turns_seen):
    """Turns of 4, replies of 5: at 12 the second turn is cut after 3 tokens (the environment
    never sees it); at 13 it ends exactly at the limit and its reply, which cannot fit, is
    dropped. Both truncated, both equal to the naive loop."""
    model, tok = lm
    pad = tok.pad_token_id
    limits = (4, max_tokens, 10)
    respond = envs(3, [None], [[5]])
    out = ours(model, prompts(tok), 1, respond, limits, [], pad, greedy=True)
    ref = naive_episodes(model, prompts(tok), 1, envs(3, [None], [[5]]), limits, [], greedy=True)
    assert_equal(out, ref, pad)
    assert_layout(out, respond)
    assert out.attention.sum(-1).tolist() == [max_tokens] * 3  # one reply of 5 in each
    assert out.model_mask.sum(-1).tolist() == [sampled] * 3
    assert [len(env.seen) for env in respond] == [turns_seen] * 3
    assert out.truncated.all()


def test_prompt_prefilled_once_per_group_and_replies_run_from_the_cache(lm):
    """The first forward runs the B prompts (not B*G rows); every later one runs at most the
    last token and a reply per row: no episode is ever re-prefilled. The tokens fed after the
    prefill are each row's trajectory but its last token."""
    model, tok = lm
    pad, group = tok.pad_token_id, 3
    calls = []

    def record(module, args, kwargs):
        calls.append(
            (
                kwargs["input_ids"].shape,
                kwargs["attention_mask"][:, -kwargs["input_ids"].shape[1] :].sum().item(),
            )
        )

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = ours(
            model,
            prompts(tok),
            group,
            envs(9, [2, 3, None], [[3], [1, 2]]),
            (5, 40, 4),
            [pad],
            pad,
            greedy=True,
        )
    finally:
        hook.remove()
    (first, _), later = calls[0], calls[1:]
    assert first == (3, max(len(p) for p in prompts(tok)))
    assert all(shape[1] <= 1 + 3 for shape, _ in later)
    assert sum(fed for _, fed in later) == (out.attention.sum() - len(out.ids)).item()


def test_refusals(lm):
    model, tok = lm
    pad = tok.pad_token_id
    with pytest.raises(ValueError, match="one per row is 3 prompts x 2 = 6"):
        ours(model, prompts(tok), 2, envs(3, [1], [[1]]), (4, 20, 2), [pad], pad)
    with pytest.raises(ValueError, match="max_turns must be 1 or more"):
        ours(model, prompts(tok), 1, envs(3, [1], [[1]]), (4, 20, 0), [pad], pad)
    with pytest.raises(
        TypeError, match="respond\\[0\\] returned \\[1, 2\\]: expected \\(ids, done\\)"
    ):
        ours(model, prompts(tok), 1, [lambda turn: [1, 2]] * 3, (4, 20, 2), [], pad)
    with pytest.raises(TypeError, match="non-integer ids"):
        ours(model, prompts(tok), 1, [lambda turn: (["a"], False)] * 3, (4, 20, 2), [], pad)


@pytest.mark.slow  # a benchmark smoke run (~7 s): CI runs it with -m slow
def test_episode_bench_smoke_runs():
    bench = TESTS_DIR.parent / "benchmarks" / "episode_bench.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--smoke"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("| completion |", "| episode |", "| episode, uneven replies |", "| restart"):
        assert done.stdout.count(row) == 2, row  # both batch shapes
    assert "episode cost vs completion (goal <= 1.3x)" in done.stdout
