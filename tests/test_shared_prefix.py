"""The shared-prompt layouts: each distinct prompt runs once, either as its own pass whose keys
and values the padded completions reuse (`cache`, rlsd/engine/prefix.py) or with its completions
packed behind it in one row (`packed`, rlsd/engine/packing.py). The log-probs, distributions and
gradients equal those of scoring every row whole (float64, tight tolerance); the teacher pass
shares only identical teacher prompts; training steps match."""

import json

import pytest
import torch

from rlsd.engine.context import Context
from rlsd.engine.logprobs import TokenScorer
from rlsd.engine.models import load_model
from rlsd.engine.prefix import prompt_groups, run_length, supports_shared_prefix
from rlsd.engine.rollout import Batch, completion_mask_from, join, left_pad
from rlsd.schema.config import ModelConfig, load_config
from rlsd.step.trainer import setup, train

EXACT = {"rtol": 1e-10, "atol": 1e-12}  # float64: only reassociation separates the two paths
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]  # unequal: left padding


@pytest.fixture(autouse=True)
def float64_norms(monkeypatch):
    """transformers' Llama RMSNorm computes in float32 whatever the model's dtype, so a float64
    model's gradients carry float32 rounding, and the two paths, which sum a prompt's G
    contributions at different places, would differ by float32 reassociation (~1e-7). Here the
    norm computes in the model's dtype, so what is left is float64 reassociation."""
    from transformers.models.llama import modeling_llama

    def forward(self, hidden):
        scale = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * (hidden * scale)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def grouped_inputs(tokenizer, rows, gen, width=7):
    """Rows of the given prompt indices, completions of unequal lengths: row 0 stops at its
    first token (its only log-prob comes from the last prompt position), one runs full."""
    p_ids, p_mask = left_pad([PROMPTS[i] for i in rows], tokenizer.pad_token_id)
    c_ids = torch.randint(3, 300, (len(rows), width), generator=gen)
    stops = [0, 3, width, 5, 1, 2, width, 4][: len(rows)]
    for row, at in enumerate(stops):
        if at < width:
            c_ids[row, at] = tokenizer.eos_token_id
    c_mask = completion_mask_from(c_ids, [tokenizer.eos_token_id])
    c_ids = c_ids.masked_fill(~c_mask, tokenizer.pad_token_id)
    ids, attn = join(p_ids, p_mask, c_ids, c_mask)
    return ids, attn, c_mask


def packed_width(rows, c_mask):
    """The widest packed row: a prompt's real tokens and all its completions' valid ones."""
    lengths = c_mask.sum(1).tolist()
    return max(len(PROMPTS[p]) + sum(n for r, n in zip(rows, lengths) if r == p) for p in set(rows))


def expected_shapes(layout, rows, ids, c_mask):
    """What the input embedding sees: the prompts then the completions (cache), or one packed
    row per prompt (packed)."""
    count = len(set(rows))  # the prompts ran once each
    if layout == "cache":
        return [(count, ids.shape[1] - c_mask.shape[1]), tuple(c_mask.shape)]
    return [(count, packed_width(rows, c_mask))]


LAYOUTS = pytest.mark.parametrize("layout", ["cache", "packed"])


def embedded_shapes(model):
    """Record the (rows, tokens) of every pass through the input embedding."""
    shapes = []
    embed = model.get_input_embeddings()
    embed.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    return shapes


def float64_model(tiny_model_dir, lora=False):
    cfg = ModelConfig(name=str(tiny_model_dir), lora=lora, lora_r=4)
    model, tokenizer = load_model(cfg, torch.float64)
    if lora:  # B = 0 at start: give the adapter weights so its gradients are not trivial
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return model, tokenizer


