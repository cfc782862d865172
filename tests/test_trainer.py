"""Training steps on a tiny model: finite loss, weights move, outputs written, deterministic."""

import json
import math

import pytest
import torch

from rlsd.engine.rollout import Batch
from rlsd.schema.config import load_config
from rlsd.step.records import Rows
from rlsd.step.trainer import setup, train
from rlsd.step.update import policy_update

PERF = ("perf/",)


def trainable(run):
    return {n: p.detach().clone() for n, p in run.scorer.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["grpo", "rlsd", "opsd", "grpo_opsd"])
def test_two_steps_train_and_write_outputs(tiny_overrides, method):
    cfg = load_config(
        None,
        {
            **tiny_overrides,
            "algorithm.name": method,
            "output.run_name": method,
            "output.save_every": "1",
        },
    )
    run_dir = train(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["loss/policy"]) and row["train/skipped_update"] == 0.0
        assert 0 <= row["reward/mean"] <= 1 and row["perf/peak_mem_mb"] > 0
        assert row["perf/peak_mem_scope"] == "run"  # Linux: each run measures its own peak
        assert ("rlsd/weight_mean" in row) == (method == "rlsd")
        assert ("opsd/reverse_kl" in row) == (method in ("opsd", "grpo_opsd"))
        assert ("teacher/kl" in row) == (method != "grpo")
    samples = (run_dir / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 2 * 4  # steps x prompts x generations
    for row in rows:  # the group outcome shares, from the step's own logged completions
        flags = [json.loads(x)["correct"] for x in samples if json.loads(x)["step"] == row["step"]]
        hits = [sum(flags[g : g + 4]) for g in (0, 4)]
        assert row["reward/all_correct_group_frac"] == sum(h == 4 for h in hits) / 2
        assert row["reward/all_wrong_group_frac"] == sum(h == 0 for h in hits) / 2
    if method == "rlsd":  # the teacher moved the credit, within m in [1 - lam eps_w, 1 + ...]
        multipliers = [m for line in samples for m in json.loads(line).get("credit_multiplier", [])]
        assert multipliers and all(0.9 - 1e-4 <= m <= 1.1 + 1e-4 for m in multipliers)
        assert any(abs(m - 1.0) > 1e-3 for m in multipliers)
        assert rows[0]["rlsd/weight_mean"] != 1.0 and rows[0]["rlsd/delta_mean"] != 0.0
    for k in (1, 2):
        ckpt = run_dir / f"checkpoint-{k}"
        assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == k
    assert (run_dir / "latest").read_text().strip() == "checkpoint-2"
    assert "algorithm" in (run_dir / "config.yaml").read_text()


def test_parameters_change_and_loss_is_finite(tiny_overrides):
    from rlsd.step.trainer import train_step

    run = setup(load_config(None, tiny_overrides))
    before = trainable(run)
    metrics = train_step(run, 1)
    after = trainable(run)
    assert math.isfinite(metrics["loss/policy"])
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_same_seed_gives_identical_metrics(tiny_overrides):
    def metrics(name, seed=0):
        cfg = load_config(
            None,
            {
                **tiny_overrides,
                "output.run_name": name,
                "train.steps": "3",
                "train.seed": str(seed),
            },
        )
        path = train(cfg) / "metrics.jsonl"
        return [
            {k: v for k, v in json.loads(line).items() if not k.startswith(PERF)}
            for line in path.read_text().splitlines()
        ]

    first, second = metrics("a"), metrics("b")
    assert first == second
    assert metrics("c", seed=1) != first  # the comparison can fail: another seed differs


def test_micro_batches_give_the_same_gradient_as_one_batch(tiny_overrides):
    """1 x 8 and 8 x 1 micro-batches accumulate the same gradient (token-mean over the step)."""

    def gradient(micro):
        cfg = load_config(
            None,
            {
                **tiny_overrides,
                "train.micro_batch_size": str(micro),
                "output.run_name": f"mb{micro}",
                "algorithm.name": "grpo",
            },
        )
        run = setup(cfg)
        captured = {}
        run.optimizer.step = lambda: captured.update(
            {n: p.grad.clone() for n, p in run.scorer.named_parameters() if p.grad is not None}
        )
        gen = torch.Generator().manual_seed(0)
        c_ids = torch.randint(3, 200, (8, 5), generator=gen)
        c_mask = torch.ones(8, 5, dtype=torch.bool)
        c_mask[3, 2:] = False
        batch = Batch(
            torch.randint(3, 200, (8, 4), generator=gen),
            torch.ones(8, 4, dtype=bool),
            c_ids,
            c_mask,
        )
        adv = torch.randn(8, generator=gen)
        policy_update(run.policy, run.method, run.cfg, 1, Rows(batch, adv), float(c_mask.sum()))
        return captured

    one, eight = gradient(8), gradient(1)
    assert one and one.keys() == eight.keys()
    for name in one:
        torch.testing.assert_close(one[name], eight[name], rtol=1e-4, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in one.values())


@pytest.mark.parametrize("thought_only", ["false", "true"])
def test_credit_is_split_between_reasoning_and_answer(tiny_overrides, monkeypatch, thought_only):
    from rlsd.engine.rollout import completion_mask_from, left_pad
    from rlsd.step import sampling, trainer

    cfg = load_config(
        None,
        {
            **tiny_overrides,
            "rlsd.thought_only": thought_only,
            "output.run_name": f"span{thought_only}",
        },
    )
    run = setup(cfg)
    tok = run.tokenizer
    think = tok("<think>", add_special_tokens=False)["input_ids"]
    close = tok("</think>", add_special_tokens=False)["input_ids"]
    body = tok("12 + 7", add_special_tokens=False)["input_ids"]
    answer = tok("Answer: 19", add_special_tokens=False)["input_ids"]

    def fixed_rollout(run, step, recs, round_=0):
        prompts, _ = left_pad([run.renderer.student_ids(r) for r in recs], tok.pad_token_id)
        rows = [
            think + body[: 1 + i % 3] + close + answer + [tok.eos_token_id]
            for i in range(len(recs) * 4)
        ]
        c_ids, _ = left_pad([r[::-1] for r in rows], tok.pad_token_id)
        c_ids = c_ids.flip(1)  # right-padded
        c_mask = completion_mask_from(c_ids, run.stop_ids)
        p_ids = prompts.repeat_interleave(4, 0)
        return Batch(p_ids, p_ids != tok.pad_token_id, c_ids, c_mask)

    monkeypatch.setattr(sampling, "sample", fixed_rollout)
    metrics = trainer.train_step(run, 1)
    assert "rlsd/multiplier_mean_thought" in metrics and "rlsd/multiplier_mean_answer" in metrics
    # the credit split: every completion ends in "Answer: 19", so both token groups have tokens
    for name in ("answer_tokens", "other_tokens"):
        for stat in ("delta_mean", "delta_std", "clip_high_frac"):
            if stat != "clip_high_frac" or thought_only == "false" or name == "other_tokens":
                assert math.isfinite(metrics[f"rlsd/{stat}_{name}"])
    # under thought_only the answer line is never reweighted, so it has no clip fraction
    assert ("rlsd/clip_low_frac_answer_tokens" in metrics) == (thought_only == "false")
    assert any(f"rlsd/delta_std_{name}" in metrics for name in ("correct", "incorrect"))
    if thought_only == "true":
        assert metrics["rlsd/multiplier_mean_answer"] == 1.0
        assert metrics["rlsd/reweighted_frac"] < 1.0


@pytest.mark.parametrize("lora", ["true", "false"])
def test_gradient_checkpointing_gives_the_same_update(tiny_overrides, tmp_path, lora):
    """Recomputing activations changes memory, not the update: the same weights after 2 steps."""
    from safetensors.torch import load_file

    from rlsd.schema.config import load_config
    from rlsd.step.trainer import train

    name = "adapter_model.safetensors" if lora == "true" else "model.safetensors"
    weights = []
    for flag in ("false", "true"):
        run_dir = train(
            load_config(
                None,
                {
                    **tiny_overrides,
                    "model.lora": lora,
                    "train.gradient_checkpointing": flag,
                    "output.run_name": f"gc-{flag}",
                },
            )
        )
        weights.append(load_file(run_dir / "checkpoint-2" / name))
    run = setup(
        load_config(
            None,
            {
                **tiny_overrides,
                "model.lora": lora,
                "train.gradient_checkpointing": "true",
                "output.run_name": "gc-probe",
            },
        )
    )
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in run.lm.modules())
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "extract,tail", [("marker", "Answer: 19"), ("boxed", "\\boxed{19}."), ("last_number", None)]
)
def test_answer_tokens_cover_the_final_answer(tiny_model_dir, extract, tail):
    """The diagnostics' final-answer tokens, found with the real tokenizer: from the token that
    starts the last answer anchor to the end; none when the extraction has no anchor."""
    from transformers import AutoTokenizer

    from rlsd.algorithms import method_for
    from rlsd.step.diagnostics import completion_spans

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = load_config(None, {"reward.extract": extract})
    texts = ["12 + 7 = 19.\nAnswer: 3\nAnswer: 19", "I think it is 19, so \\boxed{19}."]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows)) + 1
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[i < len(r) for i in range(width)] for r in rows])
    batch = Batch(ids[:, :1], torch.ones(2, 1, dtype=torch.bool), ids, mask)
    _, got, _ = completion_spans(cfg, method_for(cfg), tok, batch)
    if tail is None:
        assert got is None
        return
    row = 0 if extract == "marker" else 1
    assert tok.decode(ids[row][got[row]]).strip() == tail
    assert not got[1 - row].any() and not (got & ~mask).any()
