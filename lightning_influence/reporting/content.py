"""What every report shows, as plain data: per query its top helpful and harmful training examples and its
per-query solver diagnostics, the self-influence suspects, and the curves of the solver's series
diagnostics. The W&B and HTML reporters only lay these out; they read diagnostics by their declared
kind, label and meaning, never by name."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..checks import is_real
from ..diagnostics import Diagnostic
from ..errors import InfluenceConfigError
from ..results import InfluenceResults

__all__ = [
    "HELPFUL", "HARMFUL", "SIGN_CONVENTION", "SUSPECTS",
    "Entry", "QueryView", "SeriesLine", "query_views", "suspects", "series_lines", "diagnostic_label",
]

#: how each kind of example is described wherever scores are shown
HELPFUL = "helpful (removing it would raise the query loss)"
HARMFUL = "harmful (removing it would lower the query loss)"
SUSPECTS = (
    "most negative self-influence I_up,loss(z, z): the examples the model bends most to fit "
    "(often mislabelled or atypical)"
)
SIGN_CONVENTION = (
    "Scores are Koh & Liang's I_up,loss(z_train, z_query): negative = helpful (removing the training example "
    "would raise the query loss), positive = harmful (removing it would lower the query loss). Predicted change "
    "in the query loss when removing example i: -score / n."
)


@dataclass(frozen=True)
class Entry:
    """One ranked training example: ``kind`` is ``"helpful"``, ``"harmful"`` or ``"self_influence"``;
    ``delta_loss`` the predicted change in the query loss on removal (``-score / n``; ``None`` for
    self-influence)."""

    kind: str
    rank: int
    train_id: int
    score: float
    delta_loss: Optional[float]


@dataclass(frozen=True)
class QueryView:
    """Row ``row`` of the scores: query ``query_id`` (position in the query dataset), its loss, label and
    prediction when known, and its top helpful / harmful training examples.

    ``diagnostics`` holds the solver's per-query diagnostics for this query, ``{name: value}`` for every
    per-query diagnostic of the run (:meth:`InfluenceResults.per_query_diagnostics`), in the same order
    for every query; the value is ``None`` where it was not recorded or is NaN. ``diagnostic_labels``
    gives each name's label (what a reader sees)."""

    row: int
    query_id: int
    loss: float
    target: Optional[Any]
    prediction: Optional[Any]
    helpful: List[Entry]
    harmful: List[Entry]
    diagnostics: Dict[str, Optional[float]] = field(default_factory=dict)
    diagnostic_labels: Dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SeriesLine:
    """One curve of a ``kind == "series"`` diagnostic: diagnostic ``name``, its ``label`` and ``meaning``
    (the chart's title and caption), the query chunk it belongs to (``chunk`` index and rows
    ``start:stop`` of the scores; ``None`` for a series recorded at setup or outside the query solves),
    the curve's own label (``curve``, e.g. ``"repeat 0"``) and its points ``x``, ``y`` (NaN where a
    point is not a number)."""

    name: str
    label: str
    meaning: str
    chunk: Optional[int]
    start: Optional[int]
    stop: Optional[int]
    curve: str
    x: List[float]
    y: List[float]

    @property
    def line_label(self) -> str:
        """``"chunk 0 (queries 0–7), repeat 1"`` (rows of the scores, end inclusive); ``"setup, …"`` for
        a series outside the query chunks."""
        where = "setup" if self.chunk is None else (
            f"chunk {self.chunk} (queries {self.start}–{max((self.stop or 0) - 1, self.start or 0)})")
        return f"{where}, {self.curve}" if self.curve else where


def _n(results: InfluenceResults) -> float:
    return float(results.settings.get("num_train_total", results.num_train))


def diagnostic_label(results: InfluenceResults, name: str) -> str:
    """The label of diagnostic ``name`` (its name when it has none)."""
    d = results.diagnostic(name)
    return d.label if d is not None and d.label else name


