"""No silent GRPO and one home for each method: the preflight covers every record, a
thought_only run without reasoning spans warns and stops, the credit is computed once a step,
and the pure functions depend on nothing above them."""

import json
import logging
from pathlib import Path

import pytest
import torch

from rlsd.algorithms import METHODS, method_for
from rlsd.algorithms.method import RLSD
from rlsd.engine.data import PromptRenderer, Record
from rlsd.engine.preflight import ALIGNMENT_SAMPLE, check_teacher_prompts
from rlsd.schema.config import ConfigError, DataConfig, load_config
from rlsd.step.trainer import TrainingStopped, Watch, setup, train, train_step

from .conftest import build_tokenizer

ROOT = Path(__file__).parent.parent


def test_preflight_checks_every_record_not_only_the_first_ones():
    """A template that shows the solution only when present, on a file whose record past the
    token-alignment sample lacks one: that record would silently train as GRPO."""
    tok = build_tokenizer()
    template = "{{ prompt }}{% if solution %}\nReference: {{ solution }}{% endif %}"
    renderer = PromptRenderer(
        DataConfig(teacher_template=template, prompt_template="{{ prompt }}"), tok
    )
    records = [
        Record(f"What is {i} + 1?", str(i + 1), solution=f"{i} + 1 = {i + 1}")
        for i in range(ALIGNMENT_SAMPLE + 3)
    ]
    check_teacher_prompts(renderer, tok, records)
    records[ALIGNMENT_SAMPLE + 1] = Record("What is 9 + 9?", "18")  # no solution
    with pytest.raises(ConfigError, match=f"record {ALIGNMENT_SAMPLE + 1} .*'What is 9 \\+ 9"):
        check_teacher_prompts(renderer, tok, records)
    check_teacher_prompts(renderer, tok, records, privileged=False)  # a declared control


def test_watch_warns_once_and_stops_after_the_configured_spanless_steps(caplog):
    cfg = load_config(None, {"rlsd.thought_only": "true", "rlsd.max_spanless_steps": "3"})
    watch = Watch(cfg, method_for(cfg))
    with caplog.at_level(logging.WARNING, logger="rlsd.step.progress"):
        assert watch.stop_reason(1, {"rlsd/span_frac": 0.0}) is None
        assert watch.stop_reason(2, {"rlsd/span_frac": 0.5}) is None  # a span resets the count
        assert watch.stop_reason(3, {"rlsd/span_frac": 0.0}) is None
        assert watch.stop_reason(4, {"rlsd/span_frac": 0.0}) is None
        reason = watch.stop_reason(5, {"rlsd/span_frac": 0.0})
    assert reason is not None and "3 consecutive steps" in reason[0] and "'<think>'" in reason[0]
    warnings = [r for r in caplog.records if "no completion opens a reasoning span" in r.message]
    assert len(warnings) == 1 and "step 1" in warnings[0].getMessage()
    never = load_config(None, {"rlsd.thought_only": "true", "rlsd.max_spanless_steps": "0"})
    watch = Watch(never, method_for(never))
    assert all(watch.stop_reason(s, {"rlsd/span_frac": 0.0}) is None for s in range(1, 30))
    plain = load_config(None, {})  # without thought_only a missing span is no problem
    assert Watch(plain, method_for(plain)).stop_reason(1, {"rlsd/span_frac": 0.0}) is None


def test_thought_only_run_without_spans_stops_with_a_checkpoint(tiny_overrides):
    cfg = load_config(
        None,
        {
            **tiny_overrides,
            "rlsd.thought_only": "true",
            "rlsd.max_spanless_steps": "2",
            "train.steps": "5",
            "output.save_every": "0",
        },
    )
    with pytest.raises(TrainingStopped, match="2 consecutive steps in which no completion") as e:
        train(cfg)
    assert e.value.exit_code == 1
    run_dir = Path(cfg.output.dir) / cfg.output.run_name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["rlsd/span_frac"] == 0.0
    assert (run_dir / "checkpoint-2").is_dir()


