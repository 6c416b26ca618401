"""A self-contained HTML influence report: images as PNG data URIs, histograms as inline SVG, no scripts,
no external files or network."""

from __future__ import annotations

import datetime
import html
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..persistence import atomic_write_text
from ..record import RunKey
from ..results import InfluenceResults
from .content import HARMFUL, HELPFUL, SIGN_CONVENTION, SUSPECTS, Entry, QueryView, SeriesLine, series_lines
from .evolution import KINDS, Ranking, rankings
from .previews import ExampleCatalog
from .scalars import format_value
from .tokens import TokenView

__all__ = ["render_html", "write_html", "histogram_svg", "series_svg"]

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
table.diag td:first-child{font-family:inherit;color:inherit}
figure.series{margin:10px 0}figure.series figcaption{max-width:640px;color:#667;font-size:13px}
details{margin:8px 0}
svg text{font-family:system-ui,sans-serif}
table.grid td.ids{text-align:left}.tid.new{font-weight:bold}
table.heatmap{border-collapse:collapse;font-size:13px;margin:4px 0}table.heatmap td{padding:3px 6px;vertical-align:top}
table.heatmap td.who{white-space:nowrap;color:#445}
.tok{font-family:ui-monospace,monospace;white-space:pre;padding:1px 0;border-radius:2px}.tok.unscored{color:#99a}
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


def _token_colour(score: float, scale: float) -> str:
    """Red for harmful (positive), green for helpful (negative), opacity ``|score| / scale``."""
    alpha = min(1.0, abs(score) / scale) * 0.85
    rgb = "208,69,59" if score > 0 else "46,158,91"
    return f"rgba({rgb},{alpha:.3f})"


def _visible(text: str) -> str:
    """A token's text with line breaks and tabs made visible, HTML-escaped."""
    return html.escape(text.replace("\n", "↵").replace("\t", "⇥") or "∅")


def _token_section(tv: TokenView) -> str:
    """The heat map of one query: each line a training sequence (or the total over the query's top-k of a kind),
    each token coloured by its score for it (red harmful, green helpful, one scale per query), and a table of
    each token's most harmful and most helpful training sequence."""
    scale = tv.scale
    rows = []
    for line in tv.lines:
        who = (f"{line.kind} #{line.rank}: train #{line.train_id}" if line.train_id is not None
               else f"sum over the top {line.rank} {line.kind.split()[0]}")
        spans = []
        for cell, score in zip(tv.cells, line.scores):
            if score is None:
                spans.append(f'<span class="tok unscored" data-position="{cell.position}" title="position '
                             f'{cell.position}: not scored (-100)">{_visible(cell.text)}</span>')
                continue
            tip = f"position {cell.position} · {cell.text!r} (id {cell.token_id}) · score {_fmt(score)}"
            spans.append(f'<span class="tok" data-position="{cell.position}" data-token-id="{cell.token_id}" '
                         f'data-score="{score!r}" style="background:{_token_colour(score, scale)}" '
                         f'title="{html.escape(tip)}">{_visible(cell.text)}</span>')
        train = "" if line.train_id is None else f' data-train-id="{line.train_id}"'
        rows.append(f'<tr data-kind="{html.escape(line.kind)}"{train} data-sequence-score="{line.sequence_score!r}">'
                    f'<td class="who">{html.escape(who)} (score {_fmt(line.sequence_score)})</td>'
                    f'<td class="toks">{"".join(spans)}</td></tr>')
    tops = "".join(
        f'<tr data-position="{t.position}"><td>{t.position}</td><td class="ids"><span class="tok">{_visible(t.text)}'
        f'</span></td><td>#{t.harmful_id}</td><td>{_fmt(t.harmful_score)}</td><td>#{t.helpful_id}</td>'
        f"<td>{_fmt(t.helpful_score)}</td></tr>"
        for t in tv.tops
    )
    head = ("<tr><th>position</th><th>token</th><th>most harmful</th><th>score</th><th>most helpful</th>"
            "<th>score</th></tr>")
    return (
        f'<div class="tokens" id="tokens-{tv.query_id}" data-query-id="{tv.query_id}">'
        '<h3 class="tokens">Per-token influence: each target token coloured by its score '
        "−∇L_t(z_query)ᵀ(H+λI)⁻¹∇L(z_train) for the training sequence of the line (red harmful, green helpful; "
        f"full colour = |score| {_fmt(scale)}; the tokens' scores add up to the line's score)</h3>"
        f'<table class="heatmap">{"".join(rows)}</table>'
        f"<details><summary>Each token's most harmful and most helpful training sequence</summary>"
        f'<table class="grid token-tops">{head}{tops}</table></details></div>'
    )


def _query_section(view: QueryView, train: ExampleCatalog, query: ExampleCatalog,
                   tokens: Optional[TokenView] = None) -> str:
    label = query.label(view.query_id)
    if label is None:
        label = view.target
    facts = [f"<b>Query #{view.query_id}</b>"]
    if label is not None:
        facts.append(f"label {html.escape(_fmt(label))}")
    if view.prediction is not None:
        facts.append(f"predicted {html.escape(_fmt(view.prediction))}")
    facts.append(f"loss {_fmt(view.loss)}")
    for name, value in view.diagnostics.items():
        if value is not None:
            label = view.diagnostic_labels.get(name, name)
            facts.append(f'<span class="diagnostic" data-name="{html.escape(name)}">{html.escape(label)} '
                         f"{html.escape(format_value(value))}</span>")
    out = [
        f'<article class="query" id="query-{view.query_id}" data-query-id="{view.query_id}">',
        f'<div class="qhead">{query.preview(view.query_id).to_html(f"query #{view.query_id}", size=96)}'
        f'<div class="facts">{" · ".join(facts)}</div></div>',
    ]
    if tokens is not None:
        out.append(_token_section(tokens))
    for kind, title, entries in (("helpful", HELPFUL, view.helpful), ("harmful", HARMFUL, view.harmful)):
        if not entries:
            sign = "negative" if kind == "helpful" else "positive"
            out.append(f'<h3 class="{kind}">No {kind} training examples (none has a {sign} score)</h3>')
            continue
        out.append(f'<h3 class="{kind}">Top {len(entries)} {html.escape(title)}</h3>')
        out.append(f'<div class="examples {kind}">{"".join(_example_figure(e, train) for e in entries)}</div>')
    out.append("</article>")
    return "".join(out)


_PALETTE = ("#3b6fb6", "#d0453b", "#2e9e5b", "#8a5a00", "#7b4bb0", "#0f8b8d", "#c2417a", "#5b6b8c")


def _css_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def series_svg(
    lines: Sequence[SeriesLine],
    title: str,
    width: int = 640,
    height: int = 240,
    css_id: Optional[str] = None,
    max_lines: int = 24,
) -> str:
    """An inline SVG line chart: ``x`` across, ``y`` up, one line per curve (the first ``max_lines``), each
    with a tooltip naming it (:attr:`SeriesLine.line_label`) and a legend when there are at most eight.
    ``y`` is drawn on a log scale when every finite value is positive and they span three decades or more,
    else linearly from ``min(0, y)``. NaN points are left out; ±inf are drawn at the edge."""
    shown = [s for s in lines if s.x][:max_lines]
    legend = shown if len(shown) <= 8 else []
    pad_l, pad_r, pad_t, pad_b = 56, 16, 26, 40
    total_h = height + 16 * len(legend)
    iw, ih = width - pad_l - pad_r, height - pad_t - pad_b
    ident = f' id="{css_id}"' if css_id else ""
    parts = [
        f'<svg class="series-chart"{ident} xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" '
        f'viewBox="0 0 {width} {total_h}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{pad_l}" y="16" font-size="13">{html.escape(title)}</text>',
    ]
    ys = [v for s in shown for v in s.y if math.isfinite(v)]
    xs = [v for s in shown for v in s.x if math.isfinite(v)]
    if not ys or not xs:
        parts.append(f'<text x="{pad_l}" y="{pad_t + ih / 2}" font-size="12">no finite values recorded</text></svg>')
        return "".join(parts)
    log = min(ys) > 0 and max(ys) / min(ys) >= 1e3
    if log:
        y_lo, y_hi = math.log10(min(ys)), math.log10(max(ys))
    else:
        y_lo, y_hi = min(0.0, min(ys)), max(ys) * 1.05 if max(ys) > 0 else max(ys)
    if y_hi <= y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    x_lo, x_hi = min(0.0, min(xs)), max(xs)
    if x_hi <= x_lo:
        x_hi = x_lo + 1.0
    base = pad_t + ih

    def xy(x: float, y: float) -> Tuple[float, float]:
        if math.isinf(y):
            v = y_hi if y > 0 else y_lo
        else:
            v = math.log10(y) if log else y
        v = min(max(v, y_lo), y_hi)
        return pad_l + iw * (x - x_lo) / (x_hi - x_lo), base - ih * (v - y_lo) / (y_hi - y_lo)

    def tick(v: float) -> str:
        return f"{10 ** v:.3g}" if log else f"{v:.3g}"

    parts.append(f'<line x1="{pad_l}" y1="{base}" x2="{pad_l + iw}" y2="{base}" stroke="#445"/>')
    parts.append(f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{base}" stroke="#445"/>')
    parts.append(f'<text x="{pad_l - 4}" y="{base}" font-size="11" text-anchor="end">{tick(y_lo)}</text>')
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 8}" font-size="11" text-anchor="end">{tick(y_hi)}</text>')
    parts.append(f'<text x="{pad_l}" y="{base + 16}" font-size="11" text-anchor="start">{x_lo:.4g}</text>')
    parts.append(f'<text x="{pad_l + iw}" y="{base + 16}" font-size="11" text-anchor="end">{x_hi:.4g}</text>')
    if log:
        parts.append(f'<text x="{pad_l + iw / 2}" y="{base + 16}" font-size="11" text-anchor="middle">(log scale)</text>')
    for i, s in enumerate(shown):
        colour = _PALETTE[i % len(_PALETTE)]
        pts = [xy(x, y) for x, y in zip(s.x, s.y) if math.isfinite(x) and not math.isnan(y)]
        last = f"{s.y[-1]:.4g} at x = {s.x[-1]:.4g}"
        tip = f"<title>{html.escape(s.line_label)}: last value {html.escape(last)}</title>"
        data = f'data-chunk="{"" if s.chunk is None else s.chunk}" data-curve="{html.escape(s.curve)}"'
        if len(pts) == 1:
            parts.append(f'<circle {data} cx="{pts[0][0]:.2f}" cy="{pts[0][1]:.2f}" r="3" fill="{colour}">{tip}</circle>')
        elif pts:
            points = " ".join(f"{x:.2f},{y:.2f}" for x, y in pts)
            parts.append(f'<polyline {data} points="{points}" fill="none" stroke="{colour}" stroke-width="1.5">{tip}</polyline>')
    for i, s in enumerate(legend):
        y = height + 16 * i
        parts.append(f'<line x1="{pad_l}" y1="{y - 4}" x2="{pad_l + 18}" y2="{y - 4}" stroke="{_PALETTE[i % len(_PALETTE)]}" stroke-width="2"/>')
        parts.append(f'<text x="{pad_l + 24}" y="{y}" font-size="11">{html.escape(s.line_label)}</text>')
    if len(shown) < len(lines):
        parts.append(f'<text x="{pad_l + iw}" y="16" font-size="11" text-anchor="end">first {len(shown)} of {len(lines)} lines</text>')
    parts.append("</svg>")
    return "".join(parts)


def _kv_table(items: Dict[str, Any], css_id: str) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v) if not isinstance(v, (list, tuple)) else ', '.join(map(_fmt, v)))}</td></tr>"
        for k, v in items.items()
    )
    return f'<table class="kv" id="{css_id}">{rows}</table>'