def query_views(results: InfluenceResults, k: int) -> List[QueryView]:
    """One :class:`QueryView` per query with up to ``k`` examples of each kind: only negative scores are
    helpful and only positive ones harmful, so a query may list fewer (or none) of a kind."""
    k = max(0, min(int(k), results.num_train))
    n = _n(results)
    per_query = results.per_query_diagnostics()
    labels = {name: diagnostic_label(results, name) for name in per_query}
    views = []
    for q in range(results.num_queries):
        kinds = {}
        for kind, ranked in (("helpful", results.top_helpful(q, k)), ("harmful", results.top_harmful(q, k))):
            kinds[kind] = [
                Entry(kind, r + 1, int(i), float(s), -float(s) / n)
                for r, (i, s) in enumerate(zip(ranked.indices.tolist(), ranked.scores.tolist()))
            ]
        views.append(
            QueryView(
                row=q,
                query_id=int(results.query_indices[q]),
                loss=float(results.query_losses[q]),
                target=None if results.query_targets is None else results.query_targets[q].item(),
                prediction=None if results.query_predictions is None else results.query_predictions[q].item(),
                helpful=kinds["helpful"],
                harmful=kinds["harmful"],
                diagnostics={name: _finite(float(v[q])) for name, v in per_query.items()},
                diagnostic_labels=labels,
            )
        )
    return views


def _finite(v: float) -> Optional[float]:
    return v if not math.isnan(v) else None


def _floats(v: Any) -> List[float]:
    """A list of numbers as floats (a non-number becomes NaN)."""
    if not isinstance(v, (list, tuple)):
        return []
    return [float(x) if is_real(x) else math.nan for x in v]


def _curves(d: Diagnostic) -> List[Tuple[str, List[float], List[float]]]:
    if not isinstance(d.value, (list, tuple)):
        raise InfluenceConfigError(f"series diagnostic {d.name!r} must be a list of curves, got {d.value!r:.80}.")
    out = []
    for i, c in enumerate(d.value):
        if not isinstance(c, Mapping) or len(_floats(c.get("x"))) != len(_floats(c.get("y"))):
            raise InfluenceConfigError(
                f"curve {i} of series diagnostic {d.name!r} must be {{'label': str, 'x': [...], 'y': [...]}} with "
                f"as many x as y values; got {c!r:.200}."
            )
        out.append((str(c.get("label", "")), _floats(c.get("x")), _floats(c.get("y"))))
    return out


def series_lines(results: InfluenceResults) -> Dict[str, List[SeriesLine]]:
    """Every curve of every ``kind == "series"`` diagnostic, by diagnostic name (in the order the names
    first appear: setup, then the query chunks, self-influence, totals), each name's curves in chunk
    order. Curves without points are left out, and so are names left without curves."""
    found: List[Tuple[Optional[int], Optional[int], Optional[int], Diagnostic]] = []
    found += [(None, None, None, d) for d in results.setup_diagnostics()]
    for c, chunk in enumerate(results.solve_chunks()):
        found += [(c, chunk.start, chunk.stop, d) for d in chunk.items]
    found += [(None, None, None, d) for d in results.self_influence_diagnostics() + results.total_diagnostics()]
    out: Dict[str, List[SeriesLine]] = {}
    for c, start, stop, d in found:
        if d.kind != "series":
            continue
        meta = results.diagnostic(d.name) or d  # one label and meaning per chart
        for curve, x, y in _curves(d):
            if x:
                out.setdefault(d.name, []).append(SeriesLine(d.name, meta.label, meta.meaning, c, start, stop, curve, x, y))
    return out


def suspects(results: InfluenceResults, k: int) -> List[Entry]:
    """The ``k`` training examples with the most negative self-influence (empty when not computed)."""
    if results.self_influence is None:
        return []
    ranked = results.top_self_influence(max(0, min(int(k), results.num_train)))
    return [
        Entry("self_influence", r + 1, int(i), float(s), None)
        for r, (i, s) in enumerate(zip(ranked.indices.tolist(), ranked.scores.tolist()))
    ]
