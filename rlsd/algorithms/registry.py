"""What the config schema may know of the algorithms without importing torch.

- The plain choices: group baselines, std estimators and loss aggregations (`advantages.py` and
  `policy_loss.py` check their arguments against these same tuples: one list each).
- The registry of methods, `METHODS` (name -> class). `method.py` fills it: every subclass of
  `Method` that sets its own `name` registers itself when its class is defined, so adding a
  method never means editing a second table. The dict is the one `method.METHODS` re-exports.

This module imports nothing (torch included), so `rlsd.schema.config` can import it at no cost. The
registry holds the built-in methods only once `method.py` has been imported: `methods()`
imports it first, which is what the config's choices, help and validation call (they then
load torch, lazily). `method_sections()` reads the registry as it stands, since a method that
adds a config section of its own (`Method.config_section`) has imported `method.py` to subclass
`Method`.
"""

from __future__ import annotations

import importlib
import keyword
from typing import Any

BASELINES = ("mean", "leave_one_out")
STD_ESTIMATORS = ("unbiased", "population")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "constant")

METHODS: dict[str, Any] = {}  # name -> Method subclass, in the order they were defined


def register(kind: Any) -> None:
    """Add a method class to the registry; a name may be registered once."""
    name = kind.name
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise TypeError(f"{kind.__qualname__}.name: {name!r} is not a valid method name")
    if name in METHODS and METHODS[name] is not kind:
        raise TypeError(
            f"{kind.__qualname__}.name: method {name!r} is already registered by "
            f"{METHODS[name].__module__}.{METHODS[name].__qualname__}"
        )
    METHODS[name] = kind


def methods() -> dict[str, Any]:
    """Every registered method, the built-ins included (imports `method.py`, hence torch)."""
    importlib.import_module(".method", __package__)
    return METHODS


def method_sections() -> dict[str, type]:
    """Config sections that registered methods add to the schema: the method's name -> the
    dataclass of its fields (`Method.config_section`, set in the class itself: a subclass reads
    its parent's section and adds none). Imports nothing."""
    own = {name: vars(kind).get("config_section") for name, kind in METHODS.items()}
    return {name: section for name, section in own.items() if section is not None}
