"""Verifier exceptions reported as exceptions: `rlsd check-reward` counts the references a
verifier raised on apart from those it scored below 1 (a format problem), and training logs one
summary line per step and verifier, never one per completion."""

import logging

from rlsd.commands.cli import main
from rlsd.engine.data import load_records
from rlsd.engine.rewards import build_reward
from rlsd.schema.config import RewardConfig, load_config

from .conftest import TESTS_DIR

ALWAYS = """
def grade(prompts, completions, **kwargs):
    return [1.0 if kwargs["answers"][0] in c else 0.0 for c in completions]
"""
# raises on negative answers, rejects odd ones, accepts the rest
SOMETIMES = """
def grade(prompts, completions, answer, **kwargs):
    if answer[0].startswith("-"):
        raise ValueError(f"cannot grade {answer[0]}")
    return [0.0 if int(answer[0]) % 2 else 1.0]
"""


def check(tmp_path, code: str, capsys, limit: int = 20) -> tuple[int, str, str]:
    verifier = tmp_path / "verifier.py"
    verifier.write_text(code)
    rc = main(["check-reward", "--limit", str(limit), "--reward.verifiers", f"{verifier}:grade"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_check_reward_reports_an_always_raising_verifier_as_an_exception(tmp_path, capsys):
    rc, out, err = check(tmp_path, ALWAYS, capsys)
    first = load_records(load_config(None, {}).data)[0]
    assert rc == 1
    assert (
        "verifier grade raised on 20 of 20 references: KeyError: 'answers' "
        f"(first: reference 1, record {first.prompt!r}" in out
    )
    assert "raised on 20 (an exception in the verifier, not an answer-format problem" in err
    assert "reward.extract" not in err and "rejected: answer" not in out  # not the format
    assert "scored below 1" not in out and "ran out of time" not in out


def test_check_reward_separates_raised_from_rejected_references(tmp_path, capsys):
    rc, out, err = check(tmp_path, SOMETIMES, capsys)
    answers = [r.answer for r in load_records(load_config(None, {}).data)[:20]]
    negative = [i for i, a in enumerate(answers) if a.startswith("-")]
    odd = [a for a in answers if not a.startswith("-") and int(a) % 2]
    assert negative and odd  # the data set gives both kinds
    assert rc == 1
    assert (
        f"verifier grade raised on {len(negative)} of 20 references: ValueError: cannot grade "
        f"{answers[negative[0]]} (first: reference {negative[0] + 1}, record " in out
    )
    assert f"scored below 1 or not judged: {len(odd)} of 20 references" in out
    rejected = [line for line in out.splitlines() if "rejected: answer" in line]
    assert rejected[0] == f"  rejected: answer {odd[0]!r} written as 'Answer: {odd[0]}'"
    assert all("-" not in line.split("written")[0] for line in rejected)  # no raised one
    assert f"grade raised on {len(negative)} (an exception" in err
    assert f"{len(odd)} scored below 1 or not judged (check reward.extract" in err


def test_failures_are_kept_per_verifier_in_threads_and_workers():
    crashing = f"{TESTS_DIR / 'rewards_for_tests.py'}:crashing_reward"
    for in_process in (True, False):
        reward_fn = build_reward(RewardConfig(verifiers=[crashing], custom_in_process=in_process))
        try:
            reward_fn(["Add 1 and 2", "Add 3 and 4"], ["3", "7"], {"answer": ["3", "7"]})
            [failed] = reward_fn.failures
            assert failed.total == 2 and failed.errors == [
                (0, "RuntimeError: verifier bug"),
                (1, "RuntimeError: verifier bug"),
            ]
            assert reward_fn.last_error == (
                "verifier crashing_reward raised on 2 of 2 completions: RuntimeError: verifier "
                "bug (first: completion 1, record 'Add 1 and 2' (answer '3'))"
            )
        finally:
            reward_fn.close()


def test_training_logs_one_summary_line_per_step_for_a_raising_verifier(tiny_overrides, caplog):
    from rlsd.step.trainer import train

    crashing = f"{TESTS_DIR / 'rewards_for_tests.py'}:crashing_reward"
    overrides = {"reward.verifiers": crashing, "reward.max_error_steps": "0"}
    with caplog.at_level(logging.WARNING):
        train(load_config(None, {**tiny_overrides, **overrides}))
    said = [r.getMessage() for r in caplog.records if "crashing_reward" in r.getMessage()]
    assert len(said) == 2  # one per step, not one per completion (8 a step)
    for step, line in enumerate(said, 1):
        assert line.startswith(
            f"step {step}: verifier crashing_reward raised on 8 of 8 completions this step: "
            "RuntimeError: verifier bug (first: completion 1, record '"
        )


# accepts a reference only when its prompt is the one training gives verifiers
RENDERED = """
def grade(prompts, completions, **kwargs):
    return [1.0 if prompts[0].endswith("'Answer: <answer>'.") else 0.0]
"""


def test_check_reward_gives_verifiers_the_prompt_training_gives_them(tmp_path, capsys):
    """The student's rendered data.prompt_template (the record's prompt plus the answer-line
    request), as training and evaluation pass it, not the record's raw prompt."""
    from rlsd.engine.data import compile_templates, render_user_text

    cfg = load_config(None, {})
    record = load_records(cfg.data)[0]
    rendered = render_user_text(compile_templates(cfg.data)[0], record, "prompt_template")
    assert rendered.endswith("'Answer: <answer>'.") and not record.prompt.endswith("'.")
    rc, out, _ = check(tmp_path, RENDERED, capsys, limit=5)
    assert rc == 0 and "5 of 5 references accepted" in out
