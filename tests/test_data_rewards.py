"""Data sources, prompt rendering, the preflight, and the built-in verifiers."""

import json

import pytest

from rlsd.engine.data import (
    DataError,
    PromptRenderer,
    PromptStream,
    Record,
    file_records,
    load_records,
)
from rlsd.engine.preflight import check_teacher_prompts
from rlsd.engine.rewards import build_reward, extract_after_marker, extract_last_number
from rlsd.engine.rewards.builtin import answer_format, exact, numeric, reasoning_gym_score
from rlsd.schema.config import ConfigError, DataConfig, RewardConfig

from .conftest import TESTS_DIR, build_tokenizer


def test_reasoning_gym_records_are_deterministic():
    cfg = DataConfig(size=5)
    a, b = load_records(cfg), load_records(cfg)
    assert [r.prompt for r in a] == [r.prompt for r in b] and len(a) == 5
    assert a[0].prompt.startswith("Calculate") and a[0].metadata["entry"]["answer"] == a[0].answer


def test_jsonl_and_csv_files(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"q": "1+1?", "a": 2, "sol": "1+1=2", "level": 1}) + "\n\n")
    rec = file_records(str(jl), "q", "a", "sol")[0]
    assert (rec.prompt, rec.answer, rec.solution, rec.metadata) == (
        "1+1?",
        "2",
        "1+1=2",
        {"level": 1},
    )
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,answer\nwhat?,7\n")
    assert file_records(str(csv), "prompt", "answer", "solution")[0].answer == "7"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", b'{"prompt": "x", "answer": "1"}\n{oops\n', "bad.jsonl:2: invalid JSON"),
        ("bad2.jsonl", b'{"prompt": "", "answer": "1"}\n', "bad2.jsonl:1: field 'prompt'"),
        ("bad.csv", b"prompt,answer\nx,\n", "bad.csv:2: field 'answer'"),
        ("bin.jsonl", b'{"prompt": "\xff", "answer": "1"}\n', "not UTF-8"),
        ("d.txt", b"x", "unsupported file type"),
        ("empty.jsonl", b"\n", "no records"),
        ("extra.csv", b"prompt,answer\nx,1\ny,2,3\n", "extra.csv:3: 3 fields, but the header"),
        ("span.csv", b'prompt,answer\n"two\nlines",1\n,2\n', "span.csv:4: field 'prompt'"),
        ("huge.csv", b"prompt,answer\nx,1\n" + b"y" * 200_000 + b",2\n", "huge.csv:3: not valid"),
        ("bin3.jsonl", b'{"prompt": "x", "answer": "1"}\n\n{"prompt": "\xc3"}\n', "bin3.jsonl:3:"),
        ("big.jsonl", b'{"prompt": "x", "answer": ' + b"1" * 5000 + b"}\n", "big.jsonl:1:"),
        ("deep.jsonl", b"[" * 100_000 + b"\n", "deep.jsonl:1: invalid JSON: RecursionError"),
        ("cr.jsonl", b'{"prompt": "x\\ry", "answer": "1"}\r\n{"q": 1}\r\n', "cr.jsonl:2:"),
        ("bom.csv", b"\xef\xbb\xbfprompt,answer\nx,\n", "bom.csv:2: field 'answer'"),
        ("bad.parquet", b"PAR1 not really PAR1", "bad.parquet: not a readable Parquet file"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        file_records(str(path), "prompt", "answer", "solution")


def _cli_error(overrides: dict, capsys) -> str:
    """Train through the command line, expecting one error line and exit code 2."""
    from rlsd.commands.cli import main

    from .test_cli import argv

    code = main(["train", *argv(overrides)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("rlsd: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("d.csv", b"prompt,answer\n1+1,2\n2+2,4,x\n", "d.csv:3: 3 fields, but the header has 2"),
        ("d.parquet", b"PAR1\x00\x01garbagePAR1", "d.parquet: not a readable Parquet file (Arrow"),
        ("d.jsonl", b'{"prompt": "1", "answer": "2"}\n{"q": "\xff"}\n', "d.jsonl:2: not UTF-8"),
    ],
)
def test_bad_data_files_through_the_cli(tiny_overrides, tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    err = _cli_error({**tiny_overrides, "data.source": "file", "data.path": str(path)}, capsys)
    assert f"{tmp_path / message}" in err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_a_directory_that_is_not_a_saved_dataset_through_the_cli(tiny_overrides, tmp_path, capsys):
    folder = tmp_path / "not-a-dataset"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    err = _cli_error({**tiny_overrides, "data.source": "file", "data.path": str(folder)}, capsys)
    assert f"{folder}: not a data set saved with HF datasets' save_to_disk (" in err


def test_a_verifier_file_with_a_syntax_error_through_the_cli(tiny_overrides, tmp_path, capsys):
    verifier = tmp_path / "my_verifier.py"
    verifier.write_text("def score(prompts, completions, **columns):\n    return [1.0 for c in\n")
    err = _cli_error({**tiny_overrides, "reward.verifiers": f"{verifier}:score"}, capsys)
    assert f"reward.verifiers: {verifier}:2: syntax error: " in err


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.seed", "-1", "train.seed: must be >= 0, got -1"),
        ("train.seed", str(2**70), f"train.seed: must be <= {2**32 - 1}, got {2**70}"),
        ("data.seed", "-3", "data.seed: must be >= 0, got -3"),
        ("data.seed", str(2**32), f"data.seed: must be <= {2**32 - 1}, got {2**32}"),
    ],
)
def test_an_out_of_range_seed_through_the_cli(tiny_overrides, capsys, key, value, message):
    assert message in _cli_error({**tiny_overrides, key: value}, capsys)


def test_renderer_and_preflight():
    tok = build_tokenizer()
    rec = Record("Calculate 2 + 3.", "5")
    renderer = PromptRenderer(DataConfig(), tok)
    student = tok.decode(renderer.student_ids(rec))
    teacher = tok.decode(renderer.teacher_ids(rec))
    assert student.startswith("<|im_start|>user\nCalculate 2 + 3.") and "reference" not in student
    assert "Here is a reference solution:\n5" in teacher
    assert student.endswith("<|im_start|>assistant\n") and teacher.endswith("assistant\n")
    check_teacher_prompts(renderer, tok, [rec])
    same = PromptRenderer(
        DataConfig(
            teacher_template="{{ prompt }}\n"
            "End your reply with a "
            "final line of the form 'Answer: <answer>'."
        ),
        tok,
    )
    with pytest.raises(ConfigError, match="same prompt as the student"):
        check_teacher_prompts(same, tok, [rec])
    blind = PromptRenderer(DataConfig(teacher_template="{{ prompt }} (think hard)"), tok)
    with pytest.raises(ConfigError, match="does not contain the reference"):
        check_teacher_prompts(blind, tok, [rec])
    check_teacher_prompts(blind, tok, [rec], privileged=False)  # a declared control run
    check_teacher_prompts(same, tok, [rec], privileged=False)
    with pytest.raises(ConfigError, match="data.prompt_template"):
        PromptRenderer(DataConfig(prompt_template="{{ nope }}"), tok).student_ids(rec)
    with pytest.raises(DataError, match="exceeds data.max_prompt_tokens=3"):
        PromptRenderer(DataConfig(max_prompt_tokens=3), tok).student_ids(rec)


def test_prompt_stream_is_seeded_and_resumable():
    a = PromptStream(5, seed=1)
    first = a.next(7)
    assert sorted(first[:5]) == [0, 1, 2, 3, 4]
    state = a.state_dict()
    rest = a.next(6)
    b = PromptStream(5, seed=1)
    b.load_state_dict(state)
    assert b.next(6) == rest and PromptStream(5, seed=1).next(7) == first


def test_extraction_on_messy_outputs():
    assert extract_after_marker("work...\nAnswer: **-45**.\n\nHope this helps", "Answer:") == "-45"
    assert extract_after_marker("Answer: 1\nAnswer:  $12$ ", "Answer:") == "12"
    assert extract_after_marker("no marker here 12", "Answer:") is None
    assert extract_last_number("total 1,234.5 and then 7/2") == pytest.approx(3.5)
    assert float(extract_last_number("it is -1,234")) == -1234
    assert extract_last_number("none") is None


def test_builtin_verifiers():
    outs = ["So Answer: 19", "Answer: 19.0", "I think 19", "Answer: twenty"]
    assert exact([], outs, ["19"] * 4) == [1.0, 0.0, 0.0, 0.0]
    assert numeric([], outs, ["19"] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert numeric([], ["Answer: 3"], ["three"]) == [None]
    assert answer_format([], ["x\nAnswer: 4", "Answer:", "Answer: 4\nmore"]) == [1.0, 0.0, 0.0]


def test_reasoning_gym_scorer_is_binary():
    rec = load_records(DataConfig(size=1))[0]
    meta = [rec.metadata] * 3
    outs = [f"Answer: {rec.answer}", f"Answer: {rec.answer}0", "nothing"]
    assert reasoning_gym_score([], outs, meta) == [1.0, 0.0, 0.0]
    assert reasoning_gym_score([], ["Answer: 1"], [{}]) == [None]


def test_combined_reward_weights_errors_and_custom_functions():
    fn = build_reward(RewardConfig(verifiers=["exact", "format"], weights=[1.0, 0.5]))
    rewards, correct, metrics = fn(
        ["p", "p"],
        ["Answer: 5", "5"],
        {"answer": ["5", "5"], "solution": ["", ""], "metadata": [{}, {}]},
    )
    assert rewards == [1.5, 0.0] and correct == [True, False]
    assert metrics["reward/format/mean"] == 0.5 and metrics["reward/errors"] == 0
    crash = build_reward(
        RewardConfig(
            verifiers=[f"{TESTS_DIR / 'rewards_for_tests.py'}:crashing_reward"], none_value=-1.0
        )
    )
    rewards, correct, metrics = crash(["p"], ["x"], {"answer": ["1"]})
    assert rewards == [-1.0] and correct == [False] and metrics["reward/errors"] == 1
    async_fn = build_reward(
        RewardConfig(verifiers=[f"{TESTS_DIR / 'rewards_for_tests.py'}:async_reward"])
    )
    assert async_fn(["p", "p"], ["has 7", "no"], {"answer": ["7", "7"]})[0] == [1.0, 0.0]
    with pytest.raises(ConfigError, match="neither a built-in verifier"):
        build_reward(RewardConfig(verifiers=["nope"]))
    with pytest.raises(ConfigError, match="cannot import"):
        build_reward(RewardConfig(verifiers=["no_such_module_xyz:f"]))


def test_preflight_refuses_a_chat_template_that_changes_the_assistant_header():
    tok = build_tokenizer()
    tok.chat_template = tok.chat_template.replace(
        "<|im_start|>assistant\n{% endif %}",
        "{% if 'reference' in messages[-1]['content'] %}<|im_start|>assistant (informed)\n"
        "{% else %}<|im_start|>assistant\n{% endif %}{% endif %}",
    )
    renderer = PromptRenderer(DataConfig(), tok)
    with pytest.raises(
        ConfigError,
        match="data.teacher_template: the rendered prompt does not "
        "end with the chat template's assistant header",
    ):
        check_teacher_prompts(renderer, tok, [Record("Calculate 2 + 3.", "5")])


def test_reasoning_gym_mix_with_weights():
    cfg = DataConfig(
        mix={"chain_sum": 1, "leg_counting": 3}, mix_params={"chain_sum": {}}, size=200
    )
    records = load_records(cfg)
    families = [r.metadata["entry"]["metadata"]["source_dataset"] for r in records]
    assert set(families) == {"chain_sum", "leg_counting"}
    assert 0.6 < families.count("leg_counting") / len(families) < 0.9  # weight 3 of 4
    with pytest.raises(ConfigError, match="data.mix: unknown reasoning-gym task 'nope'"):
        load_records(DataConfig(mix={"nope": 1}))


def test_mix_validation():
    from rlsd.schema.config import load_config

    with pytest.raises(ConfigError, match="data.mix: the weight of 'gcd' must be a positive"):
        load_config(None, {"data.mix": "{gcd: 0}"})
    with pytest.raises(ConfigError, match="data.mix_params: 'gcd' is not in data.mix"):
        load_config(None, {"data.mix": "{chain_sum: 1}", "data.mix_params": "{gcd: {}}"})


def test_heldout_split_is_seeded_and_disjoint():
    from rlsd.engine.data import split_heldout

    records = [Record(str(i), str(i)) for i in range(50)]
    train, held = split_heldout(records, 10, seed=3)
    again, held_again = split_heldout(records, 10, seed=3)
    assert len(train) == 40 and len(held) == 10 and held == held_again and train == again
    assert not {r.prompt for r in train} & {r.prompt for r in held}
    assert split_heldout(records, 0, 3) == (records, [])
    with pytest.raises(ConfigError, match="leaves nothing"):
        split_heldout(records, 50, 3)


def test_saved_hf_dataset_needs_the_datasets_package(tmp_path):
    try:
        import datasets
    except ImportError:
        with pytest.raises(DataError, match="needs the datasets package"):
            file_records(str(tmp_path), "prompt", "answer", "solution")
    else:  # with the package installed, a real saved data set loads
        datasets.Dataset.from_list([{"prompt": "1+1", "answer": "2"}]).save_to_disk(tmp_path / "d")
        assert file_records(str(tmp_path / "d"), "prompt", "answer", "solution")[0].answer == "2"
