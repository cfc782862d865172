"""rlsd's `memory` context source in TRL, and the rlsd state kept in TRL checkpoints.

Pure helpers of `rlsd.integrations.trl`, free of TRL itself. The store is rlsd's own
`ContextMemory` (the best earlier correct completion of each prompt: highest reward, then fewest
tokens; at most `rlsd_memory_size` prompts, the one stored longest ago evicted first), filled
by rlsd's own `remember` after each rollout's credit, so a completion is a context for later
rollouts only.

The key of a row is its prompt itself: a standard prompt's string, a conversational one's
message list as JSON (sorted keys). It does not depend on the tokenizer, the process or the
batch order, so every process and every resumed run keys a prompt the same way; two rows share
an entry exactly when their prompts are equal (system message included).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.context import ContextMemory, remember
from ..schema.config import ConfigError

STATE_FILE = "rlsd_state.json"


def memory_key(prompt: Any) -> str:
    """The memory's key for a row's `prompt` (see the module docstring)."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=str)


@dataclass
class Rollout:
    """One rollout's completions, all processes' rows in rank order (identical everywhere)."""

    keys: list[str]
    texts: list[str]
    correct: list[bool]
    lengths: list[int]


def memory_metrics(memory: ContextMemory, keys: list[str]) -> dict[str, float]:
    """rlsd's `memory/size` and `memory/hit_frac` (rows whose prompt has an entry), taken
    before the rollout is offered."""
    hits = sum(memory.get(key) is not None for key in keys)
    return {"memory/size": float(len(memory)), "memory/hit_frac": hits / max(len(keys), 1)}


def offer_rollout(
    memory: ContextMemory, rollout: Rollout, rewards: list[float], step: int
) -> dict[str, float]:
    """Offer the rollout's correct completions, in row order, with their total rewards;
    rlsd's `memory/stored` (how many were stored)."""
    stored = remember(
        memory, rollout.keys, rollout.texts, rewards, rollout.correct, rollout.lengths, step
    )
    return {"memory/stored": float(stored)}


def state_dict(sync_steps: list[int] | None, memory: ContextMemory | None) -> dict[str, Any]:
    """What `rlsd_state.json` holds: the sync teacher's steps and the memory's entries."""
    state: dict[str, Any] = {}
    if sync_steps is not None:
        state["sync_steps"] = list(sync_steps)
    if memory is not None:
        state["context_memory"] = memory.state_dict()
    return state


def write_state(folder: Path, state: dict[str, Any]) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")


def read_state(checkpoint: str, sync: bool) -> dict[str, Any]:
    """A checkpoint's `rlsd_state.json` ({} when there is none and no sync teacher needs it).
    A sync teacher needs its steps; a memory missing from it starts empty (a run that turns
    the memory on at a resume), as in rlsd's own restore."""
    path = Path(checkpoint) / STATE_FILE
    state = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if sync and "sync_steps" not in state:
        raise ConfigError(
            f"{checkpoint}: no sync teacher state in {STATE_FILE}; it was not saved by "
            "RLSDGRPOTrainer with rlsd_teacher_mode='sync', so its teacher copy cannot be "
            "restored"
        )
    return state
