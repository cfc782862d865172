"""Multi-turn cost (issue 36): an episode of N tokens against one completion of N tokens.

    python benchmarks/episode_bench.py [--size smollm2|tiny] [--turns 4] [--turn-tokens 24]
                                       [--reply 16] [--batch 1 2x2] [--repeats 2]
    python benchmarks/episode_bench.py --smoke   # tiny model, short episodes, one round, no file

The claim measured: an episode of N total tokens (model turns plus environment replies) costs at
most 1.3x a single completion of N tokens on the same decoder. On a random model of the given
size (`smollm2`: SmolLM2-135M's shape, fp32 on the CPU; random weights cost what trained ones
do, and no row stops early: there are no stop ids), in one process, alternating, `--repeats`
times each after one warm-up round:

- `completion`: `decode.decode`, N new tokens per row (N = turns x turn tokens + replies);
- `episode`: `episodes.decode_episodes`, `--turns` turns of `--turn-tokens` model tokens, each
  but the last answered by a reply of `--reply` tokens run from the KV cache;
- `episode, uneven replies`: the same, the rows' replies of 0.5x, 1x and 1.5x `--reply` tokens
  in rotation, so at each turn the rows are fed replies of different lengths (masked gaps in the
  cache of the rows fed fewer; each row's total is N when turns - 1 is a multiple of 3, and
  costs are compared per token either way);
- `restart per turn`: what decoding without continuing the cache costs: `decode` once per turn
  on the whole sequence so far (prompt, turns and replies re-prefilled each turn).

Reported per batch shape (`--batch`: rows, or prompts x group): median seconds per batch, the
tokens after the prompts, seconds per 1000 of them, and that cost as a ratio to `completion`'s
(the median over rounds of the ratio within a round, and the ratio of the fastest runs); the
goal line compares `episode`'s median ratio with 1.3x. Results go to
benchmarks/results/episodes-<machine>-<date>.md with the command and the load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {
    "smollm2": dict(  # SmolLM2-135M's shape
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
    ),
    "tiny": dict(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}
PAD = 0
GOAL = 1.3  # the bound on an episode's cost per token, as a multiple of a completion's


def build_model(size: str):
    """A random Llama of the named shape, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[size], tie_word_embeddings=True, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


class Replies:
    """A row's environment for the benchmark: done after `turns` turns, else a reply of fixed
    ids, `lengths[(row + turn) % len(lengths)]` long."""

    def __init__(self, row: int, turns: int, lengths: list[int], vocab: int):
        self.row, self.turns, self.lengths, self.vocab, self.seen = row, turns, lengths, vocab, 0

    def reply(self, turn: int) -> list[int]:
        length = self.lengths[(self.row + turn) % len(self.lengths)]
        return [5 + (self.row * 7 + turn * 13 + k) % (self.vocab - 10) for k in range(length)]

    def __call__(self, ids: list[int]) -> tuple[list[int] | None, bool]:
        self.seen += 1
        return (None, True) if self.seen >= self.turns else (self.reply(self.seen), False)