def _has_diagnostics(results: InfluenceResults) -> bool:
    return bool(results.summary_diagnostics() or results.per_query_diagnostics() or series_lines(results))


def _label(d: Any) -> str:
    """A diagnostic's label, prefixed by its source (``preconditioner: rank k``)."""
    label = d.label or d.name
    return f"{d.source}: {label}" if d.source else label


def _summary_table(results: InfluenceResults) -> str:
    """One row per :meth:`InfluenceResults.summary_diagnostics` entry: label, value, meaning."""
    rows = "".join(
        f'<tr data-name="{html.escape(d.key)}"><td>{html.escape(_label(d))}</td>'
        f"<td>{html.escape(format_value(d.value))}</td><td class=\"note\">{html.escape(d.meaning)}</td></tr>"
        for d in results.summary_diagnostics()
    )
    return f'<table class="kv diag" id="diagnostics-table">{rows}</table>' if rows else ""


def _per_query_table(results: InfluenceResults) -> str:
    per_query = {k: v for k, v in results.per_query_diagnostics().items() if bool((~v.isnan()).any())}
    if not per_query:
        return ""
    heads = []
    for name in per_query:
        d = results.diagnostic(name)
        tip = f' title="{html.escape(d.meaning)}"' if d is not None and d.meaning else ""
        heads.append(f'<th data-name="{html.escape(name)}"{tip}>{html.escape(d.label if d is not None else name)}</th>')
    head = "<tr><th>row</th><th>query</th>" + "".join(heads) + "</tr>"
    body = []
    ids = results.query_indices.tolist()
    for q in range(results.num_queries):
        cells = [f"<td>{q}</td><td>#{ids[q]}</td>"]
        for name, values in per_query.items():
            v = float(values[q])
            cells.append(f'<td data-name="{html.escape(name)}" data-value="{v!r}">{"n/a" if math.isnan(v) else format_value(v)}</td>')
        body.append(f'<tr data-row="{q}" data-query-id="{ids[q]}">{"".join(cells)}</tr>')
    opened = " open" if results.num_queries <= 20 else ""
    return (
        f"<details{opened}><summary>Per query ({results.num_queries})</summary>"
        f'<table class="grid" id="per-query-diagnostics">{head}{"".join(body)}</table></details>'
    )


