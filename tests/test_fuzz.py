"""Fuzzing the user-facing loaders: no input may end in a traceback, only a clear error."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlsd.config import ConfigError, load_config
from rlsd.data import DataError, file_records

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
@given(st.binary(max_size=300), st.sampled_from([".jsonl", ".csv"]))
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
