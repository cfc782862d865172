"""`rlsd check-reward`: score the data set's own references with the configured verifiers.

A verifier that rejects the references is misconfigured (wrong extraction, wrong marker, a task
whose answers it cannot parse): it would teach nothing, or the wrong thing. Each reference answer
is written the way the configured extraction expects to find it, then scored like a completion.

A rejected reference is counted by why: the first verifier raised on it (a bug in the verifier,
not the answer format), ran out of time, or scored it below 1 / could not judge it (a format or
extraction problem). `report_lines` says so in one line per kind, with the first example.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..engine.data import Record, compile_templates, load_records, render_user_text
from ..engine.rewards.combine import Failures, build_reward, excerpt, failure_lines
from ..schema.config import Config


def reference_completion(answer: str, extract: str, marker: str, verifier: str = "") -> str:
    """The reference answer, written where `extract` (or the code verifier) looks for it."""
    if verifier == "code":
        return f"```python\n{answer}\n```"
    if extract == "marker":
        return f"{marker} {answer}"
    if extract == "boxed":
        return f"The answer is \\boxed{{{answer}}}."
    if extract == "answer_tag":
        return f"<answer>{answer}</answer>"
    return answer


@dataclass
class CheckResult:
    """`rejected`: (record, completion) of the references scored below 1 or not judged, the
    format problems; `failures`: per verifier, the references it raised on or ran out of time
    on (indices into `records`), which are rejected too when the verifier is the first."""

    total: int
    accepted: int
    metrics: dict[str, float]
    rejected: list[tuple[Record, str]] = field(default_factory=list)
    failures: list[Failures] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    timeout: float = 0.0
    first_name: str = ""  # the first verifier's short name: the one that decides acceptance

    @property
    def fraction(self) -> float:
        return self.accepted / max(self.total, 1)

    @property
    def first_failed(self) -> tuple[int, int]:
        """How many references the first verifier raised on, and how many timed out."""
        first = [f for f in self.failures if f.verifier == self.first_name]
        return (len(first[0].errors), len(first[0].timeouts)) if first else (0, 0)

    def item(self, i: int) -> str:
        """Reference i (0-based) as a report names it: 1-based, its prompt and answer."""
        record = self.records[i]
        return (
            f"reference {i + 1}, record {excerpt(record.prompt)!r} "
            f"(answer {excerpt(record.answer, 40)!r})"
        )

    def report_lines(self) -> list[str]:
        """One line per verifier and kind of failure (raised, timed out), then the format
        rejections: how many, and the first few."""
        lines = failure_lines(self.failures, self.item, "references", timeout=self.timeout)
        if self.rejected:
            lines.append(
                f"scored below 1 or not judged: {len(self.rejected)} of {self.total} references"
            )
            lines += [
                f"rejected: answer {r.answer!r} written as {t!r}" for r, t in self.rejected[:5]
            ]
        return lines

    def verdict(self) -> str:
        """Why the references fail, cause by cause (for a check that did not pass)."""
        raised, timed_out = self.first_failed
        causes = []
        if raised:
            causes.append(
                f"{self.first_name} raised on {raised} (an exception in the verifier, not an "
                "answer-format problem: fix the verifier)"
            )
        if timed_out:
            causes.append(f"{self.first_name} ran out of time on {timed_out} (reward.timeout)")
        if self.rejected:
            causes.append(
                f"{len(self.rejected)} scored below 1 or not judged (check reward.extract, "
                "reward.answer_marker and the verifier choice)"
            )
        return (
            f"the verifier rejects {100 * (1 - self.fraction):.1f} % of the references: "
            + "; ".join(causes)
        )


def _merge(into: dict[str, Failures], failures: list[Failures], offset: int, total: int) -> None:
    """Add one chunk's failures (indices from `offset`) to the whole check's."""
    for f in failures:
        whole = into.setdefault(f.verifier, Failures(f.verifier, total))
        whole.errors += [(offset + i, reason) for i, reason in f.errors]
        whole.timeouts += [offset + i for i in f.timeouts]


def check_references(cfg: Config, limit: int = 0, batch: int = 256) -> CheckResult:
    records = load_records(cfg.data)
    if limit:
        records = records[:limit]
    # the references are the data's, not model output: no process per reference (which made a
    # check over thousands of them take minutes)
    reward_fn = build_reward(dataclasses.replace(cfg.reward, isolate_completions=False))
    try:  # the verifier pool's workers stop when the check ends
        accepted, rejected, sums, failures = 0, [], {}, {}
        first = cfg.reward.verifiers[0].rsplit(":", 1)[-1]
        template = compile_templates(cfg.data)[0]  # verifiers get the prompt training gives them
        for start in range(0, len(records), batch):
            chunk = records[start : start + batch]
            texts = [
                reference_completion(
                    r.answer, cfg.reward.extract, cfg.reward.answer_marker, cfg.reward.verifiers[0]
                )
                for r in chunk
            ]
            columns = {
                "answer": [r.answer for r in chunk],
                "solution": [r.solution for r in chunk],
                "metadata": [r.metadata for r in chunk],
            }
            prompts = [render_user_text(template, r, "prompt_template") for r in chunk]
            _, correct, metrics = reward_fn(prompts, texts, columns)
            for key, value in metrics.items():
                weight = len(chunk) if key.endswith("/mean") else 1
                sums[key] = sums.get(key, 0.0) + value * weight
            accepted += sum(correct)
            # the first verifier raised or timed out: rejected, but not for the format
            mine = [f for f in reward_fn.failures if f.verifier == first]
            failed = {i for f in mine for i in f.timeouts} | {i for f in mine for i, _ in f.errors}
            rejected += [
                (r, t)
                for i, (r, t, ok) in enumerate(zip(chunk, texts, correct))
                if not ok and i not in failed
            ]
            _merge(failures, reward_fn.failures, start, len(records))
        means = {k: v / len(records) if k.endswith("/mean") else v for k, v in sums.items()}
    finally:
        reward_fn.close()
    return CheckResult(
        len(records),
        accepted,
        means,
        rejected,
        list(failures.values()),
        records,
        cfg.reward.timeout,
        first,
    )