def _series_table(name: str, lines: Sequence[SeriesLine]) -> str:
    head = "<tr><th>chunk</th><th>queries</th><th>curve</th><th>points</th><th>last x</th><th>last y</th><th>max y</th></tr>"
    rows = []
    for s in lines:
        finite = [v for v in s.y if not math.isnan(v)]
        queries = "" if s.chunk is None else f"{s.start}–{max((s.stop or 0) - 1, s.start or 0)}"
        rows.append(
            f'<tr data-chunk="{"" if s.chunk is None else s.chunk}" data-curve="{html.escape(s.curve)}" '
            f'data-last="{s.y[-1]!r}"><td>{"setup" if s.chunk is None else s.chunk}</td><td>{queries}</td>'
            f"<td>{html.escape(s.curve)}</td><td>{len(s.y)}</td><td>{_fmt(s.x[-1])}</td><td>{_fmt(s.y[-1])}</td>"
            f"<td>{_fmt(max(finite)) if finite else 'n/a'}</td></tr>"
        )
    return (
        f"<details><summary>Values of {html.escape(lines[0].label)}</summary>"
        f'<table class="grid series-table" id="series-table-{_css_name(name)}">{head}{"".join(rows)}</table></details>'
    )


def _diagnostics_section(results: InfluenceResults) -> List[str]:
    """Solver diagnostics, all from their declarations: one table of the summary scalars (label, value,
    meaning), the per-query diagnostics with their labels as column heads, and one chart per series
    diagnostic (title: its label, caption: its meaning)."""
    if not _has_diagnostics(results):
        return []
    solver = f" ({html.escape(results.solver)})" if results.solver else ""
    parts = [f'<h3 id="solver-diagnostics">Solver diagnostics{solver}</h3>', _summary_table(results),
             _per_query_table(results)]
    for name, lines in series_lines(results).items():
        first = lines[0]
        caption = f"<figcaption>{html.escape(first.meaning)}</figcaption>" if first.meaning else ""
        parts.append(
            f'<figure class="series" data-name="{html.escape(name)}">'
            f"{series_svg(lines, first.label, css_id=f'series-{_css_name(name)}')}{caption}</figure>"
        )
        parts.append(_series_table(name, lines))
    return [p for p in parts if p]


