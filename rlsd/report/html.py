"""`rlsd report RUN_DIR`: one self-contained HTML file (inline CSS and images, no network).

The per-token credit heat map shows, for logged completions, what the teacher did to each token:
RLSD's multiplier m_t (green above 1: the token takes a larger share of its completion's update,
more credit if the completion was right, more blame if it was wrong; red below 1: a smaller
share) or the final token advantage A_t (green: pushed up, red: pushed down; the only view for
the distillation methods). A switch recolours the page (or open it as report.html#advantage);
hovering a token shows its values. The reward, the prompt and the teacher's privileged context
stand beside each completion. One short inline script, no network.

The header sums the run up (steps, method, final reward and accuracy, held-out pass@1, run time,
peak memory); the held-out section lists every `rlsd eval RUN_DIR` result in the run directory
(eval-*.json) and training's own evaluations (evals.jsonl).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..algorithms.method import method_for
from ..engine.runfiles import read_jsonl
from ..schema.config import load_config, to_yaml
from .compare import FINAL_WINDOW
from .evals import (
    checkpoint_evals,
    describe_checkpoint_eval,
    describe_training_eval,
    training_evals,
)
from .plots import curves_png


def token_color(value: float, centre: float, span: float) -> str:
    """Green above `centre`, red below, opacity by distance (full at `span`)."""
    strength = max(min((value - centre) / span, 1.0), -1.0) if span > 0 else 0.0
    rgb = "22,163,74" if strength >= 0 else "220,38,38"
    return f"rgba({rgb},{abs(strength):.3f})"


def heatmap_html(
    sample: dict, pieces: list[str], scales: dict[str, tuple[float, float]], key: str
) -> str:
    """One completion: a span per token carrying each credit value it has (data-m: RLSD
    multiplier, data-a: token advantage), coloured by `key`; hover shows the values."""
    spans = []
    for i, piece in enumerate(pieces):
        values = {name: sample[name][i] for name in scales if name in sample}
        tip = " · ".join(f"{LABELS[name]} {v:+.4f}" for name, v in values.items())
        attrs = "".join(f' data-{ATTR[name]}="{v:.5f}"' for name, v in values.items())
        centre, span = scales[key]
        spans.append(
            f'<span class="tok"{attrs} title="{html.escape(tip)}" '
            f'style="background:{token_color(values[key], centre, span)}">'
            f"{html.escape(piece)}</span>"
        )
    verdict = "correct" if sample.get("correct") else "incorrect"
    context = sample.get("teacher_prompt") or f"reference answer: {sample.get('answer', '')}"
    kind = CONTEXT_KINDS.get(sample.get("teacher_context_kind", "reference"), "")
    return (
        f'<div class="sample {verdict}"><div class="meta">step {sample["step"]} · '
        f"reward {sample['reward']:.3f} · advantage {sample['advantage']:+.3f} · {verdict}"
        f'</div><div class="prompt"><b>student saw</b> {html.escape(sample["prompt"])}</div>'
        f'<details class="ref"><summary><b>teacher also saw</b> ({kind}; '
        f"reference answer {html.escape(str(sample.get('answer', '')))})</summary>"
        f"{html.escape(str(context))}</details>"
        f'<div class="tokens">{"".join(spans)}</div></div>'
    )


CONTEXT_KINDS = {  # what each teacher.context source showed the teacher
    "reference": "privileged context: the reference",
    "sibling": "privileged context: a correct sibling from the same group",
    "memory": "privileged context: a remembered earlier success",
    "none": "no context: no correct sibling or memory, credit left uniform",
}
LABELS = {"credit_multiplier": "teacher weight m_t", "token_advantage": "final advantage A_t"}
ATTR = {"credit_multiplier": "m", "token_advantage": "a"}
SCRIPT = """
function tint(v, c, s) {
  var k = s > 0 ? Math.max(Math.min((v - c) / s, 1), -1) : 0;
  return 'rgba(' + (k >= 0 ? '22,163,74' : '220,38,38') + ',' + Math.abs(k).toFixed(3) + ')';
}
function colourBy(attr) {
  var scale = SCALES[attr];
  document.querySelectorAll('.tok').forEach(function (t) {
    t.style.background = tint(parseFloat(t.dataset[attr]), scale[0], scale[1]);
  });
  document.querySelectorAll('input[name=colour]').forEach(function (r) {
    r.checked = r.value === attr;
  });
  document.getElementById('scale').textContent = scale[2];
}
document.querySelectorAll('input[name=colour]').forEach(function (r) {
  r.addEventListener('change', function () { colourBy(r.value); });
});
var wanted = location.hash.slice(1) === 'advantage' ? 'a' : null;
if (wanted && SCALES[wanted]) colourBy(wanted);
"""


def credit_scales(cfg: Any, samples: list[dict]) -> dict[str, tuple[float, float]]:
    """(centre, full-colour distance) per credit key: the multiplier around 1 at its clip range
    lambda * eps_w; the advantage around 0 at the largest |A_t| logged."""
    scales = {}
    bound = method_for(cfg).multiplier_bound
    if bound is not None:
        scales["credit_multiplier"] = (1.0, bound)
    biggest = max((abs(v) for s in samples for v in s.get("token_advantage", [])), default=0.0)
    scales["token_advantage"] = (0.0, biggest or 1.0)
    return scales


def pick_samples(samples: list[dict], key: str, per_group: int = 3) -> list[dict]:
    """Correct and incorrect completions with credit, from the first, middle and last step."""
    with_credit = [s for s in samples if key in s]
    steps = sorted({s["step"] for s in with_credit})
    chosen_steps = sorted({steps[0], steps[len(steps) // 2], steps[-1]}) if steps else []
    picked = []
    for step in chosen_steps:
        for correct in (True, False):
            group = [s for s in with_credit if s["step"] == step and bool(s["correct"]) == correct]
            picked += group[:per_group]
    return picked


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text each token adds to the completion: the difference between the decoded prefixes,
    so a character split over several byte-level tokens shows, whole, on the token that
    completes it (the others are empty, drawn as a thin block)."""
    pieces, previous = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=False)
        if not text.startswith(previous):  # the tokenizer rewrote the prefix: fall back
            pieces.append(tokenizer.decode([ids[i]], skip_special_tokens=False))
            previous = text
        elif text.endswith("\ufffd"):  # an unfinished character: wait for its last byte
            pieces.append("")
        else:
            pieces.append(text[len(previous) :])
            previous = text
    return pieces


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#111;max-width:1200px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
.sample{border:1px solid #ddd;border-radius:6px;padding:8px 10px;margin:10px 0}
.sample.correct{border-left:4px solid #16a34a}.sample.incorrect{border-left:4px solid #dc2626}
.meta{font-size:12px;color:#555}.prompt,.ref{font-size:12px;margin:3px 0;white-space:pre-wrap}
.tokens{font-family:ui-monospace,monospace;white-space:pre-wrap;margin-top:6px}
.tok{border-radius:2px}.tok:empty{padding:0 2px}
.legend span{padding:1px 6px;margin-right:6px;border-radius:2px}
.legend label{margin-right:10px}details.ref summary{cursor:pointer}
pre{background:#f6f6f6;padding:10px;overflow:auto;font-size:12px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:2px 8px}
th{text-align:left;background:#f6f6f6}img{max-width:100%}
"""


def legend_html(scales: dict[str, tuple[float, float]], key: str) -> str:
    """The colour key and, when a run has both credit values, a switch between them."""
    centre, span = scales[key]
    switch = "".join(
        f'<label><input type="radio" name="colour" value="{ATTR[name]}"'
        f"{' checked' if name == key else ''}> {LABELS[name]}</label> "
        for name in scales
    )
    return (
        f'<p class="legend">{"colour by: " + switch if len(scales) > 1 else ""}'
        f'<span style="background:{token_color(centre + span, centre, span)}">larger share'
        f'</span><span style="background:{token_color(centre - span, centre, span)}">smaller '
        f'share</span><span id="scale">{scale_text(key, centre, span)}</span><br>'
        f"<small>m_t: a token's share of its completion's update (more credit in a correct "
        f"completion, more blame in an incorrect one); A_t: the signed push on the token "
        f"(green up, red down).</small></p>"
    )


def scale_text(key: str, centre: float, span: float) -> str:
    return f"{LABELS[key]}: full colour at {centre:g} ± {span:.4g}"


def duration(seconds: float) -> str:
    """4 h 2 min, 13 min 20 s, 42 s."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def final_figures(rows: list[dict], metric: str) -> str | None:
    """ "0.250 at step 30 (0.213 over the last 5 steps)" for a metric, or None."""
    points = [(r["step"], r[metric]) for r in rows if isinstance(r.get(metric), (int, float))]
    if not points:
        return None
    tail = [v for _, v in points[-FINAL_WINDOW:]]
    return (
        f"{points[-1][1]:.3f} at step {points[-1][0]} "
        f"({sum(tail) / len(tail):.3f} over the last {len(tail)} steps)"
    )


def summary_rows(
    cfg: Any, rows: list[dict], checkpoint: list[dict], trained: list[dict]
) -> list[tuple[str, str]]:
    """The report's header as (name, value) pairs: steps, method, final reward and accuracy,
    held-out pass@1, run time and peak memory; figures the run lacks are left out."""
    last = rows[-1] if rows else {}
    out = [
        ("steps", f"{last.get('step', 0)} of {cfg.train.steps} ({len(rows)} logged)"),
        ("method", f"{cfg.algorithm.name} on {cfg.model.name}"),
    ]
    for name, metric in (("final reward", "reward/mean"), ("final accuracy", "reward/accuracy")):
        if text := final_figures(rows, metric):
            out.append((name, text))
    held = [f"{e['pass@1']:.3f} ({describe_checkpoint_eval(e)})" for e in checkpoint[-1:]]
    held += [f"{e['pass@1']:.3f} ({describe_training_eval(e)})" for e in trained[-1:]]
    if held:
        out.append(("held-out pass@1", "; ".join(held)))
    steps = sum(r.get("perf/step_seconds", 0.0) for r in rows)
    evals = sum(r.get("eval/seconds", 0.0) for r in rows)
    if steps:
        out.append(
            (
                "run time",
                duration(steps) + (f" of steps + {duration(evals)} of evaluation" if evals else ""),
            )
        )
    mems = [
        r["perf/peak_mem_mb"] for r in rows if isinstance(r.get("perf/peak_mem_mb"), (int, float))
    ]
    if mems:
        scope = " (whole process)" if last.get("perf/peak_mem_scope") == "process" else ""
        out.append(("peak memory", f"{max(mems):.0f} MB{scope}"))
    return out


def evals_html(checkpoint: list[dict], trained: list[dict]) -> str:
    """The held-out results: each `rlsd eval` result and training's evaluations."""
    if not checkpoint and not trained:
        return (
            "<p>No held-out evaluation yet: <code>rlsd eval RUN_DIR</code> evaluates the "
            "latest checkpoint, <code>train.eval_every</code> evaluates during training.</p>"
        )
    parts = []
    if checkpoint:
        cells = []
        for e in checkpoint:
            k = e["k"]
            extra = f"pass@{k} {e[f'pass@{k}']:.3f}, maj@{k} {e[f'maj@{k}']:.3f}" if k > 1 else ""
            cells.append(
                [
                    e["file"],
                    "?" if e["step"] is None else str(e["step"]),
                    f"{e.get('n_items', '?')} ({e.get('items_from', '?')})",
                    "greedy" if k == 1 else str(k),
                    f"{e['pass@1']:.3f}",
                    extra or "-",
                    f"{e['lenient@1']:.3f}" if "lenient@1" in e else "-",
                ]
            )
        head = ["file", "checkpoint step", "items", "samples", "pass@1", "pass@k, maj@k"]
        parts.append(
            "<p><code>rlsd eval RUN_DIR</code>:</p>" + table_html([*head, "lenient@1"], cells)
        )
    if trained:
        cells = [[str(e["step"]), f"{e['pass@1']:.3f}", str(e["n_items"] or "?")] for e in trained]
        parts.append(
            "<p>During training (<code>train.eval_every</code>, greedy):</p>"
            + table_html(["step", "pass@1", "items"], cells)
        )
    return "".join(parts)


def table_html(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table>{''.join(f'<th>{html.escape(c)}</th>' for c in head)}{cells}</table>"


def write_report(run_dir: Path, tokenizer: Any = None, out: Path | None = None) -> Path:
    """Write the report (run_dir/report.html unless `out`) and return its path."""
    cfg = load_config(run_dir / "config.yaml", saved=True)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    samples_file = run_dir / "samples.jsonl"
    samples = read_jsonl(samples_file) if samples_file.is_file() else []
    key = "credit_multiplier" if method_for(cfg).reweights else "token_advantage"
    if tokenizer is None:
        from transformers import AutoTokenizer

        from ..engine.models import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(
            resolve_model_path(cfg.model.name), local_files_only=True
        )
    picked = pick_samples(samples, key)
    scales = credit_scales(cfg, picked)
    maps = (
        "".join(
            heatmap_html(s, token_pieces(tokenizer, s["token_ids"]), scales, key) for s in picked
        )
        or "<p>No logged completion carries per-token credit.</p>"
    )
    for_js = {ATTR[k]: [c, w, scale_text(k, c, w)] for k, (c, w) in scales.items()}
    checkpoint, trained = checkpoint_evals(run_dir), training_evals(run_dir, rows)
    header = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>"
        for name, value in summary_rows(cfg, rows, checkpoint, trained)
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>rlsd report: "
        f"{html.escape(run_dir.name)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(run_dir.name)} · {cfg.algorithm.name}</h1>"
        f'<table class="summary">{header}</table>'
        f"<h2>Learning curves</h2>"
        + (f'<img alt="learning curves" src="{curves_png(rows, checkpoint)}">' if rows else "")
        + f'<h2 id="evals">Held-out evaluation</h2>{evals_html(checkpoint, trained)}'
        + '<h2 id="heatmap">What the teacher did to each token</h2>'
        + f"{legend_html(scales, key)}{maps}"
        f"<h2>Config</h2><pre>{html.escape(to_yaml(cfg))}</pre>"
        f"<script>var SCALES = {json.dumps(for_js)};{SCRIPT}</script></body></html>"
    )
    out = out or run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
