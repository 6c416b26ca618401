"""What the reports show of per-token scores (``per_token=True``), as plain data: per language-model query, its
target tokens as text and, for a few of its top training sequences, each token's score (the heat map), and
per token the training sequences that drove it most. The HTML and W&B reporters only lay these out.

A query's tokens are its targets (what the model predicts at each position): read from the query dataset
when it is there (so unscored ``-100`` positions show too, uncoloured), else the scored tokens the results
keep (``results.token_targets``). Each token's text is ``decode([token_id])`` when a ``decode`` is given,
its id otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..objective import IGNORE_INDEX
from ..results import InfluenceResults
from .content import QueryView
from .previews import ExampleCatalog

__all__ = ["TokenCell", "TokenLine", "TokenTop", "TokenView", "token_views", "HEATMAP_LINES"]

#: top training sequences of each kind (harmful, helpful) given a line of the heat map
HEATMAP_LINES = 2


@dataclass(frozen=True)
class TokenCell:
    """One target position of a query: its flat ``position``, ``token_id``, ``text`` and whether it was
    scored (``False`` for ``-100`` padding)."""

    position: int
    token_id: int
    text: str
    scored: bool


@dataclass(frozen=True)
class TokenLine:
    """One line of the heat map: each cell's score (``None`` where unscored) for one training sequence
    (``train_id``; ``kind`` ``"harmful"`` / ``"helpful"``, ``rank`` among the query's top of that kind), or the
    sum over the query's top-k of a kind (``train_id`` ``None``, ``kind`` ``"harmful total"`` / ``"helpful
    total"``). ``sequence_score`` is the sum over the tokens (the query's score)."""

    kind: str
    rank: int
    train_id: Optional[int]
    sequence_score: float
    scores: List[Optional[float]]


@dataclass(frozen=True)
class TokenTop:
    """For one scored token: the training sequence with the largest (most harmful) and the most negative
    (most helpful) token score, and those scores."""

    position: int
    token_id: int
    text: str
    harmful_id: int
    harmful_score: float
    helpful_id: int
    helpful_score: float


@dataclass(frozen=True)
class TokenView:
    """The per-token picture of query row ``row`` (``query_id`` in the query dataset)."""

    row: int
    query_id: int
    cells: List[TokenCell]
    lines: List[TokenLine]
    tops: List[TokenTop]

    @property
    def scale(self) -> float:
        """The largest ``|score|`` over the lines (the heat map's full colour), at least a tiny positive."""
        values = [abs(v) for line in self.lines for v in line.scores if v is not None]
        return max(values, default=0.0) or 1e-30


def _cells(results: InfluenceResults, row: int, positions: List[int], targets: List[int],
           query: ExampleCatalog) -> List[TokenCell]:
    scored = dict(zip(positions, targets))
    _, label = query.example(int(results.query_indices[row]))
    full = None
    if label is not None and isinstance(label, torch.Tensor) and label.dim() >= 1:
        flat = label.reshape(-1)
        if not flat.is_floating_point() and (not positions or max(positions) < flat.numel()):
            full = flat.tolist()
    if full is None:
        return [TokenCell(p, t, query.token_text(t), True) for p, t in zip(positions, targets)]
    # every scored position, and the real tokens the loss leaves out (shown, uncoloured); padding dropped
    return [TokenCell(p, int(t), query.token_text(int(t)), p in scored) for p, t in enumerate(full)
            if p in scored or int(t) != IGNORE_INDEX]


def token_views(results: InfluenceResults, views: Sequence[QueryView], query: ExampleCatalog,
                lines: int = HEATMAP_LINES) -> List[TokenView]:
    """One :class:`TokenView` per query of ``views`` that has scored tokens (empty without per-token
    scores): the lines of its top ``lines`` harmful and helpful training sequences and the totals over its
    top-k of each kind, and each token's most harmful and most helpful training sequence."""
    if not results.has_token_scores:
        return []
    column: Dict[int, int] = {int(i): c for c, i in enumerate(results.train_indices.tolist())}
    out = []
    for view in views:
        tok = results.tokens_of(view.row)
        if tok.positions.numel() == 0:
            continue
        positions, targets = tok.positions.tolist(), tok.targets.tolist()
        cells = _cells(results, view.row, positions, targets, query)
        at = {p: j for j, p in enumerate(positions)}
        scores = tok.scores.double()

        def line(kind: str, rank: int, train_id: Optional[int], values: torch.Tensor) -> TokenLine:
            per = [float(values[at[c.position]]) if c.position in at else None for c in cells]
            return TokenLine(kind, rank, train_id, float(values.sum()), per)

        drawn: List[TokenLine] = []
        for kind, entries in (("harmful", view.harmful), ("helpful", view.helpful)):
            for e in entries[:lines]:
                drawn.append(line(kind, e.rank, e.train_id, scores[:, column[e.train_id]]))
            if len(entries) > 1:
                cols = [column[e.train_id] for e in entries]
                drawn.append(line(f"{kind} total", len(entries), None, scores[:, cols].sum(1)))
        hi, lo = scores.argmax(1).tolist(), scores.argmin(1).tolist()
        ids = results.train_indices.tolist()
        tops = [TokenTop(p, t, query.token_text(t), ids[hi[j]], float(scores[j, hi[j]]), ids[lo[j]],
                         float(scores[j, lo[j]])) for j, (p, t) in enumerate(zip(positions, targets))]
        out.append(TokenView(view.row, view.query_id, cells, drawn, tops))
    return out
