"""The own-task example (configs/own-task.yaml, examples/own-task/): its data loads, its verifier
scores by hand-checked rules, it trains on a tiny model and resumes; a file-source run saves no
reasoning-gym fields; a model without a chat template is told about."""

import json
import logging
from pathlib import Path

import pytest
import yaml

from rlsd.commands.cli import main
from rlsd.commands.export import model_card
from rlsd.engine.checkpoint import check_resumable
from rlsd.engine.data import DataConfig, PromptRenderer, Record, load_records
from rlsd.engine.rewards import build_reward, load_callable
from rlsd.schema.config import FILE_FIELDS, REASONING_GYM_FIELDS, ConfigError, load_config, to_yaml
from rlsd.step.trainer import train

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "own-task.yaml"
VERIFIER = "examples/own-task/verifier.py:score"  # as the config names it: relative to ROOT
METRES = ["m", "metre", "metres", "meter", "meters"]


@pytest.fixture
def at_root(monkeypatch):
    """The example's paths are relative to the repository root, where users run rlsd."""
    monkeypatch.chdir(ROOT)


def own_task(tiny_overrides: dict[str, str], **extra: str) -> dict[str, str]:
    """The tiny model's overrides, keeping the example's data and verifier."""
    overrides = {k: v for k, v in tiny_overrides.items() if k != "reward.verifiers"}
    return {**overrides, **extra}


