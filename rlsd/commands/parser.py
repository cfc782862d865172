"""The `rlsd` argument parser: every command, its arguments and help (generated field help for
`rlsd train --help` included). `cli.py` dispatches the parsed commands."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from .. import __version__
from ..schema.config import help_rows


def fields_help() -> str:
    lines = ["config fields (set in YAML or override with --section.field VALUE):"]
    for key, default, text in help_rows():
        lines.append(f"  {key}  [default: {default}]")
        lines.extend(textwrap.wrap(text, 90, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlsd", description="Self-distilled RLVR training.")
    parser.add_argument("--version", action="version", version=f"rlsd {__version__}")
    sub = parser.add_subparsers(dest="command")
    common = argparse.ArgumentParser(add_help=False)  # options every command takes
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    add_training_commands(sub, common)
    add_probe_command(sub, common)
    add_result_commands(sub, common)
    return parser


def add_training_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """train, check-reward, eval."""
    train = sub.add_parser(
        "train",
        parents=[common],
        help="train a model (RLSD by default)",
        epilog=fields_help(),
        formatter_class=argparse.RawTextHelpFormatter,
        description="Train with the given YAML recipe (default: the CPU "
        "quick start, configs/quickstart.yaml) and dotted overrides.",
    )
    train.add_argument("config", nargs="?", help="YAML recipe")
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint, with its "
        "saved config (only steps, logging and checkpointing may change)",
    )
    train.add_argument(
        "--no-resume",
        action="store_true",
        help="refuse to continue a run whose directory already holds one "
        "(by default such a run is resumed)",
    )
    check = sub.add_parser(
        "check-reward",
        parents=[common],
        help="score the data set's own reference answers "
        "with the configured verifiers (should be ~100%%)",
        description="Score every record's reference answer, written where "
        "the configured extraction looks for it, with the configured "
        "verifiers. Exit code 1 below --min (a misconfigured verifier).",
    )
    check.add_argument("config", nargs="?", help="YAML recipe (default: the quick start)")
    check.add_argument("--limit", type=int, default=0, help="check only the first N records")
    check.add_argument("--min", type=float, default=0.99, help="required fraction (0.99)")
    ev = sub.add_parser(
        "eval", parents=[common], help="accuracy on held-out items: pass@1, pass@k, maj@k"
    )
    ev.add_argument("target", help="a run directory (its latest checkpoint) or a model")
    ev.add_argument(
        "config",
        nargs="?",
        help="YAML recipe for a plain model (default: quick start); a run directory brings its own",
    )
    ev.add_argument("--n", type=int, default=1, help="samples per item (k); 1 = greedy")
    ev.add_argument("--limit", type=int, default=128, help="items to evaluate")
    ev.add_argument(
        "--out", help="JSON result file (default: eval-<time>.json in the run directory or here)"
    )


def add_probe_command(sub: Any, common: argparse.ArgumentParser) -> None:
    probe = sub.add_parser(
        "probe",
        parents=[common],
        help="before training: does a teacher context separate correct from incorrect "
        "completions? (Delta, AUC, clipping, a verdict per context)",
        description="Sample completions of held-out prompts with the starting model and score "
        "them under each candidate teacher context; writes probe.json and probe.md.",
    )
    probe.add_argument("config", nargs="?", help="YAML recipe (default: the quick start)")
    probe.add_argument("--items", type=int, default=32, help="held-out prompts (32)")
    probe.add_argument(
        "--contexts",
        default="answer,solution,worked,sibling,memory",
        help="candidate contexts, comma-separated (answer, solution, worked, sibling, memory)",
    )
    probe.add_argument("--out", help="output directory (default: probe-<time> here)")
    warm = sub.add_parser(
        "sft",
        parents=[common],
        help="a supervised warm start on worked solutions (sft.steps, sft.lr); its "
        "RUN_DIR/model is what rlsd train --model.name takes",
        description="Cross-entropy on each record's solution after its prompt (prompt masked), "
        "with the recipe's data, model and LoRA; resumable like rlsd train.",
    )
    warm.add_argument("config", nargs="?", help="YAML recipe (default: the quick start)")


def add_result_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """report, compare, export, study, tasks."""
    report = sub.add_parser(
        "report",
        parents=[common],
        help="write RUN_DIR/report.html: curves and the per-token credit heat map",
    )
    report.add_argument("run_dir", help="a run directory")
    report.add_argument(
        "--screenshot",
        action="store_true",
        help="also write RUN_DIR/report.png with a headless Chromium",
    )
    compare = sub.add_parser(
        "compare",
        parents=[common],
        help="several runs side by side: curves (mean and band over "
        "seeds), final accuracy, time to a target, peak memory",
    )
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    compare.add_argument("--out", default="compare", help="output directory (./compare)")
    compare.add_argument(
        "--target",
        type=float,
        default=None,
        help="training accuracy to time (default: 0.9 x the best group's final "
        "training accuracy, stated in the table)",
    )
    export = sub.add_parser(
        "export",
        parents=[common],
        help="write a plain Hugging Face model directory (LoRA merged), tokenizer and model card",
    )
    export.add_argument("run_dir", help="a run directory")
    export.add_argument("--to", required=True, metavar="DIR", help="new output directory")
    export.add_argument(
        "--step",
        type=int,
        default=None,
        help="checkpoint step to export (default: the latest intact one)",
    )
    study = sub.add_parser(
        "study",
        parents=[common],
        help="run a grid of runs (tasks x methods x seeds, ablations), "
        "resumably, and summarise it with bootstrap intervals",
    )
    study.add_argument("study", help="study YAML (see configs/study-*.yaml)")
    study.add_argument(
        "--dry-run",
        action="store_true",
        help="print the grid, what is done and the time left; train nothing",
    )
    study.add_argument(
        "--summarize", action="store_true", help="only write the summary of the runs so far"
    )
    study.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="train N runs at once, each in its own process (default 1); "
        "a small model leaves most of a GPU idle, so N runs share one",
    )
    tasks = sub.add_parser("tasks", parents=[common], help="list the task sources and verifiers")
    tasks.add_argument("--all", action="store_true", help="list every reasoning-gym family")
