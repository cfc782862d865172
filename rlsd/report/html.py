"""`rlsd report RUN_DIR`: one self-contained HTML file (inline CSS and images, no network).

The per-token credit heat map shows, for logged completions, what the teacher did to each token:
RLSD's multiplier m_t (green above 1: the teacher endorses the token, more credit; red below 1:
less), or for distillation methods the token advantage. Hovering a token shows its values. The
reward, the reference answer the teacher saw and the prompt stand beside each completion.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..config import load_config, to_yaml
from ..tracking import read_jsonl
from .plots import curves_png


def token_color(value: float, centre: float, span: float) -> str:
    """Green above `centre`, red below, opacity by distance (full at `span`)."""
    strength = max(min((value - centre) / span, 1.0), -1.0) if span > 0 else 0.0
    rgb = "22,163,74" if strength >= 0 else "220,38,38"
    return f"rgba({rgb},{abs(strength):.3f})"


def heatmap_html(sample: dict, pieces: list[str], key: str, centre: float, span: float) -> str:
    values = sample[key]
    spans = []
    for piece, value in zip(pieces, values):
        tip = f"{key} = {value:.4f}"
        spans.append(f'<span class="tok" data-v="{value:.4f}" title="{html.escape(tip)}" '
                     f'style="background:{token_color(value, centre, span)}">'
                     f"{html.escape(piece)}</span>")
    verdict = "correct" if sample.get("correct") else "incorrect"
    return (f'<div class="sample {verdict}"><div class="meta">step {sample["step"]} · '
            f'reward {sample["reward"]:.3f} · advantage {sample["advantage"]:+.3f} · {verdict}'
            f'</div><div class="prompt"><b>prompt</b> {html.escape(sample["prompt"])}</div>'
            f'<div class="ref"><b>teacher saw the reference</b> '
            f'{html.escape(str(sample.get("answer", "")))}</div>'
            f'<div class="tokens">{"".join(spans)}</div></div>')


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
    """The text of each token as it appears in the completion (decoded one by one)."""
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#111;max-width:1200px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
.sample{border:1px solid #ddd;border-radius:6px;padding:8px 10px;margin:10px 0}
.sample.correct{border-left:4px solid #16a34a}.sample.incorrect{border-left:4px solid #dc2626}
.meta{font-size:12px;color:#555}.prompt,.ref{font-size:12px;margin:3px 0;white-space:pre-wrap}
.tokens{font-family:ui-monospace,monospace;white-space:pre-wrap;margin-top:6px}
.tok{border-radius:2px}.legend span{padding:1px 6px;margin-right:6px;border-radius:2px}
pre{background:#f6f6f6;padding:10px;overflow:auto;font-size:12px}
"""


def write_report(run_dir: Path, tokenizer: Any = None) -> Path:
    """Write run_dir/report.html and return its path."""
    cfg = load_config(run_dir / "config.yaml")
    rows = read_jsonl(run_dir / "metrics.jsonl")
    samples_file = run_dir / "samples.jsonl"
    samples = read_jsonl(samples_file) if samples_file.is_file() else []
    rlsd = cfg.algorithm.name == "rlsd"
    key = "credit_multiplier" if rlsd else "token_advantage"
    centre, span = (1.0, cfg.rlsd.lambda_ * cfg.rlsd.eps_w) if rlsd else (0.0, 1.0)
    if tokenizer is None:
        from transformers import AutoTokenizer

        from ..models import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name),
                                                  local_files_only=True)
    picked = pick_samples(samples, key)
    maps = "".join(heatmap_html(s, token_pieces(tokenizer, s["token_ids"]), key, centre, span)
                   for s in picked) or "<p>No logged completion carries per-token credit.</p>"
    legend = (f'<p class="legend"><span style="background:{token_color(centre + span, centre, span)}">'
              f'more credit</span><span style="background:{token_color(centre - span, centre, span)}">'
              f"less credit</span>colour = {key}, full at {centre} ± {span:g}</p>")
    last = rows[-1] if rows else {}
    summary = json.dumps({k: last[k] for k in ("step", "reward/mean", "reward/accuracy")
                          if k in last})
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>rlsd report: "
            f"{html.escape(run_dir.name)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(run_dir.name)} · {cfg.algorithm.name}</h1>"
            f"<p>{len(rows)} steps; last: {html.escape(summary)}</p>"
            f"<h2>Learning curves</h2>"
            + (f'<img alt="learning curves" src="{curves_png(rows)}">' if rows else "")
            + f"<h2>What the teacher did to each token</h2>{legend}{maps}"
            f"<h2>Config</h2><pre>{html.escape(to_yaml(cfg))}</pre></body></html>")
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