_KIND_TITLES = {"harmful": "top harmful", "helpful": "top helpful", "self_influence": "self-influence suspects"}


def _ids_cell(r: Optional[Ranking]) -> str:
    if r is None:
        return '<td class="ids muted">n/a</td><td></td>'
    spans = "".join(
        f'<span class="tid{" new" if r.kept is not None and prev is None else ""}" data-train-id="{i}" '
        f'title="score {_fmt(s)}{"" if prev is None else f", rank {prev} before"}">#{i}</span>{", " if n < len(r.train_ids) - 1 else ""}'
        for n, (i, s, prev) in enumerate(zip(r.train_ids, r.scores, r.previous_ranks))
    )
    kept = "" if r.kept is None else f"{r.kept}/{len(r.train_ids)}"
    return (f'<td class="ids" data-kind="{r.kind}" data-ids="{",".join(map(str, r.train_ids))}">{spans or "none"}</td>'
            f'<td data-kept="{"" if r.kept is None else r.kept}">{kept}</td>')


def _epoch(run: Any) -> int:
    return run.epoch if isinstance(run, RunKey) else int(run)


def _evolution_section(history: Mapping[Any, InfluenceResults], k: int, suspects_k: Optional[int]) -> List[str]:
    """How the top examples move across the runs of the fit (:mod:`.evolution`): one row per run with the
    top harmful and helpful examples by mean score over its queries and the self-influence suspects, each
    with how many were already listed by the previous run; the same per query in a collapsed table."""
    ranked = rankings(history, k, suspects_k)
    kinds = [kind for kind in KINDS if any(r.kind == kind for r in ranked)]
    by: Dict[Tuple[Any, str, Optional[int]], Ranking] = {(r.run, r.kind, r.query_id): r for r in ranked}
    head = "<tr><th>epoch</th><th>step</th>" + "".join(
        f"<th>{_KIND_TITLES[kind]}{' (mean over queries)' if kind != 'self_influence' else ''}</th><th>kept</th>"
        for kind in kinds) + "</tr>"
    rows = []
    for run in sorted(history):
        cells = "".join(_ids_cell(by.get((run, kind, None))) for kind in kinds)
        step = int(history[run].settings.get("global_step", -1))
        epoch = _epoch(run)
        rows.append(f'<tr data-epoch="{epoch}"><td>{epoch}</td><td>{step}</td>{cells}</tr>')
    parts = [
        '<section id="over-epochs"><h2>Across epochs</h2>',
        f'<p class="muted">{len(history)} influence runs during this fit (epochs are 0-based, each run after that '
        "epoch's training steps). Harmful and helpful examples are ranked by their mean score over the run's "
        "queries (the influence on the mean query loss); <b>bold</b> ids were not in the previous run's list, "
        "and <i>kept</i> counts those that were. Hover an id for its score and previous rank.</p>",
        f'<table class="grid" id="over-epochs-table">{head}{"".join(rows)}</table>',
    ]
    queries = sorted({r.query_id for r in ranked if r.query_id is not None})
    if queries:
        qrows = []
        for q in queries:
            for run in sorted(history):
                if (run, "harmful", q) not in by:
                    continue
                cells = "".join(_ids_cell(by.get((run, kind, q))) for kind in ("harmful", "helpful"))
                epoch = _epoch(run)
                qrows.append(f'<tr data-query-id="{q}" data-epoch="{epoch}"><td>#{q}</td><td>{epoch}</td>{cells}</tr>')
        qhead = ("<tr><th>query</th><th>epoch</th><th>top harmful</th><th>kept</th><th>top helpful</th>"
                 "<th>kept</th></tr>")
        parts.append(
            "<details><summary>Per query (the default queries are each run's highest-loss validation examples; "
            "pass query_indices= to follow the same queries in every run)</summary>"
            f'<table class="grid" id="over-epochs-per-query">{qhead}{"".join(qrows)}</table></details>'
        )
    parts.append("</section>")
    return parts


