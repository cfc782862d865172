"""Fuzzing the user-facing loaders: no input may end in a traceback, only a clear error."""

import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlsd.engine.data import DataError, file_records
from rlsd.schema.config import ConfigError, load_config

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
KEYS = st.sampled_from(
    [
        "model",
        "data",
        "train",
        "rlsd",
        "algorithm",
        "teacher",
        "opsd",
        "reward",
        "rollout",
        "output",
        "nope",
    ]
)
FIELDS = st.sampled_from(
    [
        "name",
        "steps",
        "lr",
        "lambda",
        "eps_w",
        "mode",
        "lora",
        "task",
        "verifiers",
        "weights",
        "task_params",
        "loss_agg",
        "topk",
        "bogus",
    ]
)
CONFIGS = st.dictionaries(
    KEYS, st.one_of(VALUES, st.dictionaries(FIELDS, VALUES, max_size=4)), max_size=4
)
COUNTS = {"config": 0, "data": 0}
# derandomize: CI sees the same 300 + 300 inputs every run (a failure is reproducible)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(CONFIGS)
def test_config_loader_raises_only_config_errors(tmp_path, raw):
    path = tmp_path / "fuzz.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    COUNTS["config"] += 1
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc).strip()


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.binary(max_size=300), st.sampled_from([".jsonl", ".csv", ".parquet"]))
def test_data_loader_raises_only_data_errors(tmp_path, content, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(content)
    COUNTS["data"] += 1
    try:
        records = file_records(str(path), "prompt", "answer", "solution")
    except DataError as exc:
        assert str(path) in str(exc)
    else:
        assert all(r.prompt.strip() and r.answer.strip() for r in records)


CELLS = st.text(alphabet=st.sampled_from(list('ab 1,"\n\r\x00é')), max_size=8)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.lists(CELLS, max_size=4), max_size=5))
def test_csv_rows_of_any_shape_give_records_or_a_line_numbered_error(tmp_path, rows):
    """Rows longer or shorter than the header, quotes, commas and newlines inside fields."""
    import csv
    import io

    text = io.StringIO()
    csv.writer(text).writerows([["prompt", "answer"], *rows])
    path = tmp_path / "fuzz.csv"
    path.write_text(text.getvalue(), encoding="utf-8")
    try:
        records = file_records(str(path), "prompt", "answer", "solution")
    except DataError as exc:
        assert str(exc).startswith(f"{path}") and "\n" not in str(exc)
    else:
        assert all(r.prompt.strip() and r.answer.strip() for r in records)


LOG_LINES = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda v: json.dumps(v).encode(), VALUES),
    st.builds(lambda s, v: json.dumps({"step": s, "reward/mean": v}).encode(), VALUES, VALUES),
)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(LOG_LINES, max_size=4), st.booleans())
def test_run_logs_give_records_with_steps_or_a_line_numbered_error(tmp_path, lines, newline):
    """metrics.jsonl as a kill, a disk or a person may leave it: only a ConfigError naming the
    file and line, or records that all have an integer step and numeric metrics."""
    from rlsd.engine.runfiles import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"\n".join(lines) + (b"\n" if newline else b""))
    try:
        records = read_jsonl(path)
    except ConfigError as exc:
        assert re.match(rf"{re.escape(str(path))}:\d+: not a JSON record", str(exc))
        assert "\n" not in str(exc)
    else:
        for record in records:
            assert isinstance(record["step"], int) and not isinstance(record["step"], bool)
            assert isinstance(record.get("reward/mean", 0.0), (int, float, str))


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.one_of(st.binary(max_size=60), st.builds(lambda v: json.dumps(v).encode(), VALUES)))
def test_any_checksums_file_is_verified_or_called_damaged(tmp_path, content):
    """Whatever checksums.json holds, verify() names a problem or passes; it never raises, and
    it passes only when every file is listed with its true SHA-256."""
    from rlsd.engine.checkpoint import file_sha256, verify

    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir(exist_ok=True)
    for name in ("trainer_state.json", "optimizer.pt", "rng.pt", "adapter_model.safetensors"):
        (ckpt / name).write_bytes(name.encode())
    (ckpt / "checksums.json").write_bytes(content)
    assert isinstance(verify(ckpt), str)
    sums = {p.name: file_sha256(p) for p in ckpt.iterdir() if p.name != "checksums.json"}
    (ckpt / "checksums.json").write_text(json.dumps(sums))
    assert verify(ckpt) is None
