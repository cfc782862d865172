"""`rlsd` end to end on a tiny model, and its error paths (one line, exit code 2)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlsd.commands.cli import main, split_overrides


def argv(overrides: dict[str, str]) -> list[str]:
    out = []
    for key, value in overrides.items():
        out += [f"--{key}", value]
    return out


def test_train_end_to_end_in_a_subprocess(tiny_overrides, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("algorithm:\n  name: rlsd\nteacher:\n  mode: frozen\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlsd",
            "train",
            str(recipe),
            *argv(tiny_overrides),
            "--train.steps=2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "t"
    assert f"run directory: {run_dir}" in result.stdout
    config = (run_dir / "config.yaml").read_text()
    assert "mode: frozen" in config and "steps: 2" in config
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "rlsd 0.1.0" in capsys.readouterr().out


def test_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in (
        "model.lora",
        "rlsd.lambda",
        "rlsd.eps_w",
        "teacher.mode",
        "train.steps",
        "rollout.num_generations",
        "data.teacher_template",
        "output.save_every",
    ):
        assert key in out


def test_split_overrides():
    rest, over = split_overrides(["train", "x.yaml", "--a.b", "1", "--c.d=e=f", "--debug"])
    assert rest == ["train", "x.yaml", "--debug"] and over == {"a.b": "1", "c.d": "e=f"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.steps", "0"], "train.steps: must be >= 1, got 0"),
        (["--train.stepz", "3"], "train.stepz: unknown field"),
        (["--algorithm.name", "ppo"], "algorithm.name: must be one of grpo, rlsd"),
        (["--model.lora", "maybe"], "model.lora: expected true or false"),
        (["--algorithm.name", "grpo", "--rlsd.lambda", "0.3"], "rlsd.lambda: only applies to"),
        (
            ["--algorithm.name", "grpo", "--teacher.privileged", "false"],
            "teacher.privileged: only applies to a self-teacher",
        ),
        (["--data.task", "no_such_task"], "data.task: unknown reasoning-gym task"),
        (
            ["--data.source", "file", "--data.path", "/nope.jsonl"],
            "/nope.jsonl: data file not found",
        ),
        (["--model.name", "/no/such/model"], "model.name"),
        (["missing.yaml"], "missing.yaml: config file not found"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(args, message, tiny_overrides, capsys):
    overrides = {k: v for k, v in tiny_overrides.items() if f"--{k}" not in args}
    code = main(["train", *args, *argv(overrides)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("rlsd: error: ") and message in err and "\n" not in err


def test_bad_data_row_names_file_and_line(tiny_overrides, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"prompt": "1+1", "answer": "2"}) + "\n" + json.dumps({"prompt": "2+2"}) + "\n"
    )
    code = main(["train", *argv(tiny_overrides), "--data.source", "file", "--data.path", str(data)])
    assert code == 2
    assert f"{data}:2: field 'answer' is missing or empty" in capsys.readouterr().err


def test_debug_shows_the_traceback(tiny_overrides):
    from rlsd.schema.config import ConfigError

    with pytest.raises(ConfigError):
        main(["train", "--debug", *argv(tiny_overrides), "--train.steps", "0"])


@pytest.mark.parametrize("method", ["grpo", "rlsd", "opsd", "grpo_opsd", "opd"])
def test_two_steps_of_every_method_through_the_cli(method, tiny_overrides, tiny_model_dir):
    extra = {"algorithm.name": method, "output.run_name": method}
    if method == "opd":  # the tiny model itself serves as the external teacher
        extra.update({"teacher.mode": "external", "teacher.model": str(tiny_model_dir)})
    assert main(["train", *argv({**tiny_overrides, **extra})]) == 0
    run_dir = tiny_overrides["output.dir"] + f"/{method}"
    rows = [json.loads(x) for x in Path(f"{run_dir}/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["train/skipped_update"] == 0 for r in rows)


def test_tasks_and_help_name_every_source_and_verifier(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {source} " in out for source in ("reasoning_gym", "humaneval", "file"))
    from rlsd.schema.config import help_rows

    verifiers = next(text for key, _, text in help_rows() if key == "reward.verifiers")
    assert "code" in verifiers and "reasoning_gym" in verifiers