def render_html(
    results: InfluenceResults,
    views: Sequence[QueryView],
    suspects: Sequence[Entry],
    train: ExampleCatalog,
    query: ExampleCatalog,
    title: str = "Influence report",
    links: Optional[Dict[str, str]] = None,
    history: Optional[Mapping[Any, InfluenceResults]] = None,
    top_k: int = 10,
    self_influence_k: Optional[int] = None,
    tokens: Sequence[TokenView] = (),
) -> str:
    """The report as one HTML string: queries with previews and their top helpful / harmful examples,
    score histograms, self-influence suspects, settings, timings and diagnostics; with a ``history`` of
    more than one run (``{epoch: results}``), a section on how the ``top_k`` top examples and the
    ``self_influence_k`` suspects moved across those runs; with per-token scores (``tokens``, from
    :func:`~.tokens.token_views`), a token heat map in each language-model query's section."""
    evolution = history is not None and len(history) > 1
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
        '<a href="#self-influence">Self-influence</a>'
        + ('<a href="#over-epochs">Across epochs</a>' if evolution else "")
        + '<a href="#settings">Settings</a>'
        + ('<a href="#solver-diagnostics">Solver diagnostics</a>' if _has_diagnostics(results) else "")
        + "</nav></header>",
        '<section id="queries"><h2>Queries</h2>',
    ]
    if not views:
        parts.append('<p class="muted">No queries.</p>')
    by_row = {tv.row: tv for tv in tokens}
    parts.extend(_query_section(v, train, query, by_row.get(v.row)) for v in views)
    parts.append("</section>")

    parts.append('<section id="histograms"><h2>Score distribution</h2>')
    parts.append(histogram_svg(results.scores, "Influence scores, all queries × training examples", css_id="score-histogram"))
    if results.self_influence is not None:
        parts.append(histogram_svg(results.self_influence, "Self-influence", css_id="self-influence-histogram", signed=False))
    parts.append("</section>")

    parts.append('<section id="self-influence"><h2>Self-influence suspects</h2>')
    if suspects:
        parts.append(f'<h3 class="suspects">The {len(suspects)} training examples with the {html.escape(SUSPECTS)}</h3>')
        parts.append(f'<div class="examples self_influence">{"".join(_example_figure(e, train) for e in suspects)}</div>')
    else:
        parts.append(
            '<p class="muted">Self-influence was not computed (pass self_influence=True to InfluenceCallback).</p>'
        )
    parts.append("</section>")
    if evolution:
        assert history is not None
        parts.extend(_evolution_section(history, top_k, self_influence_k))

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
    """Write ``text`` to ``path`` atomically (creating its folder): a temporary file in the same folder,
    flushed to disk, renamed over ``path``. A failed write leaves the previous report whole, and a symbolic
    link at ``path`` is replaced, never followed. Returns the path."""
    path = os.fspath(path)
    atomic_write_text(path, text)
    return path
