"""A pass-rate curriculum: remember how each prompt's groups fared, and skip the prompts that
are reliably solved or reliably failed (`curriculum.*`).

A group whose completions are all correct or all wrong carries no gradient under grpo and rlsd,
so sampling it again soon is mostly wasted compute (the chain study: 62 % of groups all correct,
16 % all wrong). `PassRates` keeps, for at most `capacity` prompts, the accuracy of their last
`window` groups; `skips` says a prompt is settled when it was seen at least `min_visits` times
and its mean pass rate is at or above `high` or at or below `low`. A settled prompt is still
tried again now and then: each visit after `recheck_every` skips counts as a fresh look, so a
prompt the model has since forgotten (or learnt) comes back.

The store is the same on every process (every process offers every group, in rank order) and
is saved in checkpoints, so a resumed run skips exactly what the uninterrupted one skipped.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Seen:
    """One prompt's recent groups."""

    rates: list[float] = field(default_factory=list)  # the last `window` group accuracies
    skipped: int = 0  # skips since it was last sampled


class PassRates:
    """The recent pass rates of at most `capacity` prompts (the least recently updated goes)."""

    def __init__(self, capacity: int, window: int):
        self.capacity, self.window = capacity, window
        self.entries: OrderedDict[str, Seen] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def observe(self, key: str, accuracy: float) -> None:
        """A group of this prompt was sampled and had this share of correct completions."""
        seen = self.entries.pop(key, None) or Seen()
        seen.rates = [*seen.rates, accuracy][-self.window :]
        seen.skipped = 0
        self.entries[key] = seen  # the newest goes last
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def skips(self, key: str, low: float, high: float, min_visits: int, recheck_every: int) -> bool:
        """Whether to skip the prompt now (counting the skip); False for one not settled."""
        seen = self.entries.get(key)
        if seen is None or len(seen.rates) < min_visits:
            return False
        rate = sum(seen.rates) / len(seen.rates)
        if low < rate < high:
            return False
        if recheck_every and seen.skipped >= recheck_every:
            return False  # a fresh look at a settled prompt
        seen.skipped += 1
        return True

    def state_dict(self) -> list[dict[str, Any]]:
        return [{"key": k, "rates": s.rates, "skipped": s.skipped} for k, s in self.entries.items()]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        self.entries = OrderedDict(
            (e["key"], Seen(list(e["rates"]), int(e["skipped"]))) for e in state
        )
