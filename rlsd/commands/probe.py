"""`rlsd probe CONFIG`: does a teacher context give RLSD anything to work with, before training?

For K held-out prompts the starting model samples 2G completions each: the first G are the
group being judged, the other G stand in for earlier steps (what a memory would hold). Every
completion is scored by the verifier, then, for each candidate context, by the model shown that
context (the live self-teacher). Per context it reports:

- Delta = log P_T(y_t) - log P_S(y_t): mean and std over the tokens of correct and of incorrect
  completions;
- AUC: how well the completion's mean Delta separates correct from incorrect completions (the
  probability that a correct completion's mean Delta exceeds an incorrect one's; 0.5 is none);
- where the most negative Delta of an incorrect completion falls relative to its first wrong
  step (a line "a op b = c" whose arithmetic is wrong), for completions that hold one;
- the share of RLSD weights exp(sign(A) Delta) clipped low and high at `rlsd.eps_w`;
- a one-line verdict (thresholds below are rules of thumb, not tested laws);
- and, for all contexts alike, the shares of groups all correct, all wrong and mixed: only the
  mixed ones carry a gradient, for RLSD as for GRPO.

Candidate contexts: `answer` (the reference answer alone), `solution` (the record's own solution
column), `worked` (a generated worked solution, `data.solutions`), `sibling` (the shortest other
correct completion of the group), `memory` (the shortest correct completion among the other G).
A completion without a context under a candidate is left out of that candidate's statistics.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..algorithms import group_advantages, group_outcomes, token_pieces
from ..algorithms.masking import teacher_gap
from ..engine.context import Context, choose_contexts, sibling_index
from ..engine.rollout import Batch, join, left_pad, sample_completions

CANDIDATES = ("answer", "solution", "worked", "sibling", "memory")
STEP = re.compile(r"(-?\d+)\s*([-+*/x×])\s*(-?\d+)\s*=\s*(-?\d+)")
MIN_PER_CLASS = 5  # completions of each verdict a candidate needs before it gets a verdict


def auc(positive: list[float], negative: list[float]) -> float | None:
    """P(a positive score > a negative one), ties counted half (Mann-Whitney); None if empty."""
    if not positive or not negative:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def first_wrong_step(text: str) -> tuple[int, int] | None:
    """Character span of the first "a op b = c" whose arithmetic is wrong, or None."""
    for match in STEP.finditer(text):
        a, op, b, c = (int(match[1]), match[2], int(match[3]), int(match[4]))
        right = {"+": a + b, "-": a - b, "*": a * b, "x": a * b, "×": a * b}.get(op)
        if op == "/":
            right = a // b if b and a % b == 0 else None
        if right != c:
            return match.start(), match.end()
    return None


def token_of(parts: list[str], char: int) -> int:
    """Index of the token holding character `char` of the joined pieces."""
    end = 0
    for t, part in enumerate(parts):
        end += len(part)
        if end > char:
            return t
    return max(len(parts) - 1, 0)


def wrong_step_hits(
    delta: torch.Tensor, mask: torch.Tensor, pieces: list[list[str]], rows: list[int]
) -> dict[str, float]:
    """For the given (incorrect) rows holding a wrong step: the fraction whose most negative
    Delta falls in or after that step, within it, and the mean offset (tokens) from its start."""
    hits = inside = 0
    offsets = []
    for row in rows:
        span = first_wrong_step("".join(pieces[row]))
        if span is None:
            continue
        start, end = token_of(pieces[row], span[0]), token_of(pieces[row], span[1] - 1)
        values = delta[row].masked_fill(~mask[row], float("inf"))
        worst = int(values.argmin())
        hits += worst >= start
        inside += start <= worst <= end
        offsets.append(worst - start)
    if not offsets:
        return {"wrong_step_rows": 0.0}
    n = len(offsets)
    return {
        "wrong_step_rows": float(n),
        "min_delta_at_or_after_wrong_step": hits / n,
        "min_delta_in_wrong_step": inside / n,
        "min_delta_offset_tokens": sum(offsets) / n,
    }


def context_stats(
    delta: torch.Tensor,
    mask: torch.Tensor,
    correct: torch.Tensor,
    adv: torch.Tensor,
    has: torch.Tensor,
    eps_w: float,
    pieces: list[list[str]],
) -> dict[str, Any]:
    """The statistics of one candidate context over the rows that have one (`has`)."""
    mask = mask.bool() & has.unsqueeze(1)
    out: dict[str, Any] = {"rows": int(has.sum()), "coverage": float(has.float().mean())}
    for name, rows in (("correct", correct & has), ("incorrect", ~correct & has)):
        values = delta[mask & rows.unsqueeze(1)]
        out[f"n_{name}"] = int(rows.sum())
        out[f"delta_mean_{name}"] = values.mean().item() if values.numel() else None
        out[f"delta_std_{name}"] = values.std(unbiased=False).item() if values.numel() else None
    seq = (delta * mask).sum(1) / mask.sum(1).clamp(min=1)  # (N,) mean Delta per completion
    out["auc"] = auc(seq[correct & has].tolist(), seq[~correct & has].tolist())
    signed = mask & (adv != 0).unsqueeze(1)
    raw = torch.exp(torch.sign(adv).unsqueeze(1) * delta)[signed]
    out["clip_low_frac"] = (raw < 1 - eps_w).float().mean().item() if raw.numel() else None
    out["clip_high_frac"] = (raw > 1 + eps_w).float().mean().item() if raw.numel() else None
    wrong = (~correct & has).nonzero().flatten().tolist()
    out.update(wrong_step_hits(delta, mask, pieces, wrong))
    out["verdict"] = verdict(out)
    return out


def verdict(stats: dict[str, Any]) -> str:
    """One line: is there per-token signal in this context?"""
    n_c, n_i, value = stats["n_correct"], stats["n_incorrect"], stats["auc"]
    if n_c < MIN_PER_CLASS or n_i < MIN_PER_CLASS or value is None:
        return (
            f"too few to judge ({n_c} correct, {n_i} incorrect completions with this "
            f"context; need {MIN_PER_CLASS} of each)"
        )
    if value >= 0.65:
        return f"separates correct from incorrect (AUC {value:.2f}): the credit has signal"
    if value >= 0.55:
        return f"weak separation (AUC {value:.2f}): expect a small effect at best"
    if value > 0.45:
        return f"no signal (AUC {value:.2f}): RLSD will act as GRPO plus noise"
    return f"inverted (AUC {value:.2f}): the teacher prefers the wrong completions"


def candidate_contexts(
    kind: str,
    recs: list[Any],
    texts: list[str],
    correct: list[bool],
    lengths: list[int],
    group: int,
    pool: dict[int, list[tuple[str, bool, int]]],
) -> list[Context | None]:
    """The context each judged completion's teacher sees under candidate `kind`."""
    n = len(texts)
    rows = [recs[i // group] for i in range(n)]
    if kind == "answer":
        return [Context("reference", r.answer) for r in rows]
    if kind in ("solution", "worked"):
        texts_of = [r.solution if kind == "solution" else r.metadata.get("worked") for r in rows]
        return [Context("reference", t) if t else None for t in texts_of]
    if kind == "sibling":
        return choose_contexts(
            ["sibling"], [""] * n, [""] * n, texts, correct, lengths, group, None
        )
    out = []  # memory: the shortest correct completion among the prompt's other samples
    for i in range(n):
        earlier = pool[i // group]
        j = sibling_index([ok for _, ok, _ in earlier], [ln for _, _, ln in earlier], -1)
        out.append(None if j is None else Context("memory", earlier[j][0]))
    return out


@torch.no_grad()
def logps_after(
    scorer: Any,
    prompts: list[list[int]],
    batch: Batch,
    pad: int,
    device: Any,
    rows: int,
    share_prefix: bool = False,
) -> torch.Tensor:
    """Log-probs (N, T) of the batch's completions after the given prompts, `rows` at a time;
    with `share_prefix`, rows of a pass with the same prompt run it once (`train.share_prefix`)."""
    out = []
    for s in range(0, len(prompts), rows):
        p_ids, p_mask = left_pad(prompts[s : s + rows], pad)
        part = batch.select(torch.arange(s, min(s + rows, len(prompts))))
        ids, attn = join(p_ids, p_mask, part.completion_ids, part.completion_mask)
        args = (ids.to(device), attn.to(device), part.completion_mask.to(device))
        out.append(scorer(*args, share_prefix=share_prefix).cpu())
    return torch.cat(out)


@dataclass
class Judged:
    """The judged completions of a probe (G per prompt) and the other G of each prompt."""

    batch: Batch  # (K * G, ...) the judged completions
    texts: list[str]
    correct: list[bool]
    lengths: list[int]
    adv: torch.Tensor  # (K * G,) group advantages
    pool: dict[int, list[tuple[str, bool, int]]]  # prompt -> (text, correct, length) of the rest


def sample_groups(
    cfg: Any, lm: Any, tokenizer: Any, renderer: Any, recs: list[Any], device: Any
) -> Judged:
    """2G completions per prompt, scored; the first G of each prompt are the judged ones."""
    from ..engine.models import stop_token_ids
    from ..engine.rewards import build_reward

    group = cfg.rollout.num_generations
    prompts = [renderer.student_ids(r) for r in recs]
    batch = sample_completions(
        lm,
        prompts,
        replace(cfg.rollout, num_generations=2 * group),
        tokenizer.pad_token_id,
        stop_token_ids(lm, tokenizer),
        device,
    )
    texts = tokenizer.batch_decode(
        [i[m].tolist() for i, m in zip(batch.completion_ids, batch.completion_mask)],
        skip_special_tokens=True,
    )
    rows = [r for r in recs for _ in range(2 * group)]
    columns = {
        "answer": [r.answer for r in rows],
        "solution": [r.solution for r in rows],
        "metadata": [r.metadata for r in rows],
    }
    with build_reward(cfg.reward) as reward_fn:  # its worker pool stops when it is done
        rewards, correct, _ = reward_fn([renderer.student_text(r) for r in rows], texts, columns)
        reward_fn.warn_failures()  # one line per verifier that failed
    lengths = batch.completion_mask.sum(1).tolist()
    judged = [i for i in range(len(texts)) if i % (2 * group) < group]
    rest = {p: range(p * 2 * group + group, (p + 1) * 2 * group) for p in range(len(recs))}
    adv, _ = group_advantages(
        torch.tensor([rewards[i] for i in judged], dtype=torch.float32),
        group,
        cfg.algorithm.scale_std,
        cfg.algorithm.adv_eps,
        cfg.algorithm.baseline,
        cfg.algorithm.std,
    )
    return Judged(
        batch.select(torch.tensor(judged)),
        [texts[i] for i in judged],
        [correct[i] for i in judged],
        [lengths[i] for i in judged],
        adv,
        {p: [(texts[i], correct[i], lengths[i]) for i in idx] for p, idx in rest.items()},
    )


def run_probe(cfg: Any, items: int, kinds: list[str], out_dir: Path) -> dict[str, Any]:
    """Sample, score and judge every candidate context; writes probe.json and probe.md."""
    from ..engine.data import PromptRenderer, with_worked_solutions
    from ..engine.logprobs import TokenScorer
    from ..engine.models import load_model, pick_device, pick_dtype
    from ..step.evaluate import eval_items

    device = pick_device(cfg.model)
    lm, tokenizer = load_model(cfg.model, pick_dtype(cfg.model, device))
    lm = lm.to(device).eval()
    recs, source = eval_items(cfg, items)
    if "worked" in kinds and cfg.data.source == "reasoning_gym":
        recs = attach_worked(recs, with_worked_solutions)
    renderer, group = PromptRenderer(cfg.data, tokenizer), cfg.rollout.num_generations
    judged = sample_groups(cfg, lm, tokenizer, renderer, recs, device)
    sub, pad, rows = judged.batch, tokenizer.pad_token_id, cfg.train.micro_batch_size
    scorer = TokenScorer(lm, temperature=cfg.rollout.temperature)
    plain = [renderer.student_ids(recs[i // group]) for i in range(len(judged.texts))]
    share = cfg.train.share_prefix
    student = logps_after(scorer, plain, sub, pad, device, rows, share)
    pieces = token_pieces(tokenizer, sub.completion_ids, sub.completion_mask)
    result: dict[str, Any] = {
        "model": cfg.model.name,
        "items": len(recs),
        "items_from": source,
        "group": group,
        "judged_completions": len(judged.texts),
        "accuracy": sum(judged.correct) / max(len(judged.texts), 1),
        "contexts": {},
    }
    correct = torch.tensor(judged.correct, dtype=torch.bool)
    result["groups"] = group_outcomes(correct, group)
    for kind in kinds:
        contexts = candidate_contexts(
            kind, recs, judged.texts, judged.correct, judged.lengths, group, judged.pool
        )
        has = torch.tensor([c is not None for c in contexts], dtype=torch.bool)
        teacher = student.clone()
        if has.any():
            index = has.nonzero().flatten()
            prompts = [renderer.teacher_ids(recs[int(i) // group], contexts[int(i)]) for i in index]
            teacher[index] = logps_after(
                scorer, prompts, sub.select(index), pad, device, rows, share
            )
        delta = teacher_gap(teacher, student, sub.completion_mask)
        result["contexts"][kind] = context_stats(
            delta, sub.completion_mask, correct, judged.adv, has, cfg.rlsd.eps_w, pieces
        )
    write_probe(result, out_dir)
    return result


def attach_worked(recs: list[Any], with_worked: Any) -> list[Any]:
    """Copies of the records with a generated worked solution in metadata["worked"] (their own
    solution column untouched); records it cannot solve get none."""
    from copy import deepcopy

    from ..schema.config import ConfigError

    copies = deepcopy(recs)
    try:
        solved = with_worked(deepcopy(recs))
    except ConfigError:
        return copies  # the family has no generator: the candidate reports no coverage
    for copy, done in zip(copies, solved):
        copy.metadata["worked"] = done.solution
    return copies


def write_probe(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "probe.json").write_text(json.dumps(result, indent=1))
    (out_dir / "probe.md").write_text(probe_markdown(result))


def groups_line(groups: dict[str, float]) -> str:
    """What the group outcomes leave for any method to learn from."""
    mixed = 100 * groups["mixed"]
    line = (
        f"Groups: {100 * groups['all_correct']:.0f} % all correct, "
        f"{100 * groups['all_wrong']:.0f} % all wrong, {mixed:.0f} % mixed. Only mixed groups "
        "carry a gradient; RLSD's credit scales the advantage, so it reweights tokens in those "
        "only."
    )
    if mixed < 30:
        line += (
            " Few groups learn: more samples per prompt (`rollout.num_generations`) or a "
            "higher `rollout.temperature` gives every method, RLSD included, more to work with."
        )
    return line


def probe_markdown(result: dict[str, Any]) -> str:
    def num(value: Any, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"# rlsd probe: {result['model']}",
        "",
        f"{result['items']} prompts ({result['items_from']}), {result['group']} judged "
        f"completions each; accuracy {100 * result['accuracy']:.1f} %.",
        "",
        groups_line(result["groups"]),
        "",
        "| context | coverage | Delta correct | Delta incorrect | AUC | clipped low / high "
        "| min Delta at/after first wrong step | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, s in result["contexts"].items():
        wrong = (
            f"{num(s.get('min_delta_at_or_after_wrong_step'), 2)} (n={int(s['wrong_step_rows'])})"
            if s["wrong_step_rows"]
            else "-"
        )
        lines.append(
            f"| {kind} | {100 * s['coverage']:.0f} % | {num(s['delta_mean_correct'])} "
            f"± {num(s['delta_std_correct'])} | {num(s['delta_mean_incorrect'])} ± "
            f"{num(s['delta_std_incorrect'])} | {num(s['auc'], 2)} | "
            f"{num(s['clip_low_frac'], 2)} / {num(s['clip_high_frac'], 2)} | {wrong} | "
            f"{s['verdict']} |"
        )
    return "\n".join(lines) + "\n"
