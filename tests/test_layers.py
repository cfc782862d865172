"""The package's floors: every module sits in the folder of its floor, imports point down (or
across one floor), never up, and no group of modules imports itself round in a circle, lazy
imports inside functions included. The config schema loads without torch."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "rlsd"

# Lowest first. A module may import from its own floor and the floors below it.
FLOORS = {
    "algorithms": 0,  # the pure math: tensors in, tensors and metrics out
    "schema": 1,  # the typed config: sections, loading, validation (no torch)
    "engine": 2,  # models, decoding, log-probs, teacher, sharding, data, verifiers, run files
    "step": 3,  # one training step as records, the loop, the run it needs
    "commands": 4,  # the command line and what it runs: probe, sft, study, export, check-reward
    "report": 4,  # plots, the HTML report, comparisons and study summaries
    "integrations": 4,  # RLSD inside TRL's GRPOTrainer
}
TOP_LEVEL = {"__init__", "__main__"}  # the package's own files: the version and `python -m rlsd`


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_of(p): p for p in PACKAGE.rglob("*.py")}


def resolve(name: str) -> str | None:
    """The rlsd module a dotted name lives in (a name imported from a module is in it)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path) -> set[str]:
    """The rlsd modules a file imports anywhere in it (inside functions too)."""
    package = module_of(path) if path.name == "__init__.py" else module_of(path).rpartition(".")[0]
    return imports_in(path.read_text(), package)


def imports_in(source: str, package: str) -> set[str]:
    """The rlsd modules some source in `package` imports, relative imports resolved, `from
    package import name` counted as the submodule when there is one."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            name = ".".join(p for p in (base, node.module or "") if p)
            targets = [resolve(f"{name}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [resolve(a.name) for a in node.names]
        else:
            continue
        out.update(t for t in targets if t and t.startswith("rlsd"))
    return out


def floor_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_module_sits_in_a_floor_folder():
    stray = [
        m
        for m, p in MODULES.items()
        if m != "rlsd" and floor_of(m) not in FLOORS and p.stem not in TOP_LEVEL
    ]
    assert not stray, f"modules outside the floor folders {sorted(FLOORS)}: {stray}"


def test_no_import_points_up():
    upward = []
    for module, path in MODULES.items():
        if module == "rlsd" or floor_of(module) not in FLOORS:
            continue
        mine = FLOORS[floor_of(module)]
        for target in imports_of(path):
            theirs = FLOORS.get(floor_of(target))
            if theirs is not None and theirs > mine:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point up a floor:\n" + "\n".join(sorted(upward))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def package_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports; a package's `__init__` re-exporting its own children
    is not an edge back into them (importing the package runs it first either way)."""
    graph = {}
    for module, path in MODULES.items():
        graph[module] = {
            t for t in imports_of(path) if t != module and not t.startswith(module + ".")
        }
    return graph


def test_no_import_cycle():
    assert cycles(package_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_sees_lazy_and_package_imports():
    """A lazy import inside a function is still an arrow; `from package import module` points
    at the module; a name imported from a module points at that module."""
    source = (
        "from ..step import trainer\n"
        "from .rollout import Batch\n"
        "def f():\n"
        "    from ..commands.cli import run\n"
    )
    assert imports_in(source, "rlsd.engine") == {
        "rlsd.step.trainer",
        "rlsd.engine.rollout",
        "rlsd.commands.cli",
    }


def test_the_config_schema_loads_without_torch():
    code = (
        "import sys; import rlsd.schema.config; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
