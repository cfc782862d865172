"""Built-in verifiers and the answer extraction they share.

Each takes the batch's prompts and completions plus the record columns (`answer`, `solution`,
`metadata`), one value per completion, and returns one score per completion: a float, or None
when it cannot judge. Options arrive as keyword arguments from the `reward` config section
(`extract`, `marker`, `tolerance`, `rel_tolerance`, `pattern`).

Extraction (`reward.extract`): `marker` = the first line after the last `reward.answer_marker`
(default "Answer:"); `boxed` = the content of the last \\boxed{...} (nested braces allowed);
`answer_tag` = the content of the last <answer>...</answer>; `last_number` = the last number in the
text; `none` = the whole completion.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable
from fractions import Fraction
from typing import Any

_NUMBER = re.compile(r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?%?|[-+−]?\.\d+%?")
_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
MAX_CHARS = 20_000  # only the tail of a runaway completion is read


def extract_after_marker(text: str, marker: str) -> str | None:
    """The first line of text after the last `marker`, stripped of markup; None if no marker."""
    pos = text.rfind(marker)
    if pos < 0:
        return None
    tail = text[pos + len(marker) :].strip().splitlines()
    return strip_markup(tail[0]) if tail else ""


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced; None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None  # unbalanced


def answer_anchor(mode: str, marker: str = "Answer:") -> str | None:
    """The text that opens the final answer under an extraction mode (the marker, "\\boxed{",
    "<answer>"); None for the modes without one (last_number, none)."""
    return {"marker": marker, "answer_tag": "<answer>", "boxed": "\\boxed{"}.get(mode)


def extract_answer(text: str, mode: str = "marker", marker: str = "Answer:") -> str | None:
    """The final answer of a completion according to `mode` (see the module docstring)."""
    text = text[-MAX_CHARS:]
    if mode == "marker":
        return extract_after_marker(text, marker)
    if mode == "boxed":
        return extract_boxed(text)
    if mode == "answer_tag":
        found = _TAG.findall(text)
        return found[-1].strip() if found else None
    if mode == "last_number":
        found = _NUMBER.findall(text)
        return found[-1] if found else None
    if mode == "none":
        return text.strip()
    raise ValueError(f"unknown extraction mode {mode!r}")


def strip_markup(text: str) -> str:
    """Trim whitespace, wrapping markup ($, **, `) and a trailing full stop (case kept)."""
    return text.strip().rstrip(".").strip("*`$ ").rstrip(".").strip()


def normalise(text: str) -> str:
    """strip_markup, lower-cased, inner whitespace collapsed: for string comparison."""
    return " ".join(strip_markup(text).lower().split())


def extract_last_number(text: str) -> Fraction | None:
    """The last number in text (thousand separators, sign, decimals, a/b fractions, percent)."""
    found = _NUMBER.findall(text[-MAX_CHARS:])
    return parse_number(found[-1]) if found else None


def parse_number(text: str) -> Fraction | None:
    text = text.replace(",", "").replace("−", "-").strip()
    percent = text.endswith("%")
    try:
        value = Fraction(text.rstrip("%"))
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def _judge_each(
    completions: list[str],
    answer: list[str],
    extract: str,
    marker: str,
    judge: Callable[[str, str], bool],
) -> list[float]:
    """1.0 where judge(extracted answer, reference) holds, 0.0 elsewhere or when nothing could
    be extracted."""
    out = []
    for completion, gold in zip(completions, answer):
        got = extract_answer(completion, extract, marker)
        out.append(float(got is not None and judge(got, str(gold))))
    return out


def exact(
    prompts: list[str],
    completions: list[str],
    answer: list[str],
    extract: str = "marker",
    marker: str = "Answer:",
    **_: Any,
) -> list[float]:
    """1.0 when the normalised extracted answer equals the normalised reference."""
    return _judge_each(
        completions, answer, extract, marker, lambda got, gold: normalise(got) == normalise(gold)
    )


def numeric(
    prompts: list[str],
    completions: list[str],
    answer: list[str],
    extract: str = "marker",
    marker: str = "Answer:",
    tolerance: float = 1e-6,
    rel_tolerance: float = 0.0,
    **_: Any,
) -> list[float | None]:
    """1.0 when the last number of the extracted answer equals the reference within
    max(tolerance, rel_tolerance * |reference|). None when the reference is not a number."""
    out: list[float | None] = []
    for completion, gold in zip(completions, answer):
        want = parse_number(str(gold))
        if want is None:
            out.append(None)
            continue
        text = extract_answer(completion, extract, marker)
        got = extract_last_number(text) if text is not None else None
        bound = max(Fraction(tolerance), Fraction(rel_tolerance) * abs(want))  # exact: no overflow
        out.append(float(got is not None and abs(got - want) <= bound))
    return out


def math(
    prompts: list[str],
    completions: list[str],
    answer: list[str],
    extract: str = "marker",
    marker: str = "Answer:",
    **_: Any,
) -> list[float]:
    """1.0 when math-verify finds the extracted answer equivalent to the reference (LaTeX,
    fractions, sets, intervals, boxed answers). Runs without math-verify's own signal-based
    timeout (it only works in the main thread): the verifier runner enforces the time limit."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" on every call

    def wrap(text: str) -> str:
        return text if "$" in text or "\\boxed" in text else f"${text}$"

    def equivalent(got: str, gold: str) -> bool:
        gold_parsed = parse(wrap(gold), parsing_timeout=None)
        got_parsed = parse(wrap(got), parsing_timeout=None)
        return (
            bool(gold_parsed)
            and bool(got_parsed)
            and verify(gold_parsed, got_parsed, timeout_seconds=None)
        )

    return _judge_each(completions, answer, extract, marker, equivalent)


def choice(
    prompts: list[str],
    completions: list[str],
    answer: list[str],
    extract: str = "marker",
    marker: str = "Answer:",
    **_: Any,
) -> list[float]:
    """Multiple choice: 1.0 when the extracted answer names the reference option, by its letter
    ("B", "(b)", "B)", "Option B") or by its text."""

    def same_option(got: str, gold: str) -> bool:
        want = normalise(gold)
        if len(want) == 1 and want.isalpha():
            letter = re.fullmatch(r"(?:option\s*)?\(?([a-z])\)?[.:)]?(?:\s.*)?", normalise(got))
            return bool(letter) and letter.group(1) == want
        return normalise(got) == want

    return _judge_each(completions, answer, extract, marker, same_option)


def regex(
    prompts: list[str],
    completions: list[str],
    extract: str = "marker",
    marker: str = "Answer:",
    pattern: str = "",
    **_: Any,
) -> list[float]:
    """1.0 when the extracted answer fully matches `reward.pattern`."""
    compiled = re.compile(pattern)
    out = []
    for completion in completions:
        got = extract_answer(completion, extract, marker)
        out.append(float(got is not None and compiled.fullmatch(got.strip()) is not None))
    return out


def answer_format(
    prompts: list[str],
    completions: list[str],
    extract: str = "marker",
    marker: str = "Answer:",
    format_think: bool = False,
    format_partial: bool = False,
    **_: Any,
) -> list[float]:
    """Structure only. Checks: an answer can be extracted and is not empty (with extract=marker
    the marker line must also be the reply's last line); with `format_think`, a closed
    <think>...</think> span comes before the answer. All or nothing, or with `format_partial`
    the fraction of checks passed."""
    out = []
    for completion in completions:
        checks = []
        if extract == "marker":
            lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
            last = lines[-1] if lines else ""
            checks.append(last.startswith(marker) and bool(last[len(marker) :].strip()))
        else:
            got = extract_answer(completion, extract, marker)
            checks.append(bool(got and got.strip()))
        if format_think:
            opened, closed = completion.find("<think>"), completion.find("</think>")
            anchor = answer_anchor(extract, marker)
            found = completion.rfind(anchor) if anchor else -1
            answer_at = found if found >= 0 else len(completion)
            checks.append(0 <= opened < closed <= answer_at)
        out.append(sum(checks) / len(checks) if format_partial else float(all(checks)))
    return out


def reasoning_gym_score(
    prompts: list[str],
    completions: list[str],
    metadata: list[dict],
    extract: str = "marker",
    marker: str = "Answer:",
    **_: Any,
) -> list[float | None]:
    """The reasoning-gym task's own scorer on the extracted answer, as 0/1.

    reasoning-gym gives partial credit for substring matches; only a full score counts here.
    None for records that do not come from reasoning-gym.
    """
    import reasoning_gym

    out: list[float | None] = []
    for completion, meta in zip(completions, metadata):
        entry = (meta or {}).get("entry")
        if entry is None:
            out.append(None)
            continue
        scorer = reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])
        got = extract_answer(completion, extract, marker)
        out.append(float(got is not None and scorer(got, entry) >= 1.0))
    return out


_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def completion_code(completion: str) -> str:
    """The code of a reply: its last fenced block if it has one, else the whole reply."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def code_program(completion: str, meta: dict) -> str | None:
    """The program that tests a completion: HumanEval-style (the prompt's code, the completion
    as a whole function or as the body that continues it, the `test` code, `check(entry)`), or
    the completion followed by the record's `tests` (assert statements); None without tests."""
    code = completion_code(completion)
    if meta.get("test") and meta.get("entry_point"):
        entry = meta["entry_point"]
        head = meta.get("prompt_code", "")
        body = f"{head}\n{code}" if f"def {entry}" in code else head + code
        return f"{body}\n\n{meta['test']}\n\ncheck({entry})\n"
    tests = meta.get("tests")
    if tests:
        tests = "\n".join(tests) if isinstance(tests, list) else str(tests)
        return f"{code}\n\n{tests}\n"
    return None


def _fraction_program(code: str, tests: list[str], token: str) -> str:
    """Run each assert on its own and print the token with how many passed."""
    return (
        f"{code}\n\n_rlsd_passed = 0\nfor _rlsd_test in {tests!r}:\n    try:\n"
        f"        exec(_rlsd_test, globals())\n        _rlsd_passed += 1\n"
        f"    except BaseException:\n        pass\n"
        f"print({token!r}, _rlsd_passed, {len(tests)})\n"
    )


def code(
    prompts: list[str],
    completions: list[str],
    metadata: list[dict],
    code_timeout: float = 5.0,
    code_memory_mb: int = 1024,
    code_score: str = "all_pass",
    **_: Any,
) -> list[float | None]:
    """1.0 when the completion's code passes the record's tests in the sandbox (own temp dir, no
    network, CPU / wall-time / memory / output limits, process group killed on time-out), 0.0
    when it fails or exceeds a limit, None for records without tests. With
    code_score=pass_fraction and a list of assert statements, the fraction that pass."""
    from .sandbox import run_python

    out: list[float | None] = []
    for completion, meta in zip(completions, metadata):
        meta = meta or {}
        program = code_program(completion, meta)
        if program is None:
            out.append(None)
            continue
        # Exiting with status 0 before the tests run (sys.exit, os._exit) must not pass: the
        # program must also print a fresh random token that only its last line knows.
        token = secrets.token_hex(16)
        tests = meta.get("tests")
        fraction = (
            code_score == "pass_fraction"
            and isinstance(tests, list)
            and not meta.get("entry_point")
        )
        if fraction:
            program = _fraction_program(completion_code(completion), tests, token)
        else:
            program = f"{program}\nprint({token!r})\n"
        result = run_python(program, timeout=code_timeout, memory_mb=code_memory_mb)
        last = (result.output.strip().splitlines()[-1:] or [""])[0].split()
        if result.status != "passed" or not last or last[0] != token:
            out.append(0.0)
        else:
            out.append(int(last[1]) / int(last[2]) if fraction else 1.0)
    return out


BUILTIN = {
    "exact": exact,
    "numeric": numeric,
    "math": math,
    "choice": choice,
    "regex": regex,
    "format": answer_format,
    "reasoning_gym": reasoning_gym_score,
    "code": code,
}
