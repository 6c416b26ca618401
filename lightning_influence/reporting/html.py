"""A self-contained HTML influence report: images as PNG data URIs, histograms as inline SVG, no scripts,
no external files or network."""

from __future__ import annotations

import datetime
import html
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..results import InfluenceResults
from .content import (
    HARMFUL, HELPFUL, NORM_HISTORY, SIGN_CONVENTION, SUSPECTS, Entry, NormSeries, QueryView, norm_series,
)
from .previews import ExampleCatalog
from .scalars import diagnostic_scalars

__all__ = ["render_html", "write_html", "histogram_svg", "norm_history_svg"]

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
table.grid{border-collapse:collapse;font-size:13px;margin:6px 0}table.grid th,table.grid td{border:1px solid #e3e6ec;padding:3px 8px;text-align:right}
table.grid th{background:#f4f6fa}table.kv td.note{font-family:inherit;color:#667}
details{margin:8px 0}
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
    if view.relative_stderr is not None:
        facts.append(f"score rel. std. error {_pct(view.relative_stderr)}")
    if view.depth is not None:
        facts.append(f"LiSSA steps {view.depth}")
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


def _pct(v: Optional[float]) -> str:
    """A dimensionless ratio as a percentage (``0.0312`` → ``3.12 %``)."""
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{100 * v:.3g} %"


_PALETTE = ("#3b6fb6", "#d0453b", "#2e9e5b", "#8a5a00", "#7b4bb0", "#0f8b8d", "#c2417a", "#5b6b8c")


def norm_history_svg(
    series: Sequence[NormSeries],
    width: int = 640,
    height: int = 240,
    css_id: Optional[str] = "norm-history",
    max_series: int = 24,
) -> str:
    """An inline SVG line chart of LiSSA norm histories: step ``t`` across, the largest ``‖h_t‖/‖v‖`` over
    a chunk's queries up (linear, from 0), one line per (chunk, repeat); the first ``max_series`` lines
    are drawn, each with a tooltip naming it, and a legend when there are at most eight."""
    shown = [s for s in series if s.ratios][:max_series]
    legend = shown if len(shown) <= 8 else []
    pad_l, pad_r, pad_t, pad_b = 56, 16, 26, 40
    total_h = height + 16 * len(legend)
    iw, ih = width - pad_l - pad_r, height - pad_t - pad_b
    ident = f' id="{css_id}"' if css_id else ""
    title = "LiSSA norm history (max over the chunk's queries of ‖h_t‖/‖v‖)"
    parts = [
        f'<svg class="norm-history"{ident} xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" '
        f'viewBox="0 0 {width} {total_h}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{pad_l}" y="16" font-size="13">{html.escape(title)}</text>',
    ]
    finite = [r for s in shown for r in s.ratios if math.isfinite(r)]
    if not finite:
        parts.append(f'<text x="{pad_l}" y="{pad_t + ih / 2}" font-size="12">no norm history recorded</text></svg>')
        return "".join(parts)
    x_hi = max(max(s.steps) for s in shown) or 1
    y_hi = max(finite) * 1.05 or 1.0
    base = pad_t + ih

    def xy(step: float, ratio: float) -> Tuple[float, float]:
        r = min(max(ratio, 0.0), y_hi) if math.isfinite(ratio) else y_hi
        return pad_l + iw * step / x_hi, base - ih * r / y_hi

    parts.append(f'<line x1="{pad_l}" y1="{base}" x2="{pad_l + iw}" y2="{base}" stroke="#445"/>')
    parts.append(f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{base}" stroke="#445"/>')
    parts.append(f'<text x="{pad_l - 4}" y="{base}" font-size="11" text-anchor="end">0</text>')
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 8}" font-size="11" text-anchor="end">{y_hi:.3g}</text>')
    parts.append(f'<text x="{pad_l}" y="{base + 16}" font-size="11" text-anchor="start">0</text>')
    parts.append(f'<text x="{pad_l + iw}" y="{base + 16}" font-size="11" text-anchor="end">{x_hi}</text>')
    parts.append(f'<text x="{pad_l + iw / 2}" y="{base + 16}" font-size="11" text-anchor="middle">step t</text>')
    for i, s in enumerate(shown):
        colour = _PALETTE[i % len(_PALETTE)]
        pts = [xy(t, r) for t, r in zip(s.steps, s.ratios)]
        tip = f"<title>{html.escape(s.label)}: final ‖h‖/‖v‖ {s.ratios[-1]:.4g} at step {s.steps[-1]}</title>"
        if len(pts) == 1:
            parts.append(f'<circle cx="{pts[0][0]:.2f}" cy="{pts[0][1]:.2f}" r="3" fill="{colour}">{tip}</circle>')
        else:
            points = " ".join(f"{x:.2f},{y:.2f}" for x, y in pts)
            parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5">{tip}</polyline>')
    for i, s in enumerate(legend):
        y = height + 16 * i
        parts.append(f'<line x1="{pad_l}" y1="{y - 4}" x2="{pad_l + 18}" y2="{y - 4}" stroke="{_PALETTE[i % len(_PALETTE)]}" stroke-width="2"/>')
        parts.append(f'<text x="{pad_l + 24}" y="{y}" font-size="11">{html.escape(s.label)}</text>')
    if len(shown) < len(series):
        parts.append(f'<text x="{pad_l + iw}" y="16" font-size="11" text-anchor="end">first {len(shown)} of {len(series)} lines</text>')
    parts.append("</svg>")
    return "".join(parts)


def _kv_table(items: Dict[str, Any], css_id: str) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v) if not isinstance(v, (list, tuple)) else ', '.join(map(_fmt, v)))}</td></tr>"
        for k, v in items.items()
    )
    return f'<table class="kv" id="{css_id}">{rows}</table>'


