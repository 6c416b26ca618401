"""What every report shows, as plain data: per query its top helpful and harmful training examples, and
the self-influence suspects. The W&B and HTML reporters only lay these out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

from ..results import InfluenceResults

__all__ = ["HELPFUL", "HARMFUL", "SIGN_CONVENTION", "SUSPECTS", "Entry", "QueryView", "query_views", "suspects"]

#: how each kind of example is described wherever scores are shown
HELPFUL = "helpful (removing it would raise the query loss)"
HARMFUL = "harmful (removing it would lower the query loss)"
SUSPECTS = "highest self-influence (likely mislabelled or atypical: the model bends most to fit them)"
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
    prediction when known, and its top helpful / harmful training examples."""

    row: int
    query_id: int
    loss: float
    target: Optional[Any]
    prediction: Optional[Any]
    helpful: List[Entry]
    harmful: List[Entry]


def _n(results: InfluenceResults) -> float:
    return float(results.settings.get("num_train_total", results.num_train))


def query_views(results: InfluenceResults, k: int) -> List[QueryView]:
    """One :class:`QueryView` per query with ``min(k, N)`` examples of each kind."""
    k = max(0, min(int(k), results.num_train))
    n = _n(results)
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
            )
        )
    return views


def suspects(results: InfluenceResults, k: int) -> List[Entry]:
    """The ``k`` training examples with the most negative self-influence (empty when not computed)."""
    if results.self_influence is None:
        return []
    ranked = results.top_self_influence(max(0, min(int(k), results.num_train)))
    return [
        Entry("self_influence", r + 1, int(i), float(s), None)
        for r, (i, s) in enumerate(zip(ranked.indices.tolist(), ranked.scores.tolist()))
    ]
