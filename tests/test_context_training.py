"""The teacher's context sources in training on the tiny model: sibling and memory contexts
reach the teacher's prompt, completions without one keep uniform credit, the memory is saved
in checkpoints and a resumed run continues exactly, the preflight checks every source."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlsd.engine.data import PromptRenderer, Record
from rlsd.engine.preflight import check_teacher_prompts
from rlsd.schema.config import ConfigError, DataConfig, load_config
from rlsd.step.trainer import train

from .conftest import build_tokenizer
from .test_resume import metrics, weights


def samples_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_sibling_context_is_the_shortest_other_correct_completion(tiny_overrides):
    cfg = load_config(
        None, {**tiny_overrides, "teacher.context": "sibling", "train.steps": "3", "data.size": "8"}
    )
    run_dir = train(cfg)
    rows = metrics(run_dir)
    for row in rows:
        if "teacher/context_sibling_frac" in row:
            both = row["teacher/context_sibling_frac"] + row["teacher/context_none_frac"]
            assert both == pytest.approx(1.0)
    samples = samples_of(run_dir)
    seen = {"sibling": 0, "none": 0}
    for s in samples:
        if "teacher_context_kind" not in s:
            continue  # not trained (its group had equal rewards)
        seen[s["teacher_context_kind"]] += 1
        base = s["index"] - s["index"] % 4
        group = [g for g in samples if g["step"] == s["step"] and base <= g["index"] < base + 4]
        others = [g for g in group if g["correct"] and g["index"] != s["index"]]
        if s["teacher_context_kind"] == "none":
            assert not others  # only when no other member is correct
            assert all(m == 1.0 for m in s["credit_multiplier"])  # uniform credit
            assert "teacher_prompt" not in s
            continue
        best = min(others, key=lambda g: (len(g["token_ids"]), g["index"]))
        assert best["completion"] in s["teacher_prompt"]
        assert "a correct solution written earlier" in s["teacher_prompt"]
    assert seen["sibling"] > 0  # the case happened at all


def test_memory_context_resumes_exactly(tiny_overrides):
    """Two prompts recur every step, so the memory fills; a run stopped after step 2 and
    resumed from its checkpoint ends with the same metrics, weights and memory as one that
    never stopped."""
    base = {
        **tiny_overrides,
        "teacher.context": "memory,reference",
        "data.size": "2",
        "train.steps": "4",
        "output.save_every": "2",
    }
    whole = train(load_config(None, {**base, "output.run_name": "whole"}))
    part = train(load_config(None, {**base, "output.run_name": "part", "train.steps": "3"}))
    shutil.rmtree(part / "checkpoint-3")
    (part / "latest").write_text("checkpoint-2\n")
    resumed = train(load_config(None, {**base, "output.run_name": "part"}))
    assert metrics(resumed) == metrics(whole)
    for name, tensor in weights(whole, 4).items():
        assert torch.equal(tensor, weights(resumed, 4)[name]), name
    states = [
        json.loads((d / "checkpoint-4" / "trainer_state.json").read_text())
        for d in (whole, resumed)
    ]
    assert states[0]["context_memory"] == states[1]["context_memory"]
    assert states[0]["context_memory"], "the memory was used"
    rows = metrics(whole)
    assert rows[-1]["memory/size"] >= 1 and any(r.get("memory/hit_frac", 0) > 0 for r in rows)
    remembered = [s for s in samples_of(whole) if s.get("teacher_context_kind") == "memory"]
    assert remembered and all(
        "a correct solution written earlier" in s["teacher_prompt"] for s in remembered
    )
    every = samples_of(whole)
    for s in remembered:  # the shown text is an earlier step's correct completion of the prompt
        shown = s["teacher_prompt"].split("written earlier:\n", 1)[1].split("\n\nAfter ", 1)[0]
        assert any(
            e["correct"]
            and e["step"] < s["step"]
            and e["prompt"] == s["prompt"]
            and e["completion"] == shown
            for e in every
        ), shown


def test_preflight_checks_every_context_source():
    tok = build_tokenizer()
    rec = Record("Calculate 2 + 3.", "5")
    old_style = PromptRenderer(
        DataConfig(teacher_template="{{ prompt }}\nReference: {{ solution or answer }}"), tok
    )
    check_teacher_prompts(old_style, tok, [rec])  # a template of its own works for the reference
    with pytest.raises(ConfigError, match="teacher.context sibling: the teacher's prompt does not"):
        check_teacher_prompts(old_style, tok, [rec], sources=["sibling", "reference"])
    default = PromptRenderer(DataConfig(), tok)
    check_teacher_prompts(default, tok, [rec], sources=["sibling", "memory", "reference"])


def test_context_options_are_checked():
    with pytest.raises(ConfigError, match="teacher.context: only applies to a self-teacher"):
        load_config(None, {"algorithm.name": "grpo", "teacher.context": "sibling"})
    with pytest.raises(ConfigError, match="needs a context for every completion"):
        load_config(
            None,
            {"algorithm.name": "opsd", "opsd.divergence": "full", "teacher.context": "sibling"},
        )
    load_config(None, {"algorithm.name": "opsd", "teacher.context": "sibling"})  # SDPO-style
    with pytest.raises(ConfigError, match="must list each of"):
        load_config(None, {"teacher.context": "sibling,sibling"})


def test_default_template_renders_the_reference_exactly_as_before():
    """The new default template with the reference context gives the old prompt, character for
    character, so runs that use the reference see what they always saw."""
    tok = build_tokenizer()
    rec = Record("Calculate 2 + 3.", "5", solution="2 + 3 = 5")
    old = (
        "{{ prompt }}\n\nHere is a reference solution:\n{{ solution or answer }}\n\n"
        "After understanding the reference solution, solve the problem in your own way.\n"
        "End your reply with a final line of the form 'Answer: <answer>'."
    )
    assert PromptRenderer(DataConfig(), tok).teacher_text(rec) == PromptRenderer(
        DataConfig(teacher_template=old), tok
    ).teacher_text(rec)