def variants(args: argparse.Namespace) -> dict[str, Callable]:
    """name -> fn(model, prompts, group) -> tokens after the prompt (all rows)."""
    from rlsd.engine.decode import decode
    from rlsd.engine.episodes import decode_episodes
    from rlsd.engine.rollout import left_pad

    turns, per_turn, reply, vocab = args.turns, args.turn_tokens, args.reply, args.vocab
    total = turns * per_turn + (turns - 1) * reply
    even, uneven = [reply], [reply // 2, reply, reply + reply // 2]

    def completion(model, prompts, group):
        ids, mask = left_pad(prompts, PAD)
        return decode(model, ids, mask, group, total, [], PAD).numel()

    def episode(lengths):
        def run(model, prompts, group):
            rows = len(prompts) * group
            respond = [Replies(r, turns, lengths, vocab) for r in range(rows)]
            limits = dict(max_turn_tokens=per_turn, max_tokens=10**9, max_turns=turns)
            out = decode_episodes(model, prompts, group, respond, **limits, stop_ids=[], pad_id=PAD)
            return int(out.attention.sum())

        return run

    def restart(model, prompts, group):
        envs = [Replies(r, turns, even, vocab) for r in range(len(prompts) * group)]
        seqs = [list(p) for p in prompts for _ in range(group)]
        for turn in range(turns):
            start = prompts if turn == 0 else seqs  # the first turn shares the prompt's prefill
            ids, mask = left_pad(start, PAD)
            out = decode(model, ids, mask, group if turn == 0 else 1, per_turn, [], PAD)
            last = turn == turns - 1
            seqs = [
                s + o.tolist() + ([] if last else e.reply(turn + 1))
                for s, o, e in zip(seqs, out, envs)
            ]
        return sum(len(s) for s in seqs) - sum(len(p) for p in prompts) * group

    return {
        "completion": completion,
        "episode": episode(even),
        "episode, uneven replies": episode(uneven),
        "restart per turn": restart,
    }


def measure(model, prompts, group, named, repeats) -> dict[str, list[tuple[float, int]]]:
    """(seconds, tokens after the prompt) of each variant's batches, alternating, after one
    warm-up round."""
    import torch

    results: dict[str, list[tuple[float, int]]] = {name: [] for name in named}
    for repeat in range(repeats + 1):
        for name, fn in named.items():
            torch.manual_seed(repeat)
            start = time.perf_counter()
            tokens = fn(model, prompts, group)
            seconds = time.perf_counter() - start
            if repeat:
                results[name].append((seconds, tokens))
            print(f"round {repeat}: {name}: {seconds:.2f} s", file=sys.stderr, flush=True)
    return results


def table(results, rows: str) -> tuple[list[str], float]:
    """A markdown table of one batch shape, and `episode`'s cost ratio to `completion`. A
    variant's ratio is the median over rounds of its cost per token over `completion`'s in the
    same round (run side by side, so a slow spell of the machine mostly cancels); the fastest
    round's ratio is shown too (noise only ever adds time)."""
    cost = {n: [1000 * s / t for s, t in r] for n, r in results.items()}
    lines = [
        "",
        f"## {rows}",
        "",
        "| decoding | s/batch (median) | tokens after prompts | s / 1000 tokens (median) "
        "| vs completion (median of rounds) | vs completion (fastest runs) |",
        "|---|---|---|---|---|---|",
    ]
    ratios = {}
    for name, runs in results.items():
        seconds = statistics.median(s for s, _ in runs)
        paired = zip(cost[name], cost["completion"], strict=True)
        ratios[name] = statistics.median(a / b for a, b in paired)
        fastest = min(cost[name]) / min(cost["completion"])
        lines.append(
            f"| {name} | {seconds:.2f} | {runs[0][1]} | {statistics.median(cost[name]):.2f} "
            f"| {ratios[name]:.2f}x | {fastest:.2f}x |"
        )
    return lines, ratios["episode"]


def run(args: argparse.Namespace) -> str:
    import torch

    model = build_model(args.size)
    args.vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    total = args.turns * args.turn_tokens + (args.turns - 1) * args.reply
    lines = [
        f"# Multi-turn episodes against single completions ({platform.machine()}, "
        f"{torch.get_num_threads()} threads, random {args.size}-shaped model, fp32 on cpu, "
        f"{date.today()})",
        "",
        f"Episodes of {args.turns} turns x {args.turn_tokens} model tokens with replies of "
        f"{args.reply} tokens between them: N = {total} tokens after a {args.prompt}-token "
        f"prompt; the completion is {total} tokens. Load average before: {load()}.",
    ]
    goals = []
    for shape in args.batch:
        count, _, group = shape.partition("x")
        count, group = int(count), int(group or 1)
        prompts = torch.randint(5, args.vocab, (count, args.prompt), generator=generator).tolist()
        results = measure(model, prompts, group, variants(args), args.repeats)
        rows, ratio = table(results, f"{count} prompts x {group} = {count * group} rows")
        lines += rows
        goals.append(f"| {shape} | {ratio:.2f}x | {'yes' if ratio <= GOAL else 'no'} |")
    lines += ["", f"| rows | episode cost vs completion (goal <= {GOAL}x) | met |", "|---|---|---|"]
    lines += goals
    lines += ["", f"Load average after: {load()}."]
    lines += ["", f"Command: `python benchmarks/episode_bench.py {' '.join(sys.argv[1:])}`"]
    return "\n".join(lines) + "\n"


def load() -> str:
    """The 1, 5 and 15 minute load averages: above ~1.5 on two cores, figures are contended."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="smollm2")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--turn-tokens", type=int, default=24)
    parser.add_argument("--reply", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--batch", nargs="+", default=["1", "2x2"], help="rows or PROMPTSxG")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny model, one round, no file")
    parser.add_argument("--name", default="cpu2", help="machine name in the result file")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.repeats, args.turns, args.turn_tokens, args.reply = "tiny", 1, 3, 6, 4
        args.prompt, args.batch = 8, ["1", "2x2"]
    import torch

    torch.set_num_threads(args.threads)
    text = run(args)
    print(text)
    if args.smoke:
        return
    out = ROOT / "benchmarks" / "results" / f"episodes-{args.name}-{date.today()}.md"
    out.write_text(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
