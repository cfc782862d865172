"""`rlsd sft`: the examples it trains on, its loss against a naive cross-entropy, micro-batches,
exact resume, and its model directory feeding `rlsd train`."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlsd.commands.cli import main
from rlsd.commands.sft import sft, sft_examples, sft_step
from rlsd.engine.data import PromptRenderer, Record
from rlsd.engine.logprobs import TokenScorer
from rlsd.schema.config import DataConfig, load_config

from .conftest import build_tokenizer
from .test_cli import argv
from .test_resume import metrics, weights

CHAIN = {
    "data.task": "chain_sum",
    "data.task_params": "{min_terms: 3, max_terms: 3, min_digits: 1, max_digits: 1}",
    "data.solutions": "worked",
    "data.size": "64",
    "rollout.max_new_tokens": "40",
    "train.eval_items": "4",
    "sft.batch_size": "4",
    "sft.lr": "0.01",
}


def test_examples_leave_out_missing_and_too_long_solutions():
    tok = build_tokenizer()
    renderer = PromptRenderer(DataConfig(), tok)
    records = [
        Record("1 + 2?", "3", "1 + 2 = 3\nAnswer: 3"),
        Record("no", "4"),
        Record("long", "5", "1 + 1 = 2\n" * 30 + "Answer: 5"),
    ]
    examples, skipped = sft_examples(renderer, tok, records, max_tokens=40)
    assert skipped == {"no_solution": 1, "too_long": 1} and len(examples) == 1
    prompt, target = examples[0]
    assert prompt == renderer.student_ids(records[0])
    assert target[-1] == tok.eos_token_id
    assert tok.decode(target[:-1]) == "1 + 2 = 3\nAnswer: 3"


def naive_cross_entropy(lm, batch, pad):
    """Token-mean cross-entropy of the targets after their prompts, from full logits."""
    total, count = 0.0, 0
    for prompt, target in batch:
        ids = torch.tensor([prompt + target])
        logits = lm(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(target).unsqueeze(1))
        total, count = total - logp.sum(), count + len(target)
    return total / count


def test_loss_is_the_token_mean_cross_entropy_and_micro_batches_agree(tiny_model_dir):
    from rlsd.engine.models import load_model
    from rlsd.schema.config import ModelConfig

    tok = build_tokenizer()
    renderer = PromptRenderer(DataConfig(), tok)
    records = [
        Record(f"{i} + {i}?", str(2 * i), f"{i} + {i} = {2 * i}\nAnswer: {2 * i}") for i in range(5)
    ]
    batch, _ = sft_examples(renderer, tok, records, 40)
    grads = []
    for micro in (5, 2):
        lm, tok = load_model(ModelConfig(name=str(tiny_model_dir), lora=False), torch.float64)
        want = naive_cross_entropy(lm, batch, tok.pad_token_id).item()
        scorer = TokenScorer(lm)
        optimizer = torch.optim.SGD(scorer.parameters(), lr=0.0)
        captured = {}
        optimizer.step = lambda c=captured, s=scorer: c.update(
            {n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None}
        )
        got = sft_step(scorer, optimizer, batch, tok.pad_token_id, micro, 0.0, torch.device("cpu"))
        assert got["loss/sft"] == pytest.approx(want, rel=1e-6)  # fp32 log-softmax
        assert got["sft/tokens"] == sum(len(t) for _, t in batch)
        grads.append(captured)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-6, atol=1e-9)


def test_sft_resumes_exactly_and_its_model_trains_with_rlsd(tiny_overrides):
    base = {**tiny_overrides, **CHAIN, "sft.steps": "6", "output.save_every": "2"}
    whole = sft(load_config(None, {**base, "output.run_name": "sft-whole"}))
    rows = metrics(whole)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["loss/sft"] < rows[0]["loss/sft"]  # it learns the worked solutions' format
    part = sft(load_config(None, {**base, "output.run_name": "sft-part", "sft.steps": "3"}))
    shutil.rmtree(part / "checkpoint-3")  # died after step 3's metrics, before its checkpoint
    (part / "latest").write_text("checkpoint-2\n")
    resumed = sft(load_config(None, {**base, "output.run_name": "sft-part"}))
    assert metrics(resumed) == rows
    for name, tensor in weights(whole, 6).items():
        assert torch.equal(tensor, weights(resumed, 6)[name]), name
    result = json.loads((whole / "eval.json").read_text())
    assert result["items"] == 4 and 0.0 <= result["eval/steps_frac"] <= 1.0
    model_dir = whole / "model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    code = main(
        [
            "train",
            *argv(
                {
                    **tiny_overrides,
                    "model.name": str(model_dir),
                    "output.run_name": "after-sft",
                    "train.steps": "1",
                }
            ),
        ]
    )
    assert code == 0


def test_sft_command_refuses_data_without_solutions(tiny_overrides, capsys):
    code = main(["sft", *argv({**tiny_overrides, "sft.steps": "1"})])
    assert code == 2 and "no record has a usable solution" in capsys.readouterr().err
    assert not (Path(tiny_overrides["output.dir"]) / "t" / "model").exists()


def test_an_emptied_sft_config_is_refused_as_such(tiny_overrides):
    """As `rlsd train` does: an sft run whose config.yaml was emptied is not resumed as the
    defaults (it would fail on the checkpoint, or train another run on top of this one)."""
    from rlsd.schema.config import ConfigError

    over = {**tiny_overrides, **CHAIN, "sft.steps": "2", "output.run_name": "sft-empty"}
    run_dir = sft(load_config(None, over))
    (run_dir / "config.yaml").write_text("")
    kept = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(ConfigError, match="config.yaml: holds no settings"):
        sft(load_config(None, over))
    assert sorted(p.name for p in run_dir.iterdir()) == kept  # nothing written or removed