def saved_data(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["data"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_example_data_loads_with_string_answers_and_extra_fields(at_root):
    cfg = load_config(CONFIG)
    assert cfg.data.source == "file" and cfg.model.name == "smollm2-135m-instruct"
    records = load_records(cfg.data)
    assert len(records) == 46
    first = records[0]
    assert first.prompt == "Convert 3 kilometres to metres."
    assert first.answer == "3000"  # a JSON number, read as a string
    assert first.solution.endswith("Answer: 3000 m")
    assert first.metadata == {"units": METRES}  # every other field, its JSON type kept


@pytest.mark.parametrize(
    ("completion", "reference", "units", "expected"),
    [
        ("1 km is 1000 m, so 3 x 1000 = 3000.\nAnswer: 3000", "3000", METRES, 1.0),
        ("Answer: 3,000 metres.", "3000", METRES, 1.0),
        ("Answer: **3000 m**", "3000", METRES, 1.0),
        ("500 / 1000 = 0.5\nAnswer: .5 litres", "0.5", ["L", "litres"], 1.0),
        ("Answer: 300", "3000", METRES, 0.0),  # wrong number
        ("Answer: 3000 km", "3000", METRES, 0.0),  # a unit the record does not accept
        ("Answer: 3000\nAnswer: 30", "3000", METRES, 0.0),  # the last Answer: line counts
        ("It is 3000 metres.", "3000", METRES, 0.0),  # malformed: no Answer: line
        ("Answer: three thousand", "3000", METRES, 0.0),  # malformed: no number
        ("Answer:", "3000", METRES, 0.0),  # malformed: nothing after the marker
        ("Answer: 3000", "about 3000", METRES, None),  # the reference is no number: unjudged
    ],
)
def test_the_verifier_scores_hand_checked_completions(
    at_root, completion, reference, units, expected
):
    score = load_callable(VERIFIER)
    prompt = "Convert 3 kilometres to metres.\nEnd your reply with ..."
    got = score(
        [prompt], [completion], answer=[reference], solution=[""], metadata=[{"units": units}]
    )
    assert got == [expected]


def test_the_verifier_runs_in_rlsds_workers_and_accepts_every_reference(at_root, capsys):
    cfg = load_config(CONFIG)
    columns = {
        "answer": ["3000", "3000"],
        "solution": ["", ""],
        "metadata": [{"units": METRES}] * 2,
    }
    with build_reward(cfg.reward) as reward_fn:
        assert reward_fn.where() == {VERIFIER: "workers"}
        rewards, correct, metrics_ = reward_fn(
            ["q", "q"], ["Answer: 3000 m", "Answer: 30 m"], columns
        )
    assert rewards == [1.0, 0.0] and correct == [True, False]
    assert metrics_["reward/errors"] == 0 and metrics_["reward/score/mean"] == 0.5
    assert main(["check-reward", str(CONFIG)]) == 0  # the command the README shows
    assert "46 of 46 references accepted" in capsys.readouterr().out


def test_the_example_task_trains_two_steps(at_root, tiny_overrides):
    run_dir = train(load_config(CONFIG, own_task(tiny_overrides)))
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:  # the example's verifier scored every completion, none failed
        assert "reward/score/mean" in row and row["reward/errors"] == 0.0
    assert (run_dir / "checkpoint-2").is_dir()


def test_a_file_run_saves_no_reasoning_gym_fields_and_resumes(at_root, tiny_overrides, capsys):
    # data.size (a reasoning-gym field) is set by the tiny overrides: it must not be saved, and
    # resuming must not trip over it although the saved config now loads it as the default
    overrides = own_task(tiny_overrides)
    assert overrides["data.size"] == "64"
    run_dir = train(load_config(CONFIG, overrides))
    data = saved_data(run_dir)
    assert not set(data) & set(REASONING_GYM_FIELDS), data
    assert data["source"] == "file" and data["path"] == "examples/own-task/conversions.jsonl"
    saved = load_config(run_dir / "config.yaml", saved=True)
    check_resumable(saved, load_config(CONFIG, {**overrides, "data.task": "chain_sum"}), "x")
    with pytest.raises(ConfigError, match="data.path: the run in x used"):
        check_resumable(saved, load_config(CONFIG, {**overrides, "data.path": "other.jsonl"}), "x")
    # the same command with more steps continues the run, and so does --resume RUN_DIR
    assert train(load_config(CONFIG, {**overrides, "train.steps": "3"})) == run_dir
    assert main(["train", "--resume", str(run_dir), "--train.steps", "4"]) == 0
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
    assert not set(saved_data(run_dir)) & set(REASONING_GYM_FIELDS)
    card = model_card(saved, run_dir, run_dir / "checkpoint-4", {"steps": 4})
    assert "records from the file `examples/own-task/conversions.jsonl`" in card
    for word in ("basic_arithmetic", "task_params", "min_terms", "reasoning-gym"):
        assert word not in card, word


def test_each_source_saves_only_its_own_data_fields():
    def data(overrides):
        return yaml.safe_load(to_yaml(load_config(None, overrides)))["data"]

    gym = data({})
    assert gym["task"] == "basic_arithmetic" and not set(gym) & set(FILE_FIELDS)
    mixed = data({"data.mix": "{chain_sum: 1}"})
    assert mixed["mix"] == {"chain_sum": 1} and "task" not in mixed and "task_params" not in mixed
    human = data({"data.source": "humaneval"})
    assert not set(human) & set(REASONING_GYM_FIELDS + FILE_FIELDS)
    assert {"prompt_template", "heldout_size", "seed"} <= set(human)  # these apply to every source
    # a reasoning-gym run still refuses a changed task, and ignores a file field it never used
    saved = load_config(None, {})
    with pytest.raises(ConfigError, match="data.task: the run in x used 'basic_arithmetic'"):
        check_resumable(saved, load_config(None, {"data.task": "chain_sum"}), "x")
    check_resumable(saved, load_config(None, {"data.prompt_column": "question"}), "x")


def test_a_model_without_chat_template_gets_a_one_line_notice(tiny_model_dir, caplog):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger="rlsd.engine.data"):
        PromptRenderer(DataConfig(), tok)
    assert not caplog.records  # the tiny tokenizer has a chat template: nothing to say
    tok.chat_template = None
    with caplog.at_level(logging.WARNING, logger="rlsd.engine.data"):
        renderer = PromptRenderer(DataConfig(system_prompt="Be brief."), tok)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "\n" not in said[0], said
    assert str(tiny_model_dir) in said[0] and "has no chat template" in said[0]
    assert "plain text of data.prompt_template" in said[0]
    assert "data.system_prompt is not used" in said[0]
    record = Record("Convert 3 kilometres to metres.", "3000")
    text = renderer.student_text(record)  # the plain template really is what is used
    assert renderer.student_ids(record) == tok(text, add_special_tokens=True)["input_ids"]