def _has_diagnostics(results: InfluenceResults) -> bool:
    return bool(diagnostic_scalars(results)) or bool(results.solve_chunks())


def _lissa_rows(results: InfluenceResults, scalars: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """(quantity, value, meaning) rows describing a LiSSA solve readably."""
    first = next((c.diagnostics for c in results.solve_chunks() if "scale" in c.diagnostics), {})
    g = {k.replace("influence/diagnostics/", ""): v for k, v in scalars.items()}
    rows: List[Tuple[str, str, str]] = []

    def add(label: str, key: str, meaning: str) -> None:
        if key in g:
            rows.append((label, _fmt(g[key]), meaning))

    if "damping" in g:
        auto = {"auto": True, "fixed": False}.get(str(results.settings.get("damping_mode")))
        mode = "" if auto is None else ("chosen automatically; " if auto else "given; ")
        rows.append(("damping λ", _fmt(g["damping"]), f"{mode}the solver targets (H + λI)⁻¹v (Hessian units)"))
    add("scale s", "scale", "each step divides the residual by s; contracts while every λ(H_B + λI) < 2s")
    add("minibatch size", "batch_size", "training examples per Hessian-vector product")
    if "depth_max" in g:
        mode = first.get("depth_mode", "")
        span = f"{g['depth_min']}–{g['depth_max']}" if g["depth_min"] != g["depth_max"] else str(g["depth_max"])
        rows.append(("steps run", span, f"depth {mode}".strip() + ", over queries"))
    depth_list = first.get("depth")
    if isinstance(depth_list, (list, tuple)):
        rows.append(("repeats", str(len(depth_list)), "independent recursions averaged per query"))
    if "converged" in g:
        rows.append(("converged", "yes" if g["converged"] else "no", "whether every query met the tolerance before max_depth"))
    if "relative_stderr_median" in g:
        rows.append(("relative std. error of the scores",
                     f"median {_pct(g['relative_stderr_median'])}, max {_pct(g['relative_stderr_max'])}",
                     "spread of each query's scores over the repeats / √R, relative; over queries "
                     "(sampling noise only, not the bias of stopping early)"))
    elif results.per_query_diagnostics().get("relative_stderr") is not None:
        rows.append(("relative std. error of the scores", "n/a", "needs repeats ≥ 2"))
    add("λ_max(H)", "lambda_max_full", "top eigenvalue of the full Hessian (Lanczos or power iteration)")
    add("λ_min(H)", "lambda_min_full", "smallest eigenvalue of the full Hessian (Lanczos)")
    if "trace" in g:
        se = f" ± {_fmt(g['trace_stderr'])}" if "trace_stderr" in g else ""
        rows.append(("trace(H)", _fmt(g["trace"]) + se, "Hutchinson estimate ± standard error"))
    setup = first.get("setup") if isinstance(first.get("setup"), dict) else {}
    lam_b = setup.get("lambda_max_minibatch")
    if isinstance(lam_b, (list, tuple)) and lam_b:
        rows.append(("λ_max(H_B + λI)", ", ".join(_fmt(float(v)) for v in lam_b),
                     "top eigenvalue per sampled minibatch (sets the automatic scale)"))
    described = {
        "curvature_check_passes": ("curvature check", "full-data HVPs of the Lanczos estimate of λ_min(H)"),
        "tangent_chunk": ("right-hand sides per HVP", "queries vmapped together (timed; only speed depends on it)"),
        "score_sketch_seconds": ("score sketch, s", "building the sketch of the training scores (convergence test)"),
    }
    for key, (label, meaning) in described.items():
        if isinstance(setup.get(key), (int, float)):
            rows.append((label, _fmt(setup[key]), meaning))
    known = {"hvps", "lambda_max_full", "lambda_min_full", "trace", "trace_stderr", "lambda_max_minibatch", *described}
    for key, v in setup.items():
        if key not in known and isinstance(v, (int, float)) and not isinstance(v, bool):
            rows.append((str(key), _fmt(v), "recorded at setup"))
    add("HVPs in setup", "setup_hvps", "Hessian-vector products spent on the estimates above")
    add("HVPs in the solve", "solve_hvp_calls", "Hessian-vector products of the query solves")
    return rows


def _per_query_table(results: InfluenceResults) -> str:
    per_query = {k: v for k, v in results.per_query_diagnostics().items() if bool((~v.isnan()).any())}
    if not per_query:
        return ""
    stderr, depth = per_query.get("relative_stderr"), per_query.get("depth_per_query")
    head = "<tr><th>row</th><th>query</th>" + ("<th>score rel. std. error</th>" if stderr is not None else "")
    head += "<th>steps run</th>" if depth is not None else ""
    body = []
    ids = results.query_indices.tolist()
    for q in range(results.num_queries):
        attrs, cells = f' data-row="{q}" data-query-id="{ids[q]}"', [f"<td>{q}</td><td>#{ids[q]}</td>"]
        if stderr is not None:
            v = float(stderr[q])
            attrs += f' data-relative-stderr="{v!r}"'
            cells.append(f"<td>{_pct(v)}</td>")
        if depth is not None:
            d = float(depth[q])
            attrs += f' data-depth="{"" if math.isnan(d) else int(d)}"'
            cells.append(f"<td>{'n/a' if math.isnan(d) else int(d)}</td>")
        body.append(f"<tr{attrs}>{''.join(cells)}</tr>")
    opened = " open" if results.num_queries <= 20 else ""
    return (
        f"<details{opened}><summary>Per query ({results.num_queries})</summary>"
        f'<table class="grid" id="per-query-diagnostics">{head}</tr>{"".join(body)}</table></details>'
    )


def _norm_history_table(series: Sequence[NormSeries]) -> str:
    head = ("<tr><th>chunk</th><th>queries</th><th>repeat</th><th>steps run</th><th>checkpoints</th>"
            "<th>final ‖h‖/‖v‖</th><th>peak ‖h‖/‖v‖</th><th>final segment change</th></tr>")
    rows = []
    for s in series:
        change = s.segment_change[-1] if s.segment_change else None
        rows.append(
            f'<tr data-chunk="{s.chunk}" data-repeat="{s.repeat}" data-final="{s.ratios[-1]!r}">'
            f"<td>{s.chunk}</td><td>{s.start}–{max(s.stop - 1, s.start)}</td><td>{s.repeat}</td>"
            f"<td>{'' if s.depth is None else s.depth}</td><td>{len(s.ratios)}</td><td>{_fmt(s.ratios[-1])}</td>"
            f"<td>{_fmt(max(s.ratios))}</td><td>{'' if change is None else _fmt(change)}</td></tr>"
        )
    return (
        "<details><summary>Norm history values</summary>"
        f'<table class="grid" id="norm-history-table">{head}{"".join(rows)}</table></details>'
    )


def _diagnostics_section(results: InfluenceResults) -> List[str]:
    scalars = diagnostic_scalars(results)
    if not _has_diagnostics(results):
        return []
    parts = ['<h3 id="solver-diagnostics">Solver diagnostics</h3>']
    lissa = _lissa_rows(results, scalars) if any("scale" in c.diagnostics for c in results.solve_chunks()) else []
    if lissa:
        rows = "".join(
            f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td class=\"note\">{html.escape(c)}</td></tr>"
            for a, b, c in lissa
        )
        parts.append(f'<table class="kv" id="lissa-table">{rows}</table>')
    parts.append(_per_query_table(results))
    series = norm_series(results)
    if series:
        parts.append(f'<p class="muted">{html.escape(NORM_HISTORY)}</p>')
        parts.append(norm_history_svg(series))
        parts.append(_norm_history_table(series))
    if scalars:
        table = _kv_table({k.replace("influence/diagnostics/", ""): v for k, v in scalars.items()}, "diagnostics-table")
        if lissa:  # already shown readably above; the raw values as logged, folded
            table = f"<details><summary>All diagnostics as logged (influence/diagnostics/…)</summary>{table}</details>"
        parts.append(table)
    return [p for p in parts if p]


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
        '<a href="#self-influence">Self-influence</a><a href="#settings">Settings</a>'
        + ('<a href="#solver-diagnostics">Solver diagnostics</a>' if _has_diagnostics(results) else "")
        + "</nav></header>",
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
    parts.extend(_diagnostics_section(results))
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
