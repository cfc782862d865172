"""Every built-in verifier says where it runs, and the reward modules import one way.

A built-in that read model output in the trainer's threads by omission would be a hole in the
isolation (`test_verifier_isolation.py`): building a scorer refuses any built-in that
`builtin.REGISTRY` does not place as CONFINED or IN_PROCESS. The reward modules form no import
cycle (`combine` -> `isolation` -> `worker` -> `loading` -> `builtin`), and the config schema does
not import them.
"""

import ast
from pathlib import Path

import pytest

from rlsd.engine.rewards import BUILTIN, build_reward
from rlsd.engine.rewards.builtin import (
    CONFINED,
    IN_PROCESS,
    REGISTRY,
    RegistryError,
    check_registry,
    exact,
    placement,
)
from rlsd.schema.config import RewardConfig

PACKAGE = Path(__file__).parent.parent / "rlsd"
REWARDS = PACKAGE / "engine" / "rewards"
CONFINED_TODAY = {"math", "regex", "reasoning_gym"}  # parse or evaluate model output


def test_confined_and_in_process_partition_the_builtins_as_before():
    check_registry()
    confined = {name for name in BUILTIN if placement(name) == CONFINED}
    in_process = {name for name in BUILTIN if placement(name) == IN_PROCESS}
    assert confined | in_process == set(BUILTIN) == set(REGISTRY)
    assert not confined & in_process
    assert confined == CONFINED_TODAY
    assert in_process == {"exact", "numeric", "choice", "format", "code"}


@pytest.mark.parametrize("verifiers", [["new_one"], ["exact"]])
def test_a_builtin_registered_without_a_placement_is_refused(monkeypatch, verifiers):
    """Added to BUILTIN alone: refused when any scorer is built, used or not."""
    monkeypatch.setitem(BUILTIN, "new_one", exact)
    with pytest.raises(RegistryError, match="'new_one' does not say where it runs"):
        check_registry()
    with pytest.raises(RegistryError, match="REGISTRY in rlsd/engine/rewards/builtin.py"):
        build_reward(RewardConfig(verifiers=verifiers))


def test_a_builtin_placed_as_neither_is_refused(monkeypatch):
    monkeypatch.setitem(REGISTRY, "exact", (exact, "threads"))
    with pytest.raises(RegistryError, match="'exact' does not say .* \\(got 'threads'\\)"):
        build_reward(RewardConfig(verifiers=["numeric"]))


def imports_of(path: Path) -> set[str]:
    """The rlsd modules `path` imports, at the top or inside functions, as dotted names."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names = [f"{module}.{a.name}" for a in node.names] if not node.module else [module]
            found.update(n for n in names if n.startswith("rlsd"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("rlsd"))
    return found


def test_the_reward_modules_import_one_way():
    graph = {
        f"rlsd.engine.rewards.{p.stem}": {
            m for m in imports_of(p) if m.startswith("rlsd.engine.rewards.")
        }
        for p in REWARDS.glob("*.py")
        if p.stem != "__init__"
    }

    def reaches(start: str, seen: tuple[str, ...]) -> None:
        for module in graph.get(start, ()):
            assert module not in seen, f"import cycle: {' -> '.join((*seen, module))}"
            reaches(module, (*seen, module))

    for module in graph:
        reaches(module, (module,))
    lower = ("isolation", "worker", "loading", "builtin", "sandbox", "confine")
    for name in lower:
        assert "rlsd.engine.rewards.combine" not in graph[f"rlsd.engine.rewards.{name}"]
    assert "rlsd.engine.rewards.loading" in graph["rlsd.engine.rewards.worker"]


def test_the_config_schema_does_not_import_the_verifiers():
    schema = sorted((PACKAGE / "schema").glob("*.py"))
    assert schema  # the check reads the schema's files at all
    for path in schema:
        assert not {m for m in imports_of(path) if m.startswith("rlsd.engine.rewards")}, path