def test_prompt_groups_by_hand():
    ids = torch.tensor([[0, 7, 8], [9, 9, 9], [5, 7, 8], [1, 2, 3], [9, 9, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    first, inverse = prompt_groups(ids, mask)  # rows 0 and 2: the same prompt, padded apart
    assert first.tolist() == [0, 1, 3] and inverse.tolist() == [0, 1, 0, 2, 1]
    assert run_length(torch.tensor([0, 0, 1, 1, 2, 2]), 3) == 2
    assert run_length(torch.tensor([0, 1, 0, 1]), 2) == 0  # not consecutive
    assert run_length(torch.tensor([0, 0, 0, 1, 1]), 2) == 0  # unequal groups


@pytest.mark.parametrize(
    "rows",
    [[0, 0, 0, 1, 1, 1, 2, 2], [0, 1, 0, 2, 1, 2], [1, 1, 2, 2]],
    ids=["unequal-groups", "scattered-rows", "equal-runs"],
)
@LAYOUTS
def test_values_and_distributions_equal_the_unshared_path(tiny_model_dir, rows, layout):
    model, tokenizer = float64_model(tiny_model_dir)
    ids, attn, c_mask = grouped_inputs(tokenizer, rows, torch.Generator().manual_seed(0))
    scorer = TokenScorer(model, temperature=0.7, chunk_rows=5)
    scorer.layout = layout
    shapes = embedded_shapes(model)
    with torch.no_grad():
        shared = scorer(ids, attn, c_mask, share_prefix=True)
        assert shapes == expected_shapes(layout, rows, ids, c_mask)
        torch.testing.assert_close(shared, scorer(ids, attn, c_mask), **EXACT)
        for topk in (0, 3):
            plain = scorer.support(ids, attn, c_mask, topk)
            for got, want in zip(scorer.support(ids, attn, c_mask, topk, share_prefix=True), plain):
                torch.testing.assert_close(got, want, **EXACT)
        teacher = scorer.support(ids, attn, c_mask, 3)
        for got, want in zip(
            scorer(ids, attn, c_mask, teacher, share_prefix=True),
            scorer(ids, attn, c_mask, teacher),
        ):
            torch.testing.assert_close(got, want, **EXACT)
    assert (shared[c_mask] < 0).all() and (shared[~c_mask] == 0).all()


def gradients(model, scorer, inputs, share, kl=False):
    model.zero_grad(set_to_none=True)
    ids, attn, c_mask = inputs
    weights = torch.linspace(-1.0, 2.0, c_mask.numel(), dtype=torch.float64).view(c_mask.shape)
    if kl:  # the exact-divergence methods' pass: log-probs and the KL to a teacher's top-k
        with torch.no_grad():
            teacher = scorer.support(ids, attn, c_mask, 4)
        logps, div = scorer(ids, attn, c_mask, teacher, share_prefix=share)
        loss = (logps * weights).sum() + div.sum()
    else:
        loss = (scorer(ids, attn, c_mask, share_prefix=share) * weights).sum()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(shared, plain):
    assert shared.keys() == plain.keys() and plain
    for name in plain:
        torch.testing.assert_close(shared[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)
    assert any(g.abs().sum() > 0 for g in plain.values())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kl", [False, True], ids=["logps", "logps+kl"])
@LAYOUTS
def test_gradients_equal_the_unshared_path(tiny_model_dir, lora, kl, layout):
    model, tokenizer = float64_model(tiny_model_dir, lora)
    scorer = TokenScorer(model, chunk_rows=4).train()
    scorer.layout = layout
    inputs = grouped_inputs(tokenizer, [0, 0, 0, 2, 2, 1, 1, 1], torch.Generator().manual_seed(1))
    plain = gradients(model, scorer, inputs, share=False, kl=kl)
    shared = gradients(model, scorer, inputs, share=True, kl=kl)
    assert_same_gradients(shared, plain)
    if lora:
        assert all("lora_" in n for n in plain)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_composes(tiny_model_dir, lora):
    """Non-reentrant checkpointing (what train.gradient_checkpointing enables) keeps the
    replay-safe cache and gives the same gradients; the reentrant kind, which would drop the
    prefix's gradient, makes the path decline (and the values still match)."""
    model, tokenizer = float64_model(tiny_model_dir, lora)
    scorer = TokenScorer(model).train()
    scorer.layout = "cache"
    inputs = grouped_inputs(tokenizer, [1, 1, 1, 0, 0, 0], torch.Generator().manual_seed(4))
    plain = gradients(model, scorer, inputs, share=False)
    base = model.get_base_model() if lora else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        base.enable_input_require_grads()
    decoder = base.get_decoder()
    assert supports_shared_prefix(decoder)
    shapes = embedded_shapes(model)
    assert_same_gradients(gradients(model, scorer, inputs, share=True), plain)
    assert shapes[:2] == [(2, 6), (6, 7)]  # the shared path ran (the replays embed nothing)
    assert not any("_can_checkpoint_with_cache" in vars(m) for m in decoder.modules())
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert not supports_shared_prefix(decoder)
    assert_same_gradients(gradients(model, scorer, inputs, share=True), plain)


def test_teacher_pass_shares_only_identical_teacher_prompts(tiny_overrides):
    """Reference context: the G rows of a group share one teacher prompt; sibling contexts:
    only rows shown the same sibling do. The teacher's log-probs equal the unshared pass."""
    from rlsd.step.records import Contexts, Rollout
    from rlsd.step.scoring import self_teacher_scores

    run = setup(load_config(None, {**tiny_overrides, "teacher.context": "sibling,reference"}))
    recs, pad = run.records[:2], run.tokenizer.pad_token_id
    p_ids, p_mask = left_pad([run.renderer.student_ids(recs[i // 4]) for i in range(8)], pad)
    c_ids = torch.randint(3, 300, (8, 6), generator=torch.Generator().manual_seed(5))
    c_ids[[0, 3, 5], [2, 4, 1]] = run.tokenizer.eos_token_id
    c_mask = completion_mask_from(c_ids, run.stop_ids)
    batch = Batch(p_ids, p_mask, c_ids.masked_fill(~c_mask, pad), c_mask)
    ref = [Context("reference", r.solution or r.answer) for r in recs]
    contexts = {
        "reference": [ref[i // 4] for i in range(8)],
        "sibling": [Context("sibling", t) for t in ["x = 1", "x = 1", "y", "x = 1"]]
        + [Context("sibling", t) for t in ["a", "b", "c", "a"]],
    }
    distinct = {"reference": [1, 1], "sibling": [2, 3]}  # teacher prompts per pass of 4 rows
    keys = [run.renderer.student_text(recs[i // 4]) for i in range(8)]
    for kind, chosen in contexts.items():
        scores = {}
        for share in ("cache", "packed", False):
            run.cfg.train.share_prefix = bool(share)
            run.scorer.layout = share or "auto"
            shapes = embedded_shapes(run.lm)
            rollout = Rollout(recs, batch, [""] * 8, torch.ones(8), [True] * 8, 4)
            teaching = self_teacher_scores(
                run.scorers, run.method, rollout, list(range(8)), Contexts(chosen, keys)
            )
            scores[share] = teaching.teacher_logps
            if share == "cache":  # a prompt pass, then a completion pass, per pass of 4 rows
                assert [s[0] for s in shapes[::2]] == distinct[kind], kind
            elif share == "packed":  # one packed row per distinct teacher prompt
                assert [s[0] for s in shapes] == distinct[kind], kind
            else:
                assert [s[0] for s in shapes] == [4, 4], kind
        for share in ("cache", "packed"):
            torch.testing.assert_close(scores[share], scores[False], rtol=1e-5, atol=1e-5)


def metrics_of(tiny_overrides, share, extra):
    name = "-".join(f"{k}={v}" for k, v in extra.items()) + f"-{share}"
    cfg = load_config(
        None, {**tiny_overrides, **extra, "train.share_prefix": share, "output.run_name": name}
    )
    lines = (train(cfg) / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith("perf/")} for line in lines
    ]


@pytest.mark.parametrize(
    "extra",
    [
        {"algorithm.name": "rlsd", "teacher.context": "sibling,reference"},
        {"algorithm.name": "grpo", "model.lora": "false", "train.micro_batch_size": "3"},
        {"algorithm.name": "opsd", "opsd.divergence": "topk", "train.ppo_epochs": "2"},
        {"algorithm.name": "grpo", "train.gradient_checkpointing": "true"},
    ],
    ids=["rlsd-sibling", "full-split-groups", "opsd-topk-epochs", "checkpointing"],
)
def test_training_steps_match_with_the_flag_on_and_off(tiny_overrides, extra):
    on, off = metrics_of(tiny_overrides, "true", extra), metrics_of(tiny_overrides, "false", extra)
    assert len(on) == len(off) == 2
    for a, b in zip(on, off):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
            else:
                assert a[key] == b[key], key


@pytest.mark.slow  # a benchmark's smoke run; CI runs it with -m slow
def test_prefix_bench_smoke_times_every_layout(tmp_path):
    import subprocess
    import sys

    from .conftest import TESTS_DIR

    bench = TESTS_DIR.parent / "benchmarks" / "prefix_bench.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = list(tmp_path.glob("prefix-smoke-*.md"))
    rows = [line for line in result.read_text().splitlines() if line.startswith("| teacher")]
    assert len(rows) == 8 and all(float(r.split("|")[2]) > 0 for r in rows)
    assert {r.split(":")[1].split("|")[0].strip() for r in rows} == {
        "unshared",
        "cache",
        "packed",
        "auto",
    }