def test_the_credit_is_computed_once_per_micro_batch(tiny_overrides, monkeypatch):
    """Once a step (per micro-batch), not again for the diagnostics, and the diagnostics and
    the logged samples use exactly the credit the loss used."""
    calls, used = [], []
    real = RLSD.token_advantages

    def counted(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(out.shape[0])
        used.append(out.detach().clone())
        return out

    monkeypatch.setattr(RLSD, "token_advantages", counted)
    run = setup(load_config(None, {**tiny_overrides, "train.micro_batch_size": "3"}))
    metrics = train_step(run, 1)
    trained = round(8 * (1 - metrics["adv/zero_group_frac"]))
    assert trained > 0  # the tiny model's lengths vary: some group carries a gradient
    want = [3] * (trained // 3) + ([trained % 3] if trained % 3 else [])
    assert calls == want  # the trained rows in micro-batches of 3, nothing more
    assert metrics["rlsd/weight_mean"] != 1.0
    run.samples.close()
    samples = [
        json.loads(line) for line in (run.run_dir / "samples.jsonl").read_text().splitlines()
    ]
    credit = torch.cat(used)
    logged = [s for s in samples if "token_advantage" in s]
    assert len(logged) == trained
    for row, sample in enumerate(logged):
        n = len(sample["token_ids"])
        torch.testing.assert_close(
            torch.tensor(sample["token_advantage"]), credit[row, :n], atol=1e-5, rtol=0
        )


def test_each_method_is_declared_once():
    assert set(METHODS) == {"grpo", "rlsd", "opsd", "grpo_opsd", "opd"}
    teachers = {name: kind.teacher for name, kind in METHODS.items()}
    assert teachers == {
        "grpo": None,
        "rlsd": "privileged",
        "opsd": "privileged",
        "grpo_opsd": "privileged",
        "opd": "plain",
    }
    assert [n for n, k in METHODS.items() if k.dense] == ["opsd", "grpo_opsd", "opd"]
    for path in (
        "rlsd/step/trainer.py",
        "rlsd/step/update.py",
        "rlsd/step/run.py",
        "rlsd/step/diagnostics.py",
    ):
        source = (ROOT / path).read_text()
        assert "algorithm.name ==" not in source and "algorithm.name in" not in source, path


def imports_of(path: Path) -> set[str]:
    """The rlsd modules a file imports (relative imports resolved)."""
    from benchmarks.reading_cost import imported_modules

    return imported_modules(path, ROOT)


def test_the_pure_functions_depend_on_nothing_above_them():
    for path in sorted((ROOT / "rlsd" / "algorithms").glob("*.py")):
        outside = {m for m in imports_of(path) if not m.startswith("rlsd.algorithms")}
        assert not outside, f"{path.name} imports {outside}"
    study = ROOT / "rlsd" / "commands" / "study.py"
    assert "rlsd.commands.cli" not in imports_of(study)
    assert imports_of(study)  # the check sees its imports at all


@pytest.mark.parametrize("study_file", ["configs/study-arith.yaml", "configs/study-gpu.yaml"])
def test_the_committed_study_runs_still_resume_under_their_study_file(study_file):
    """The defaults changed (unbiased std, dual clip): every committed run's saved config, read
    with the old defaults for the fields it lacks, equals what its study file now builds, so
    rerunning the study skips or resumes those runs and computes exactly what they computed."""
    from rlsd.commands.study import grid, load_study, run_dir
    from rlsd.engine.checkpoint import check_resumable

    study = load_study(ROOT / study_file)
    checked = 0
    for cell in grid(study):
        saved = ROOT / run_dir(study, cell) / "config.yaml"
        if not saved.is_file():
            continue
        old = load_config(saved, saved=True)
        assert old.algorithm.std == "population" and old.algorithm.dual_clip == 0.0
        new = load_config(ROOT / study.base, cell.overrides)
        check_resumable(old, new, str(saved.parent))
        checked += 1
    assert checked >= 5


def test_a_saved_config_written_before_a_default_changed_keeps_the_old_behaviour(tmp_path):
    from rlsd.schema.config import to_yaml

    cfg = load_config(None, {})
    text = to_yaml(cfg).replace("  std: unbiased\n", "").replace("  dual_clip: 3.0\n", "")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(path).algorithm.std == "unbiased"  # a recipe gets today's defaults
    old = load_config(path, saved=True)  # a run directory's config: what the run computed
    assert old.algorithm.std == "population" and old.algorithm.dual_clip == 0.0
    path.write_text(to_yaml(cfg))
    assert load_config(path, saved=True).algorithm.std == "unbiased"  # written down: kept


@pytest.mark.parametrize(
    "study_file", sorted(p.name for p in (ROOT / "configs").glob("study-*.yaml"))
)
def test_every_run_of_a_committed_study_file_builds_a_valid_config(study_file):
    """A typo in an arm or ablation (an unknown field, a bad value) would stop a study hours in,
    when that run starts: every cell's overrides must build a config now."""
    from rlsd.commands.study import grid, load_study

    study = load_study(ROOT / "configs" / study_file)
    cells = grid(study)
    assert cells
    for cell in cells:
        cfg = load_config(ROOT / study.base, cell.overrides)
        assert cfg.train.steps == study.steps, cell


def test_the_step_records_are_frozen():
    """The step's data is returned, never filled in place: every record is immutable."""
    import dataclasses

    from rlsd.step import records

    kinds = [records.Rollout, records.Credit, records.Contexts, records.Teaching]
    kinds += [records.Rows, records.Update]
    for kind in kinds:
        assert dataclasses.is_dataclass(kind) and kind.__dataclass_params__.frozen, kind
    ids, mask = torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool)
    rows = records.Rows(
        records.Batch(ids[:, :3], mask[:, :3], ids, mask), torch.tensor([1.0, -1.0])
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        rows.token_adv = torch.zeros(2, 4)
    picked = rows.select(torch.tensor([1]))
    assert picked.adv.tolist() == [-1.0] and rows.adv.tolist() == [1.0, -1.0]  # a new record
    assert rows.cut(2).batch.completion_mask.shape == (2, 2)


def test_nothing_below_the_recipe_takes_the_whole_run():
    """Below `trainer.py`, functions take what they use (typed records, the policy, the
    scorers, the method, the config), never an untyped `run` whose fields no import shows."""
    from benchmarks.reading_cost import untyped_run_parameters

    below = [p for p in (ROOT / "rlsd").rglob("*.py") if p.name != "trainer.py"]
    found = [name for path in below for name in untyped_run_parameters(path)]
    assert found == []
    probe = ROOT / "rlsd" / "step" / "trainer.py"
    assert untyped_run_parameters(probe) == []  # the recipe's Run is typed, not Any
