"""A self-contained HTML influence report: images as PNG data URIs, histograms as inline SVG, no scripts,
no external files or network."""

from __future__ import annotations

import datetime
import html
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from ..results import InfluenceResults
from .content import HARMFUL, HELPFUL, SIGN_CONVENTION, SUSPECTS, Entry, QueryView
from .previews import ExampleCatalog
from .scalars import diagnostic_scalars

__all__ = ["render_html", "write_html", "histogram_svg"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:16px 24px;color:#1d2330;background:#fff}
h1{margin:.2em 0}h2{border-bottom:2px solid #e3e6ec;padding-bottom:4px;margin-top:1.6em}
.sign{background:#f4f6fa;border-left:4px solid #5b6b8c;padding:8px 12px;margin:8px 0}
nav a{margin-right:14px}
.query{border:1px solid #e3e6ec;border-radius:8px;padding:12px;margin:14px 0}
.qhead{display:flex;gap:16px;align-items:center}
.qhead .facts{font-size:15px}
h3{font-size:15px;margin:12px 0 6px}
h3.helpful{color:#1b7a3d}h3.harmful{color:#b3261e}h3.suspects{color:#8a5a00}
.examples{display:flex;flex-wrap:wrap;gap:10px}
figure.example{margin:0;padding:6px;border-radius:6px;border:1px solid #e3e6ec;width:120px;text-align:center;font-size:12px}
figure.helpful{background:#eef8f1}figure.harmful{background:#fcefee}figure.self_influence{background:#fdf6e7}
figcaption{margin-top:4px;line-height:1.35}
img.preview{image-rendering:pixelated;border:1px solid #ccd}
.preview.text{font-family:ui-monospace,monospace;font-size:11px;word-break:break-all;text-align:left;max-height:6em;overflow:hidden}
table.kv{border-collapse:collapse;font-size:13px}table.kv td{border:1px solid #e3e6ec;padding:3px 8px;vertical-align:top}
table.kv td:first-child{font-family:ui-monospace,monospace;color:#445}
.muted{color:#667}
svg text{font-family:system-ui,sans-serif}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def histogram_svg(
    values: torch.Tensor,
    title: str,
    bins: int = 60,
    width: int = 640,
    height: int = 220,
    css_id: Optional[str] = None,
    signed: bool = True,
) -> str:
    """An inline SVG histogram of ``values`` (counts on a log scale). With ``signed``, bars below zero are
    green (helpful) and above zero red (harmful)."""
    v = values.detach().reshape(-1).double().cpu()
    v = v[torch.isfinite(v)]
    pad_l, pad_r, pad_t, pad_b = 48, 12, 26, 40
    iw, ih = width - pad_l - pad_r, height - pad_t - pad_b
    ident = f' id="{css_id}"' if css_id else ""
    parts = [
        f'<svg class="histogram"{ident} xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{pad_l}" y="16" font-size="13">{html.escape(title)} ({v.numel()} values; count, log scale)</text>',
    ]
    if v.numel() == 0:
        parts.append(f'<text x="{pad_l}" y="{pad_t + ih / 2}" font-size="12">no finite values</text></svg>')
        return "".join(parts)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(v, bins=bins, min=lo, max=hi)
    top = math.log1p(float(counts.max()))
    bw = iw / bins
    for b, c in enumerate(counts.tolist()):
        if c <= 0:
            continue
        h = ih * math.log1p(c) / top
        centre = lo + (b + 0.5) * (hi - lo) / bins
        colour = ("#2e9e5b" if centre < 0 else "#d0453b") if signed else "#5b6b8c"
        parts.append(
            f'<rect x="{pad_l + b * bw:.2f}" y="{pad_t + ih - h:.2f}" width="{max(bw - 1, 0.5):.2f}" height="{h:.2f}" '
            f'fill="{colour}"><title>[{lo + b * (hi - lo) / bins:.4g}, {lo + (b + 1) * (hi - lo) / bins:.4g}): {int(c)}</title></rect>'
        )
    base = pad_t + ih
    parts.append(f'<line x1="{pad_l}" y1="{base}" x2="{pad_l + iw}" y2="{base}" stroke="#445"/>')
    parts.append(f'<text x="{pad_l}" y="{base + 16}" font-size="11" text-anchor="start">{lo:.4g}</text>')
    parts.append(f'<text x="{pad_l + iw}" y="{base + 16}" font-size="11" text-anchor="end">{hi:.4g}</text>')
    if lo < 0 < hi:
        x0 = pad_l + iw * (0 - lo) / (hi - lo)
        parts.append(f'<line x1="{x0:.2f}" y1="{pad_t}" x2="{x0:.2f}" y2="{base}" stroke="#445" stroke-dasharray="3,3"/>')
        parts.append(f'<text x="{x0:.2f}" y="{base + 16}" font-size="11" text-anchor="middle">0</text>')
    if signed:
        parts.append(
            f'<text x="{pad_l}" y="{base + 32}" font-size="11" fill="#2e9e5b">◀ helpful (negative)</text>'
            f'<text x="{pad_l + iw}" y="{base + 32}" font-size="11" fill="#d0453b" text-anchor="end">harmful (positive) ▶</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _example_figure(entry: Entry, catalog: ExampleCatalog) -> str:
    label = catalog.label(entry.train_id)
    lines = [f"train #{entry.train_id}"]
    if label is not None:
        lines.append(f"label {html.escape(_fmt(label))}")
    if entry.kind == "self_influence":
        lines.append(f"self-influence {_fmt(entry.score)}")
    else:
        lines.append(f"score {_fmt(entry.score)}")
        lines.append(f"Δloss on removal {entry.delta_loss:+.3g}")
    return (
        f'<figure class="example {entry.kind}" data-train-id="{entry.train_id}" data-score="{entry.score!r}" '
        f'data-rank="{entry.rank}">{catalog.preview(entry.train_id).to_html(f"train #{entry.train_id}")}'
        f'<figcaption>{"<br>".join(lines)}</figcaption></figure>'
    )


def _query_section(view: QueryView, train: ExampleCatalog, query: ExampleCatalog) -> str:
    label = query.label(view.query_id)
    if label is None:
        label = view.target
    facts = [f"<b>Query #{view.query_id}</b>"]
    if label is not None:
        facts.append(f"label {html.escape(_fmt(label))}")
    if view.prediction is not None:
        facts.append(f"predicted {html.escape(_fmt(view.prediction))}")
    facts.append(f"loss {_fmt(view.loss)}")
    out = [
        f'<article class="query" id="query-{view.query_id}" data-query-id="{view.query_id}">',
        f'<div class="qhead">{query.preview(view.query_id).to_html(f"query #{view.query_id}", size=96)}'
        f'<div class="facts">{" · ".join(facts)}</div></div>',
    ]
    for kind, title, entries in (("helpful", HELPFUL, view.helpful), ("harmful", HARMFUL, view.harmful)):
        out.append(f'<h3 class="{kind}">Top {len(entries)} {html.escape(title)}</h3>')
        out.append(f'<div class="examples {kind}">{"".join(_example_figure(e, train) for e in entries)}</div>')
    out.append("</article>")
    return "".join(out)


def _kv_table(items: Dict[str, Any], css_id: str) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v) if not isinstance(v, (list, tuple)) else ', '.join(map(_fmt, v)))}</td></tr>"
        for k, v in items.items()
    )
    return f'<table class="kv" id="{css_id}">{rows}</table>'


def render_html(
    results: InfluenceResults,
    views: Sequence[QueryView],
    suspects: Sequence[Entry],
    train: ExampleCatalog,
    query: ExampleCatalog,
    title: str = "Influence report",
    links: Optional[Dict[str, str]] = None,
) -> str:
    """The report as one HTML string: queries with previews and their top helpful / harmful examples,
    score histograms, self-influence suspects, settings, timings and diagnostics."""
    s = results.settings
    head = (
        f"{results.num_queries} queries × {results.num_train} training examples · solver {html.escape(str(s.get('solver')))}"
        f" · damping λ={_fmt(results.damping)} · {results.wall_time:.2f} s"
    )
    parts: List[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{html.escape(title)}</h1><p>{head}</p>",
        f'<p class="sign" id="sign-convention">{html.escape(SIGN_CONVENTION)}</p>',
        '<nav><a href="#queries">Queries</a><a href="#histograms">Score distribution</a>'
        '<a href="#self-influence">Self-influence</a><a href="#settings">Settings</a></nav></header>',
        f'<section id="queries"><h2>Queries</h2>',
    ]
    if not views:
        parts.append('<p class="muted">No queries.</p>')
    parts.extend(_query_section(v, train, query) for v in views)
    parts.append("</section>")

    parts.append('<section id="histograms"><h2>Score distribution</h2>')
    parts.append(histogram_svg(results.scores, "Influence scores, all queries × training examples", css_id="score-histogram"))
    if results.self_influence is not None:
        parts.append(histogram_svg(results.self_influence, "Self-influence", css_id="self-influence-histogram", signed=False))
    parts.append("</section>")

    parts.append(f'<section id="self-influence"><h2>Self-influence suspects</h2>')
    if suspects:
        parts.append(f'<h3 class="suspects">Top {len(suspects)} training examples by {html.escape(SUSPECTS)}</h3>')
        parts.append(f'<div class="examples self_influence">{"".join(_example_figure(e, train) for e in suspects)}</div>')
    else:
        parts.append(
            '<p class="muted">Self-influence was not computed (pass self_influence=True to InfluenceCallback).</p>'
        )
    parts.append("</section>")

    parts.append('<section id="settings"><h2>Settings</h2>')
    parts.append(_kv_table(dict(s), "settings-table"))
    parts.append("<h3>Timings (seconds)</h3>")
    parts.append(_kv_table({k: float(v) for k, v in results.timings.items()}, "timings-table"))
    diags = {k.replace("influence/diagnostics/", ""): v for k, v in diagnostic_scalars(results).items()}
    if diags:
        parts.append("<h3>Solver diagnostics</h3>")
        parts.append(_kv_table(diags, "diagnostics-table"))
    if links:
        parts.append("<h3>Files</h3>")
        parts.append(_kv_table(links, "links-table"))
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    parts.append(f'<p class="muted">Written by lightning-influence on {stamp}.</p></section></body></html>')
    return "\n".join(parts)


def write_html(path: Union[str, os.PathLike], text: str) -> str:
    """Write ``text`` to ``path`` (creating its folder); returns the path."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path
