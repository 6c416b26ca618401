"""What every report shows, as plain data: per query its top helpful and harmful training examples, and
the self-influence suspects. The W&B and HTML reporters only lay these out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

from ..results import InfluenceResults

__all__ = [
    "HELPFUL", "HARMFUL", "SIGN_CONVENTION", "SUSPECTS", "NORM_HISTORY",
    "Entry", "QueryView", "NormSeries", "query_views", "suspects", "norm_series",
]

#: how each kind of example is described wherever scores are shown
HELPFUL = "helpful (removing it would raise the query loss)"
HARMFUL = "harmful (removing it would lower the query loss)"
SUSPECTS = "highest self-influence (likely mislabelled or atypical: the model bends most to fit them)"
SIGN_CONVENTION = (
    "Scores are Koh & Liang's I_up,loss(z_train, z_query): negative = helpful (removing the training example "
    "would raise the query loss), positive = harmful (removing it would lower the query loss). Predicted change "
    "in the query loss when removing example i: -score / n."
)
NORM_HISTORY = (
    "LiSSA norm history: the largest ‖h_t‖/‖v‖ over a chunk's still-running queries at checkpoint steps t, "
    "for each repeat. It levels off when the recursion converges; a contracting recursion stays below "
    "min(t + 1, s/λ), and geometric growth means divergence (scale too small or negative curvature)."
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
    prediction when known, and its top helpful / harmful training examples; with LiSSA, the relative
    standard error of its scores across repeats (``None`` when not estimated) and the recursion steps
    it ran (``depth``)."""

    row: int
    query_id: int
    loss: float
    target: Optional[Any]
    prediction: Optional[Any]
    helpful: List[Entry]
    harmful: List[Entry]
    relative_stderr: Optional[float] = None
    depth: Optional[int] = None


@dataclass(frozen=True)
class NormSeries:
    """LiSSA's norm history for one repeat of one query chunk (rows ``start:stop`` of the scores):
    ``ratios[j]`` is the largest ``‖h_t‖/‖v‖`` over the chunk's queries still running at step ``steps[j]``
    (dimensionless); ``segment_change`` the largest relative change of the queries' (sketched) training
    scores at the end of each depth-check segment; ``depth`` the steps run (``None`` when not recorded)."""

    chunk: int
    start: int
    stop: int
    repeat: int
    steps: List[int]
    ratios: List[float]
    segment_change: List[float]
    depth: Optional[int]

    @property
    def label(self) -> str:
        """``"chunk 0 (queries 0–7), repeat 1"`` (rows of the scores, end inclusive)."""
        return f"chunk {self.chunk} (queries {self.start}–{max(self.stop - 1, self.start)}), repeat {self.repeat}"


def _n(results: InfluenceResults) -> float:
    return float(results.settings.get("num_train_total", results.num_train))


def query_views(results: InfluenceResults, k: int) -> List[QueryView]:
    """One :class:`QueryView` per query with ``min(k, N)`` examples of each kind."""
    k = max(0, min(int(k), results.num_train))
    n = _n(results)
    per_query = results.per_query_diagnostics()
    stderr, depth = per_query.get("relative_stderr"), per_query.get("depth_per_query")
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
                relative_stderr=_finite(None if stderr is None else float(stderr[q])),
                depth=None if depth is None or math.isnan(float(depth[q])) else int(depth[q]),
            )
        )
    return views


def _finite(v: Optional[float]) -> Optional[float]:
    return v if v is not None and math.isfinite(v) else None


def _numbers(v: Any) -> Optional[List[float]]:
    """``v`` as a list of floats when it is a list of numbers, else ``None``."""
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return None
    return [float(x) for x in v]


def _per_repeat(v: Any) -> List[Any]:
    """A per-repeat list of lists, or a single (older, flat) list as one repeat."""
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (list, tuple)) for x in v):
        return list(v)
    return [v] if isinstance(v, (list, tuple)) else []


def norm_series(results: InfluenceResults) -> List[NormSeries]:
    """LiSSA's norm histories, one :class:`NormSeries` per (chunk, repeat) in solve order; empty for other
    solvers and for chunks without a ``norm_history``. Checkpoint steps missing from older files are
    numbered ``1, 2, …``."""
    out: List[NormSeries] = []
    for c, chunk in enumerate(results.solve_chunks()):
        d = chunk.diagnostics
        hists = _per_repeat(d.get("norm_history"))
        steps, changes = _per_repeat(d.get("checkpoint_steps")), _per_repeat(d.get("segment_change"))
        depths = d.get("depth") if isinstance(d.get("depth"), (list, tuple)) else [d.get("depth")] * len(hists)
        for r, hist in enumerate(hists):
            ratios = _numbers(hist)
            if not ratios:
                continue
            st = _numbers(steps[r]) if r < len(steps) else None
            xs = [int(x) for x in st] if st is not None and len(st) == len(ratios) else list(range(1, len(ratios) + 1))
            ch = (_numbers(changes[r]) if r < len(changes) else None) or []
            dep = depths[r] if r < len(depths) else None
            out.append(NormSeries(c, chunk.start, chunk.stop, r, xs, ratios, ch,
                                  int(dep) if isinstance(dep, (int, float)) and not isinstance(dep, bool) else None))
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
