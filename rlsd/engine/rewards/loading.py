"""The verifiers' lowest floor: finding a verifier's function by name, and the TIMEOUT marker.

Both sides of the verifier pools need these: the trainer (`combine.py`, `isolation.py`) and
each worker process (`worker.py`), which loads its verifiers by name. Imports among the reward
modules point one way, `combine` -> `isolation` -> `worker` -> `loading` -> `builtin`, so this
module imports none of the ones above it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from .builtin import BUILTIN

TIMEOUT = object()  # marks a call that ran out of time


def config_error(message: str) -> Exception:
    """A ConfigError (imported here, when one is raised: the config module loads torch, which
    worker processes, importing this module, do without)."""
    from ...schema.config import ConfigError

    return ConfigError(message)


def load_verifier(name: str) -> Callable:
    """The function of a `reward.verifiers` entry: a built-in by name, else `load_callable`."""
    return BUILTIN[name] if name in BUILTIN else load_callable(name)


def load_callable(spec: str) -> Callable:
    """A function from 'package.module:name' or 'path/to/file.py:name'."""
    if ":" not in spec:
        raise config_error(
            f"reward.verifiers: {spec!r} is neither a built-in verifier "
            f"({', '.join(BUILTIN)}) nor 'module:function'"
        )
    target, name = spec.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise config_error(f"reward.verifiers: file not found: {path}")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as exc:
        raise config_error(f"reward.verifiers: cannot import {target!r}: {exc}") from None
    except SyntaxError as exc:  # in the verifier's file or in a module it imports
        where = f"{exc.filename}:{exc.lineno}" if exc.filename else target
        raise config_error(
            f"reward.verifiers: {where}: syntax error: {exc.msg} (loading {target!r})"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise config_error(f"reward.verifiers: {target!r} has no function {name!r}")
    return fn
