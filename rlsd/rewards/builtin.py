"""Built-in verifiers and the answer extraction they share.

Each takes the batch's prompts and completions plus the record columns (`answer`, `solution`,
`metadata`), one value per completion, and returns one score per completion: a float, or None
when it cannot judge.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def extract_after_marker(text: str, marker: str) -> str | None:
    """The first line of text after the last `marker`, stripped of markup; None if no marker."""
    pos = text.rfind(marker)
    if pos < 0:
        return None
    tail = text[pos + len(marker):].strip().splitlines()
    return normalise(tail[0]) if tail else ""


def normalise(text: str) -> str:
    """Lower-case, trim whitespace, wrapping markup ($, **, `) and a trailing full stop."""
    text = text.strip().rstrip(".").strip("*`$ ").rstrip(".").strip()
    return " ".join(text.lower().split())


def extract_last_number(text: str) -> Fraction | None:
    """The last number in text (thousand separators, sign, decimals, a/b fractions)."""
    found = _NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def parse_number(text: str) -> Fraction | None:
    text = text.replace(",", "").strip().rstrip("%")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def answer_exact(prompts: list[str], completions: list[str], answer: list[str],
                 marker: str = "Answer:", **_: Any) -> list[float]:
    """1.0 when the normalised text after the last marker equals the reference answer."""
    out = []
    for completion, gold in zip(completions, answer):
        got = extract_after_marker(completion, marker)
        out.append(float(got is not None and got == normalise(str(gold))))
    return out


def answer_numeric(prompts: list[str], completions: list[str], answer: list[str],
                   marker: str = "Answer:", tolerance: float = 1e-6, **_: Any) -> list[float | None]:
    """1.0 when the number after the last marker equals the reference within tolerance.

    None (cannot judge) when the reference itself is not a number.
    """
    out: list[float | None] = []
    for completion, gold in zip(completions, answer):
        want = parse_number(str(gold))
        if want is None:
            out.append(None)
            continue
        text = extract_after_marker(completion, marker)
        got = extract_last_number(text) if text is not None else None
        out.append(float(got is not None and abs(float(got - want)) <= tolerance))
    return out


def answer_format(prompts: list[str], completions: list[str], marker: str = "Answer:",
                  **_: Any) -> list[float]:
    """1.0 when the reply has a final line starting with the marker and a non-empty answer."""
    out = []
    for completion in completions:
        lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        out.append(float(last.startswith(marker) and bool(last[len(marker):].strip())))
    return out


def reasoning_gym_score(prompts: list[str], completions: list[str], metadata: list[dict],
                        marker: str = "Answer:", **_: Any) -> list[float | None]:
    """The reasoning-gym task's own scorer on the text after the marker, as 0/1.

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
        got = extract_after_marker(completion, marker)
        out.append(float(got is not None and scorer(got, entry) >= 1.0))
    return out


BUILTIN = {"answer_exact": answer_exact, "answer_numeric": answer_numeric,
           "format": answer_format, "reasoning_gym": reasoning_gym_score}
