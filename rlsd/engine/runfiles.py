"""Run files that are always written: metrics.jsonl, samples.jsonl and evals.jsonl, one JSON
record per line, and whole files written atomically (config.yaml, checkpoints' small files).

Each line is flushed as soon as it is written, so a run that dies keeps every line it logged; a
last line cut short by a kill is recognised and dropped when the log is read back.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..schema.config import ConfigError


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class JsonlWriter:
    def __init__(self, path: Path):
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class NullWriter:
    """What the non-main processes of a multi-process run write to: nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _Unparsed(ValueError):
    """A line that is not even JSON text (what a write cut short by a kill leaves)."""


def _record(line: bytes) -> dict[str, Any]:
    """The record of one log line; ValueError saying what is wrong with it."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _Unparsed(f"not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise _Unparsed(exc.msg) from None
    except (ValueError, RecursionError) as exc:  # a 5000-digit number, deep nesting
        raise _Unparsed(type(exc).__name__) from None
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError("no step" if step is None else f"step {step!r} is not a step number")
    for key, value in record.items():  # metrics (`section/name`) are numbers, as written
        if "/" in key and not _is_metric_value(key, value):
            raise ValueError(f"{key} is {json.dumps(value)[:40]}, not a number")
    return record


def _is_metric_value(key: str, value: Any) -> bool:
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):  # a non-finite number (see _clean), or what a scope names
        return value in ("nan", "inf", "-inf") or key.endswith("_scope")
    return False


def _torn(lines: list[bytes], index: int, problem: ValueError) -> bool:
    """A last line without its newline that does not parse was cut short by a kill."""
    last = index == len(lines) - 1 and not lines[index].endswith((b"\n", b"\r"))
    return last and isinstance(problem, _Unparsed)


def jsonl_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Each record line of a run log (metrics, samples, evals; with its newline) and its
    record: a JSON object with an integer `step`. A last line cut short (the process was
    killed while writing it) is left out; damage anywhere else (bytes that are not UTF-8,
    something that is not a JSON object, no integer step, a metric that is not a number) is an
    error naming the file and 1-based line."""
    lines = Path(path).read_bytes().splitlines(keepends=True)  # binary: \n, \r\n and \r only
    out = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = _record(line)  # checks the UTF-8 first
            out.append((line.decode("utf-8"), record))
        except ValueError as exc:
            if _torn(lines, index, exc):
                break  # a torn write: the step it belonged to is rerun on resume
            raise ConfigError(
                f"{path}:{index + 1}: not a JSON record ({exc}); the log is damaged: "
                "remove that line, or move the run away to start it afresh"
            ) from None
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [record for _, record in jsonl_lines(path)]


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a process killed while writing leaves the old file (or
    none) and a stray <name>.tmp, never a truncated file that a rerun would fail to read."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
