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
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from .sandbox import CodeTests, Limits, run_tests

_NUMBER = re.compile(r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?%?|[-+−]?\.\d+%?")
_OPEN_TAG = re.compile(r"<answer>", re.IGNORECASE)
_CLOSE_TAG = re.compile(r"</answer>", re.IGNORECASE)
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


def extract_tag(text: str) -> str | None:
    """The content of the last closed <answer>...</answer> (any case); None if there is none.

    Linear time: the last closing tag, the last opening tag before it, and the first closing tag
    after that (a lazy `<answer>(.*?)</answer>` search is quadratic on a reply full of openers).
    """
    closes = [m.start() for m in _CLOSE_TAG.finditer(text)]
    if not closes:
        return None
    opens = [m.end() for m in _OPEN_TAG.finditer(text, 0, closes[-1])]
    if not opens:
        return None
    end = _CLOSE_TAG.search(text, opens[-1])
    return text[opens[-1] : end.start()].strip()


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
        return extract_tag(text)
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


def code_program(completion: str, meta: dict) -> CodeTests | None:
    """What to judge for a completion: HumanEval-style (the candidate is the prompt's code plus
    the completion, as a whole function or as the body that continues it; the judge runs the
    `test` code's `check` on `entry_point`) or the record's `tests` (assert statements run one by
    one with the candidate's top-level names); None without tests."""
    code = completion_code(completion)
    if meta.get("test") and meta.get("entry_point"):
        entry = meta["entry_point"]
        head = meta.get("prompt_code", "")
        body = f"{head}\n{code}" if f"def {entry}" in code else head + code
        return CodeTests(body, check=meta["test"], entry_point=entry, prompt_code=head)
    tests = meta.get("tests")
    if tests:
        tests = [str(t) for t in tests] if isinstance(tests, list) else [str(tests)]
        return CodeTests(code, tests=tests)
    return None


def code(
    prompts: list[str],
    completions: list[str],
    metadata: list[dict],
    code_timeout: float = 5.0,
    code_memory_mb: int = 1024,
    code_score: str = "all_pass",
    code_sandbox: str = "bubblewrap",
    code_disk_mb: int = 64,
    code_processes: int = 32,
    **_: Any,
) -> list[float | None]:
    """1.0 when the completion's code passes the record's tests, judged in the sandbox (see
    sandbox.py: bubblewrap, resource limits, tests run in a judge process the code cannot
    reach), 0.0 when it fails or exceeds a limit, None for records without tests. With
    code_score=pass_fraction and a list of assert statements, the fraction that pass."""
    limits = Limits(
        timeout=code_timeout,
        memory_mb=code_memory_mb,
        disk_mb=code_disk_mb,
        processes=code_processes,
        sandbox=code_sandbox,
    )
    out: list[float | None] = []
    for completion, meta in zip(completions, metadata):
        job = code_program(completion, meta or {})
        if job is None:
            out.append(None)
            continue
        verdict = run_tests(job, limits)
        if verdict.status != "judged":
            out.append(0.0)
        elif code_score == "pass_fraction" and job.tests:
            out.append(verdict.passed / verdict.total)
        else:
            out.append(float(verdict.passed == verdict.total))
    return out


# Where a built-in runs (see combine.py's docstring). CONFINED: it parses or evaluates model
# output, or can run long on it (math-verify and sympy, the regex engine, reasoning-gym's
# scorers), so it runs in the kernel-confined worker processes, killed on time. IN_PROCESS: it
# only slices, strips and compares at most MAX_CHARS characters in linear time and never
# evaluates model output (`code` runs each program in its own sandboxed process), so it stays
# in the trainer's threads.
CONFINED, IN_PROCESS = "confined", "in_process"

# Every built-in is registered with where it runs: a new one cannot be added without saying so.
REGISTRY: dict[str, tuple[Callable, str]] = {
    "exact": (exact, IN_PROCESS),
    "numeric": (numeric, IN_PROCESS),
    "math": (math, CONFINED),
    "choice": (choice, IN_PROCESS),
    "regex": (regex, CONFINED),
    "format": (answer_format, IN_PROCESS),
    "reasoning_gym": (reasoning_gym_score, CONFINED),
    "code": (code, IN_PROCESS),
}
BUILTIN: dict[str, Callable] = {name: fn for name, (fn, _) in REGISTRY.items()}


class RegistryError(RuntimeError):
    """A built-in verifier that does not say where it runs (a bug in rlsd, not in a config)."""


def placement(name: str) -> str:
    """Where built-in `name` runs: CONFINED or IN_PROCESS. Raises RegistryError for a name in
    BUILTIN that REGISTRY does not place (added to BUILTIN alone, or placed as neither): such a
    verifier must never fall back to running unconfined by default."""
    where = REGISTRY[name][1] if name in REGISTRY else None
    if where not in (CONFINED, IN_PROCESS):
        raise RegistryError(
            f"built-in verifier {name!r} does not say where it runs (got {where!r}): add it to "
            "REGISTRY in rlsd/engine/rewards/builtin.py with CONFINED (it parses or evaluates "
            "model output, or may run long) or IN_PROCESS (linear-time string checks only)"
        )
    return where


def check_registry() -> None:
    """Refuse (RegistryError) every built-in in BUILTIN that REGISTRY does not place."""
    for name in BUILTIN:
        placement(name)


check_registry()  # at import: an entry placed as neither fails at once
