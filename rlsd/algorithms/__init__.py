"""Pure functions of the training objective: tensors in, tensors and a metrics dict out.

Nothing here imports from the rest of rlsd. `method.py` says what each method is.

The names below are imported on first use (PEP 562), so that importing a torch-free module of
this package (`registry.py`: the config schema's choices and the method registry) does not load
torch; `from rlsd.algorithms import method_for` works as before.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "advantages": ("group_advantages", "group_outcomes", "mixed_groups"),
    "distill": ("opsd_token_advantages", "sampled_forward_token_advantages", "token_divergence"),
    "masking": ("masked", "teacher_gap"),
    "method": ("METHODS", "Method", "method_for"),
    "policy_loss": ("AGGREGATIONS", "aggregate", "clipped_policy_loss", "loss_normaliser"),
    "rlsd": (
        "credit_split",
        "lambda_at",
        "reweighted_tokens",
        "rlsd_credit",
        "rlsd_metrics",
        "rlsd_token_advantages",
    ),
    "spans": ("answer_span_mask", "reasoning_span_mask", "span_split", "token_pieces"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_HOME_OF)


def __getattr__(name: str) -> Any:
    """Import the module that defines `name` the first time it is asked for."""
    if name not in _HOME_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
