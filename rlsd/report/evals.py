"""Held-out results kept in a run directory, for `rlsd compare` and the report.

Two sources: `rlsd eval RUN_DIR` writes eval-<time>.json (pass@1, pass@k and maj@k of the latest
checkpoint on `--limit` items, its `model` naming the checkpoint), and training's own greedy
evaluation every `train.eval_every` steps writes evals.jsonl (per item) and `eval/pass@1` in
metrics.jsonl. A run's "final held-out pass@1" is the later of the two (a tie: `rlsd eval`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..engine.runfiles import read_jsonl

CHECKPOINT = re.compile(r"checkpoint-(\d+)\)?\s*$")  # `rlsd eval`: "RUN_DIR (checkpoint-N)"


def checkpoint_evals(run_dir: Path) -> list[dict]:
    """`rlsd eval RUN_DIR` results in run_dir (eval-*.json): pass@1, pass@k, maj@k, lenient@1,
    items and the checkpoint step evaluated (None when the file does not say), by checkpoint
    step, then by time; unreadable files are left out."""
    found = []
    for path in run_dir.glob("eval-*.json"):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
            k = int(result.get("samples_per_item", 1))
            entry = {"file": path.name, "pass@1": float(result["pass@1"]), "k": k}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        for name in (f"pass@{k}", f"maj@{k}", "lenient@1", "n_items", "items_from"):
            if name in result:
                entry[name] = result[name]
        step = CHECKPOINT.search(str(result.get("model", "")))
        entry["step"] = int(step.group(1)) if step else None
        entry["mtime"] = path.stat().st_mtime
        found.append(entry)
    return sorted(
        found, key=lambda e: (-1 if e["step"] is None else e["step"], e["mtime"], e["file"])
    )


def training_evals(run_dir: Path, rows: list[dict]) -> list[dict]:
    """Training's held-out evaluations (`train.eval_every`), oldest first: {step, pass@1,
    n_items}, from run_dir/evals.jsonl (per item) or, without it, the metrics rows."""
    path = run_dir / "evals.jsonl"
    by_step = {}
    if path.is_file():
        for row in read_jsonl(path):
            if isinstance(row.get("step"), int) and row.get("correct"):
                correct = row["correct"]
                by_step[row["step"]] = sum(map(bool, correct)) / len(correct), len(correct)
    if not by_step:
        for row in rows:
            if isinstance(row.get("eval/pass@1"), (int, float)):
                by_step[row["step"]] = row["eval/pass@1"], int(row.get("eval/items", 0))
    return [{"step": s, "pass@1": v, "n_items": n} for s, (v, n) in sorted(by_step.items())]


def describe_checkpoint_eval(ev: dict) -> str:
    where = f"checkpoint-{ev['step']}" if ev["step"] is not None else ev["file"]
    samples = f", {ev['k']} samples/item" if ev["k"] > 1 else ""
    items = f", {ev['n_items']} items" if "n_items" in ev else ""
    return f"rlsd eval of {where}{items}{samples}"


def describe_training_eval(ev: dict) -> str:
    items = f", {ev['n_items']} items" if ev["n_items"] else ""
    return f"training eval at step {ev['step']}{items}"


def latest_held_out(checkpoint: list[dict], trained: list[dict]) -> tuple[float, str] | None:
    """(pass@1, where it comes from) of the latest held-out evaluation: the last `rlsd eval`
    result or training's last evaluation, whichever is of the later step (a tie, or an
    `rlsd eval` whose step is unknown: `rlsd eval`); None without either."""
    last = trained[-1] if trained else None
    if checkpoint:
        ev = checkpoint[-1]
        if last is None or ev["step"] is None or ev["step"] >= last["step"]:
            return ev["pass@1"], describe_checkpoint_eval(ev)
    if last is None:
        return None
    return last["pass@1"], describe_training_eval(last)
