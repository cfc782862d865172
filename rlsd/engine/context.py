"""Where the self-teacher's privileged context comes from (`teacher.context`), per completion.

The teacher is the model itself shown its prompt plus a *context*; the context's sources, tried
in the configured order, first available wins for each completion:

- `reference`: the record's worked solution, else its reference answer (always available, as
  it was before the other sources existed, even when both are empty);
- `sibling`: a correct completion of the same prompt from this step's group, the golden example:
  the shortest correct one (fewest tokens; ties go to the lowest index), never the completion
  being scored. A correct completion that is the only correct one of its group has no sibling;
  it falls through to the next source, and with none left its teacher sees no context: its
  credit stays uniform (Delta = 0, GRPO's credit; zero distillation signal);
- `memory`: the best earlier correct completion of the same prompt, from earlier steps or
  epochs (`ContextMemory`).

The chosen text and its kind reach the teacher template as `context` and `context_kind`, so the
wording can differ ("Here is a reference solution" vs "Here is a correct solution written
earlier"). A completion never sees itself: siblings exclude it, memory holds only earlier steps.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..schema.sections_training import CONTEXT_SOURCES

SOURCES = CONTEXT_SOURCES  # the schema names them (teacher.context); their meaning is here


@dataclass(frozen=True)
class Context:
    """The privileged context one completion's teacher sees."""

    kind: str  # one of SOURCES
    text: str


def sibling_index(correct: list[bool], lengths: list[int], row: int) -> int | None:
    """Within one group: the shortest correct completion other than `row` (ties: the lowest
    index), or None when no other member is correct."""
    others = [j for j, ok in enumerate(correct) if ok and j != row]
    return min(others, key=lambda j: (lengths[j], j)) if others else None


@dataclass
class Memory:
    """One prompt's remembered success."""

    text: str
    reward: float
    length: int  # completion tokens
    step: int  # when it was stored


class ContextMemory:
    """The best earlier correct completion of each prompt, at most `capacity` prompts.

    Best: the highest reward, then the fewest tokens; a later completion replaces the stored one
    only when strictly better. When a new prompt would exceed the capacity, the prompt whose
    entry was stored longest ago is evicted. Keys are the prompts' text, so the store is the
    same on every process and across resumes; `state_dict` / `load_state_dict` round-trip it
    exactly (insertion order included) for checkpoints.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[str, Memory] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> Memory | None:
        return self.entries.get(key)

    def offer(self, key: str, text: str, reward: float, length: int, step: int) -> bool:
        """Store a correct completion if it beats what the prompt holds; True when stored."""
        old = self.entries.get(key)
        if old is not None and (old.reward, -old.length) >= (reward, -length):
            return False
        self.entries.pop(key, None)
        self.entries[key] = Memory(text, reward, length, step)  # the newest entry goes last
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return True

    def state_dict(self) -> list[dict[str, Any]]:
        return [{"key": k, **vars(m)} for k, m in self.entries.items()]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        self.entries = OrderedDict(
            (e["key"], Memory(e["text"], e["reward"], e["length"], e["step"])) for e in state
        )


def choose_contexts(
    sources: list[str],
    references: list[str],
    keys: list[str],
    texts: list[str],
    correct: list[bool],
    lengths: list[int],
    group: int,
    memory: ContextMemory | None,
) -> list[Context | None]:
    """The context of every completion of a step (B * G rows, laid out group by group).

    `references[i]` is row i's record's solution or answer, `keys[i]` its prompt's memory key,
    `texts` / `correct` / `lengths` the completions, their verdicts and token counts."""
    out: list[Context | None] = []
    for i in range(len(texts)):
        start = i - i % group
        chosen = None
        for source in sources:
            if source == "reference":
                chosen = Context("reference", references[i])
            elif source == "sibling":
                j = sibling_index(
                    correct[start : start + group], lengths[start : start + group], i - start
                )
                chosen = None if j is None else Context("sibling", texts[start + j])
            elif source == "memory" and memory is not None:
                entry = memory.get(keys[i])
                chosen = None if entry is None else Context("memory", entry.text)
            if chosen is not None:
                break
        out.append(chosen)
    return out


def remember(
    memory: ContextMemory,
    keys: list[str],
    texts: list[str],
    rewards: list[float],
    correct: list[bool],
    lengths: list[int],
    step: int,
) -> int:
    """Offer a step's correct completions to the memory, in row order; returns how many were
    stored. Called after the step, so a completion is remembered for later steps only."""
    return sum(
        memory.offer(key, text, reward, length, step)
        for key, text, reward, ok, length in zip(keys, texts, rewards, correct, lengths)
        if ok
    )


def context_metrics(contexts: list[Context | None], sources: list[str]) -> dict[str, float]:
    """`teacher/context_<source>_frac` (and `_none_frac`) over the given completions."""
    n = max(len(contexts), 1)
    kinds = [c.kind if c is not None else "none" for c in contexts]
    return {f"teacher/context_{s}_frac": kinds.count(s) / n for s in [*sources, "none"]}
