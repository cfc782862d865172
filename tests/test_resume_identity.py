"""The run directory is the run's identity: a run resumes by any spelling of its path, from any
working directory, moved or copied; a generated name starts a new run and says how to resume it;
the resume command printed after SIGTERM works when pasted as it is."""

import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlsd.commands.cli import main

from .test_cli import argv
from .test_resume import _wait_for_lines, metrics


def steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in metrics(run_dir)]


def saved_output(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["output"]


def test_a_named_run_resumes_by_every_spelling_of_its_path(tiny_overrides, tmp_path, monkeypatch):
    assert main(["train", *argv(tiny_overrides)]) == 0  # runs/t, output.dir absolute
    run_dir = tmp_path / "runs" / "t"
    (tmp_path / "elsewhere").mkdir()
    spellings = [
        (tmp_path, "runs/t"),  # relative, from its parent's parent
        (tmp_path, "./runs/t/"),
        (tmp_path / "elsewhere", str(run_dir)),  # absolute, from another directory
        (tmp_path / "elsewhere", "../runs/t"),  # relative, from another directory
        (run_dir, "."),  # from inside the run directory
    ]
    for n, (cwd, spelling) in enumerate(spellings, 3):
        monkeypatch.chdir(cwd)
        code = main(["train", "--resume", spelling, "--train.steps", str(n)])
        assert code == 0, spelling
        assert steps(run_dir) == list(range(1, n + 1)), spelling
    assert (run_dir / "latest").read_text().strip() == "checkpoint-7"
    assert saved_output(run_dir)["run_name"] == "t"


def test_a_moved_and_a_copied_run_continue_exactly(tiny_overrides, tmp_path, monkeypatch, capsys):
    base = {**tiny_overrides, "train.steps": "4", "output.save_every": "1"}
    assert main(["train", *argv({**base, "output.run_name": "whole"})]) == 0
    assert main(["train", *argv({**base, "output.run_name": "part", "train.steps": "2"})]) == 0
    runs = tmp_path / "runs"
    copied = tmp_path / "backup" / "copy-of-part"
    shutil.copytree(runs / "part", copied)
    moved = tmp_path / "archive" / "renamed"
    moved.parent.mkdir()
    shutil.move(runs / "part", moved)
    monkeypatch.chdir(tmp_path / "archive")
    assert main(["train", "--resume", "renamed", "--train.steps", "4"]) == 0
    assert main(["train", "--resume", str(copied), "--train.steps", "4"]) == 0
    want = metrics(runs / "whole")
    assert metrics(moved) == want and metrics(copied) == want  # as if never interrupted
    assert saved_output(moved) == {**saved_output(moved), "dir": ".", "run_name": "renamed"}
    assert saved_output(copied)["dir"] == str(copied.parent)
    # the directory names the run: --resume cannot be pointed elsewhere by an override
    capsys.readouterr()
    assert main(["train", "--resume", str(copied), "--output.run_name", "x"]) == 2
    assert "--output.run_name: --resume RUN_DIR names the run directory" in capsys.readouterr().err
    # its location is not compared, but what the run computes still is
    assert main(["train", "--resume", str(copied), "--train.lr", "0.02"]) == 2
    err = capsys.readouterr().err
    assert f"train.lr: the run in {copied} used 0.01, now 0.02" in err


def test_a_generated_name_starts_a_new_run_and_says_how_to_resume_it(
    tiny_overrides, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    overrides = {**tiny_overrides, "output.dir": "runs", "output.run_name": ""}
    assert main(["train", *argv(overrides)]) == 0
    err = capsys.readouterr().err
    hint = re.search(r"to continue this one: (rlsd train --resume \S+)", err)
    assert hint and "the same command again starts another run" in err
    first = Path(hint.group(1).split()[-1])
    assert first.parent == Path("runs") and first.name.startswith("rlsd-basic_arithmetic-")
    assert saved_output(first)["run_name"] == first.name  # where the run is, for the record
    # the same command again: a new run at step 1, in another directory (same second or not)
    assert main(["train", *argv(overrides)]) == 0
    second = Path(
        re.search(r"to continue this one: rlsd train --resume (\S+)", capsys.readouterr().err)[1]
    )
    assert second != first and steps(second) == [1, 2] and steps(first) == [1, 2]
    # the printed command, as printed, continues the first run
    command = shlex.split(hint.group(1))
    assert command[:2] == ["rlsd", "train"]
    assert main([*command[1:], "--train.steps", "3"]) == 0
    assert steps(first) == [1, 2, 3] and steps(second) == [1, 2]
    assert "new run" not in capsys.readouterr().err  # a resumed run is no new one


@pytest.mark.slow  # ~35 s of subprocesses; CI runs it with -m slow
def test_the_resume_command_printed_after_sigterm_works_verbatim(tiny_overrides, tmp_path):
    """An auto-named run in a relative output directory, stopped by SIGTERM: the command in
    the message, pasted into a shell in the same directory, finishes the run."""
    overrides = {**tiny_overrides, "output.dir": "runs", "output.run_name": ""}
    rlsd = [sys.executable, "-m", "rlsd"]
    proc = subprocess.Popen(
        [*rlsd, "train", *argv(overrides), "--train.steps", "40", "--output.save_every", "1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    runs = tmp_path / "runs"
    deadline = time.time() + 120
    found: list[Path] = []
    while not found and proc.poll() is None and time.time() < deadline:
        found = list(runs.glob("*/metrics.jsonl")) if runs.is_dir() else []
        time.sleep(0.05)  # the run directory appears once start-up is done
    assert found, proc.communicate()[1]
    _wait_for_lines(found[0], 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    hint = re.search(r"resume with: (.+)$", err, re.MULTILINE)
    assert hint, err
    command = shlex.split(hint.group(1))
    assert command[0] == "rlsd"
    result = subprocess.run(
        [*rlsd, *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    run_dir = found[0].parent
    assert steps(run_dir) == list(range(1, 41))
    assert f"run directory: {run_dir.relative_to(tmp_path)}" in result.stdout
