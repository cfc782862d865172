"""`rlsd export`: a plain transformers directory whose log-probs equal the trained model's."""

from pathlib import Path

import pytest
import torch

from rlsd.commands.cli import main
from rlsd.engine.logprobs import naive_logprobs
from rlsd.schema.config import load_config
from rlsd.step.evaluate import load_for_eval
from rlsd.step.trainer import train


def logprobs_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        width = ids.shape[1] - 1
        return naive_logprobs(model, ids, torch.ones_like(ids), torch.ones(1, width))


@pytest.mark.parametrize("lora", ["true", "false"])
def test_exported_model_matches_the_trained_one(tiny_overrides, tmp_path, lora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    overrides = {**tiny_overrides, "model.lora": lora, "train.lr": "0.05"}
    run_dir = train(load_config(None, overrides))
    out = tmp_path / "exported"
    assert main(["export", str(run_dir), "--to", str(out)]) == 0
    trained, _, _ = load_for_eval(
        str(run_dir), load_config(run_dir / "config.yaml"), torch.device("cpu")
    )
    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert not any("lora" in name for name, _ in plain.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = torch.tensor([tokenizer("What is 2 + 3? Answer: 5")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(tiny_overrides["model.name"]).eval()
    exported = logprobs_of(plain, ids)
    assert torch.allclose(exported, logprobs_of(trained, ids), atol=1e-5)
    assert not torch.allclose(exported, logprobs_of(base, ids), atol=1e-4)  # training moved it
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "algorithm:\n  name: rlsd" in card
    assert '"steps": 2' in card and "train_accuracy_last5" in card


def test_export_errors_are_clear(tiny_overrides, tmp_path, capsys):
    run_dir = train(load_config(None, tiny_overrides))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["export", str(run_dir), "--to", str(taken)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (taken / "keep.txt").read_text() == "mine"  # nothing lost
    assert main(["export", str(run_dir), "--to", str(tmp_path / "new"), "--step", "7"]) == 2
    assert "no checkpoint of step 7 (have: checkpoint-2)" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--to", str(tmp_path / "new"), "--step", "2"]) == 0
    assert (tmp_path / "new" / "config.json").is_file()
    assert main(["export", str(Path(tmp_path)), "--to", str(tmp_path / "x")]) == 2
    assert "not a run directory" in capsys.readouterr().err
