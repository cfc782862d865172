"""How much a newcomer reads to follow one training step.

    python benchmarks/reading_cost.py [ROOT]

The step's loop is the files of `rlsd/step/` that one `train_step` runs through (the recipe,
its records, the teacher pass, the update, the diagnostics and the run it needs); an older
checkout without the floor folders is read at its flat paths. Reported: the loop's size
(files, lines, characters), the rlsd modules those files import (each one is a file to open
to follow the step, one level deep), and the functions below the trainer that still take an
untyped `run`. Prints a Markdown table; CONTRIBUTING.md quotes its latest output.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LOOP = ("trainer", "sampling", "records", "scoring", "update", "diagnostics", "run")


def loop_files(root: Path) -> list[Path]:
    """The loop's files under the floor layout (rlsd/step/) or the older flat one (rlsd/)."""
    for folder in (root / "rlsd" / "step", root / "rlsd"):
        found = [folder / f"{name}.py" for name in LOOP if (folder / f"{name}.py").is_file()]
        if found:
            return found
    raise SystemExit(f"{root}: no rlsd/step/trainer.py or rlsd/trainer.py")


def imported_modules(path: Path, root: Path) -> set[str]:
    """The rlsd modules a file imports (relative imports resolved to dotted names)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            name = ".".join(p for p in (base, node.module or "") if p)
            out.add(name)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {name for name in out if name.startswith("rlsd")}


def untyped_run_parameters(path: Path) -> list[str]:
    """Functions whose `run` parameter is annotated `Any` (a dependency no import shows)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for arg in node.args.args:
                if arg.arg == "run" and ast.unparse(arg.annotation or ast.Constant(None)) == "Any":
                    found.append(f"{path.name}:{node.name}")
    return found


def measure(root: Path) -> dict[str, object]:
    files = loop_files(root)
    own = {".".join(f.relative_to(root).with_suffix("").parts) for f in files}
    imported = set().union(*(imported_modules(f, root) for f in files)) - own
    untyped = [
        name
        for f in files
        if f.stem != "trainer"  # the recipe itself holds the typed Run
        for name in untyped_run_parameters(f)
    ]
    return {
        "files": len(files),
        "lines": sum(len(f.read_text().splitlines()) for f in files),
        "characters": sum(len(f.read_text()) for f in files),
        "imported": sorted(imported),
        "untyped_run": untyped,
    }


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent.parent).resolve()
    m = measure(root)
    print("| the step's loop | |")
    print("|---|---|")
    print(f"| files | {m['files']} |")
    print(f"| lines | {m['lines']:,} |")
    print(f"| characters | {m['characters']:,} |")
    print(f"| rlsd modules they import (files to open next) | {len(m['imported'])} |")
    print(f"| functions below the recipe taking `run: Any` | {len(m['untyped_run'])} |")
    print()
    print("imported:", ", ".join(m["imported"]))
    if m["untyped_run"]:
        print("run: Any in:", ", ".join(m["untyped_run"]))


if __name__ == "__main__":
    main()
