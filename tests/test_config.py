"""Config: YAML + overrides, typed coercion, validation naming the field, the quick start."""

from pathlib import Path

import pytest

from rlsd.schema.config import Config, ConfigError, load_config, to_dict

ROOT = Path(__file__).parent.parent


def test_quickstart_recipe_is_the_default():
    assert to_dict(load_config(ROOT / "configs" / "quickstart.yaml")) == to_dict(Config())
    import yaml

    spelled = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    defaults = to_dict(Config())
    for section, fields in spelled.items():  # only a newcomer's fields, each a real one
        assert set(fields) <= set(defaults[section]), section
    assert sum(len(f) for f in spelled.values()) <= 25


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n  lr: 3e-5\nrlsd:\n  lambda: 0.25\n")
    cfg = load_config(
        path,
        {
            "train.steps": "9",
            "model.lora_target_modules": "q_proj,v_proj",
            "data.task_params": "{min_terms: 3}",
        },
    )
    assert cfg.train.steps == 9 and cfg.train.lr == 3e-5 and cfg.rlsd.lambda_ == 0.25
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.data.task_params == {"min_terms": 3}
    assert to_dict(cfg)["rlsd"]["lambda"] == 0.25


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("train: 3\n", "train: expected a mapping"),
        ("trian:\n  steps: 3\n", "trian.steps: unknown key"),
        ("train:\n  steps: three\n", "train.steps: expected an integer"),
        ("rlsd:\n  eps_w: 1.5\n", "rlsd.eps_w: must be <= 1"),
        ("- a\n", "the top level must be a mapping"),
        ("a: [\n", "not valid YAML"),
        ("train:\n  lr: .nan\n", "train.lr: expected a finite number"),
        ("train:\n  lr: NaN\n", "train.lr: expected a finite number"),
    ],
)
def test_bad_yaml_names_file_and_field(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert message in str(exc.value) and str(path) in str(exc.value)


def test_bad_combinations_are_refused():
    with pytest.raises(ConfigError, match="data.path: required"):
        load_config(None, {"data.source": "file"})
    with pytest.raises(ConfigError, match="reward.weights: 2 weights for 1 verifiers"):
        load_config(None, {"reward.weights": "[1, 2]"})
    with pytest.raises(ConfigError, match="teacher.mode: GRPO uses no teacher"):
        load_config(None, {"algorithm.name": "grpo", "teacher.mode": "frozen"})


@pytest.mark.parametrize("method", ["grpo", "rlsd", "opsd", "grpo_opsd"])
def test_saved_config_reloads_to_the_same_config(tmp_path, method):
    from rlsd.schema.config import to_yaml

    cfg = load_config(None, {"algorithm.name": method, "train.lr": "3e-5"})
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert to_dict(load_config(path)) == to_dict(cfg)


def test_restating_a_default_is_not_refused():
    cfg = load_config(
        None, {"algorithm.name": "grpo", "rlsd.lambda": "0.5", "teacher.mode": "live"}
    )
    assert cfg.algorithm.name == "grpo" and cfg.rlsd.lambda_ == 0.5
    assert set(cfg.explicit) == {"algorithm.name", "rlsd.lambda", "teacher.mode"}


@pytest.mark.parametrize("content", ["", "\n  \n", "# nothing\n", "{}\n"])
def test_an_emptied_run_config_is_reported_as_such_not_as_a_checkpoint_problem(
    tmp_path, capsys, content
):
    """A run directory whose config.yaml was emptied (a full disk, an editor) while its
    checkpoints are there: resuming it, by --resume or by the run's own command, names the
    file and says what happened; its checkpoints and logs are left as they were."""
    from rlsd.commands.cli import main

    run_dir = tmp_path / "runs" / "t"
    (run_dir / "checkpoint-2").mkdir(parents=True)
    (run_dir / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2}')
    (run_dir / "latest").write_text("checkpoint-2\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (run_dir / "config.yaml").write_text(content)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    same_command = ["--output.dir", str(tmp_path / "runs"), "--output.run_name", "t"]
    for command in (["train", "--resume", str(run_dir)], ["train", *same_command]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert f"{run_dir / 'config.yaml'}: holds no settings" in err, err
        assert "checkpoint" not in err.split("holds no settings")[1] and "\n" not in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.lr", "1e300", "train.lr: must be <= 1, got 1e+300"),
        ("train.lr", "5", "train.lr: must be <= 1, got 5.0"),
        ("sft.lr", "2", "sft.lr: must be <= 1, got 2.0"),
        ("train.steps", "1e30", "train.steps: must be <= 1e+09, got 1e+30"),
        ("rollout.max_new_tokens", "1e12", "rollout.max_new_tokens: must be <= 1e+09"),
        ("reward.timeout", "1e300", "reward.timeout: must be <= 1e+09"),
        ("reward.none_value", "-1e300", "reward.none_value: must be >= -1e+09"),
    ],
)
def test_absurd_values_are_refused_naming_the_field(key, value, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, {key: value})
    assert str(exc.value).startswith(f"command line: {message}")


def test_every_committed_config_and_study_cell_is_within_the_bounds():
    from rlsd.commands.study import grid, load_study

    loaded = []  # load_config raises ConfigError on a value out of bounds
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if not path.name.startswith("study-"):
            loaded.append(load_config(path))
            continue
        study = load_study(path)
        loaded += [load_config(study.base, cell.overrides) for cell in grid(study)]
    assert len(loaded) > 20 and all(cfg.train.lr <= 1 for cfg in loaded)


def test_a_step_timeout_below_the_completion_timeout_is_refused():
    with pytest.raises(ConfigError, match="reward.step_timeout: 5.0 s must be 0 .* or at least"):
        load_config(None, {"reward.step_timeout": "5"})
    assert load_config(None, {"reward.step_timeout": "10"}).reward.step_timeout == 10.0
