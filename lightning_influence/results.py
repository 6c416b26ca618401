"""``InfluenceResults``: the one object every report and user reads."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Union

import torch
from torch import Tensor

from .errors import InfluenceConfigError
from .scoring import top_k

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["InfluenceResults", "Ranked", "SolveChunk", "PER_QUERY_DIAGNOSTICS"]

_FORMAT_VERSION = 1

#: solver diagnostics recorded as one value per query of a chunk (LiSSA): ``relative_stderr`` is the
#: relative standard error of the query's training scores over the repeats (dimensionless, NaN with one
#: repeat); ``depth_per_query`` the recursion steps run for the query (the most over repeats)
PER_QUERY_DIAGNOSTICS = ("relative_stderr", "depth_per_query")


class Ranked(NamedTuple):
    """Training examples ranked for one query: dataset ``indices`` and their ``scores``."""

    indices: Tensor
    scores: Tensor


class SolveChunk(NamedTuple):
    """One chunk of queries the solver handled together: rows ``start:stop`` of ``scores`` and the
    diagnostics the solver returned for them."""

    start: int
    stop: int
    diagnostics: Dict[str, Any]


def _number(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


@dataclass
class InfluenceResults:
    """Influence of every training example on every query.

    Sign convention (Koh & Liang, 2017): ``scores[q, i] = I_up,loss(z_i, z_q) =
    −∇L(z_q)ᵀ (H + λI)⁻¹ ∇L(z_i)``, in units of query loss per unit of up-weighting.
    **Positive = harmful** (up-weighting ``z_i`` raises query ``q``'s loss; removing it would lower it),
    **negative = helpful**. Removing ``z_i`` changes the query loss by about ``−scores[q, i] / n``
    (:meth:`predicted_loss_change`).

    Attributes:
        scores: ``[Q, N]`` float tensor on the CPU.
        query_indices: ``[Q]`` positions of the queries in the query dataset.
        train_indices: ``[N]`` positions of the scored examples in the training dataset (column ``i`` of
            ``scores`` is training example ``train_indices[i]``).
        query_losses: ``[Q]`` loss of each query at the trained weights.
        self_influence: ``[N]`` ``I_up,loss(z_i, z_i)`` (≤ 0 for a positive definite Hessian; most
            negative = the model relies most on the example to fit itself), or ``None``.
        query_targets / query_predictions: ``[Q]`` labels and predicted classes when known.
        settings: how the scores were computed (solver settings, damping λ, dtype, parameters, n).
        diagnostics: solver diagnostics as data (iterations, residuals, norm histories, …).
        timings: seconds per phase, and ``total``.
    """

    scores: Tensor
    query_indices: Tensor
    train_indices: Tensor
    query_losses: Tensor
    self_influence: Optional[Tensor] = None
    query_targets: Optional[Tensor] = None
    query_predictions: Optional[Tensor] = None
    settings: Dict[str, Any] = field(default_factory=dict)
    diagnostics: Dict[str, Any] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        q, n = self.scores.shape
        if self.query_indices.shape != (q,) or self.train_indices.shape != (n,):
            raise InfluenceConfigError(
                f"scores {tuple(self.scores.shape)} disagree with query_indices {tuple(self.query_indices.shape)} "
                f"or train_indices {tuple(self.train_indices.shape)}."
            )

    # ------------------------------------------------------------------ sizes
    @property
    def num_queries(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_train(self) -> int:
        return int(self.scores.shape[1])

    @property
    def damping(self) -> float:
        """The damping ``λ`` the scores were computed with (Hessian units)."""
        return float(self.settings.get("damping", float("nan")))

    @property
    def wall_time(self) -> float:
        """Total seconds spent computing these results."""
        return float(self.timings.get("total", sum(self.timings.values())))

    # ------------------------------------------------------------------ diagnostics
    def solve_chunks(self) -> List[SolveChunk]:
        """The solver's diagnostics per query chunk, in order, with the rows of ``scores`` each chunk
        covers (``[]`` when none were recorded, e.g. results from older files).

        Chunk ``k`` covers the queries ``k·query_batch_size`` up to the next chunk; a chunk that recorded
        per-query lists (:data:`PER_QUERY_DIAGNOSTICS`) covers as many rows as they have entries. Entries
        of ``diagnostics["solve"]`` that are not dicts count as chunks without diagnostics.
        """
        raw = (self.diagnostics or {}).get("solve") or []
        if isinstance(raw, dict):
            raw = [raw]
        if not isinstance(raw, (list, tuple)):
            return []
        q = self.num_queries
        qb = self.settings.get("query_batch_size")
        if not isinstance(qb, int) or isinstance(qb, bool) or qb < 1:
            qb = -(-q // len(raw)) if raw else q
        out, start = [], 0
        for chunk in raw:
            d = chunk if isinstance(chunk, dict) else {}
            sizes = [len(d[k]) for k in PER_QUERY_DIAGNOSTICS if isinstance(d.get(k), (list, tuple))]
            stop = min(start + (sizes[0] if sizes else qb), q)
            out.append(SolveChunk(start, stop, d))
            start = stop
        return out

    def per_query_diagnostics(self) -> Dict[str, Tensor]:
        """Per-query solver diagnostics concatenated over the query chunks: ``{name: [Q] float64 tensor}``
        for each name of :data:`PER_QUERY_DIAGNOSTICS` that at least one chunk recorded, entry ``q``
        belonging to row ``q`` of ``scores``. NaN where a chunk did not record the value (or recorded NaN,
        as LiSSA does for ``relative_stderr`` with one repeat). Empty for the exact and CG solvers.

        * ``relative_stderr``: relative standard error of the query's scores (its ``s_test = (H + λI)⁻¹
          ∇L(z_q)`` applied to the training gradients, through LiSSA's score sketch) across LiSSA repeats
          (dimensionless; 0.05 = 5 %). It measures sampling noise, not the bias of stopping early.
        * ``depth_per_query``: LiSSA recursion steps run for the query (most over repeats).
        """
        chunks = self.solve_chunks()
        out: Dict[str, Tensor] = {}
        for key in PER_QUERY_DIAGNOSTICS:
            if not any(isinstance(c.diagnostics.get(key), (list, tuple)) for c in chunks):
                continue
            values = torch.full((self.num_queries,), math.nan, dtype=torch.float64)
            for c in chunks:
                v = c.diagnostics.get(key)
                if isinstance(v, (list, tuple)):
                    n = min(len(v), c.stop - c.start)
                    values[c.start : c.start + n] = torch.tensor([_number(x) for x in v[:n]], dtype=torch.float64)
            out[key] = values
        return out

    # ------------------------------------------------------------------ rankings
    def _row(self, query: int) -> Tensor:
        if not -self.num_queries <= int(query) < self.num_queries:
            raise IndexError(f"query={query} is out of range for {self.num_queries} queries (0..{self.num_queries - 1}).")
        return self.scores[int(query)]

    def top_harmful(self, query: int, k: int = 10) -> Ranked:
        """The ``k`` training examples with the largest positive scores for row ``query`` of ``scores``:
        removing them would lower that query's loss the most."""
        idx, vals = top_k(self._row(query), k, largest=True)
        return Ranked(self.train_indices[idx], vals)

    def top_helpful(self, query: int, k: int = 10) -> Ranked:
        """The ``k`` training examples with the most negative scores: removing them would raise the
        query's loss the most."""
        idx, vals = top_k(self._row(query), k, largest=False)
        return Ranked(self.train_indices[idx], vals)

    def top_self_influence(self, k: int = 10) -> Ranked:
        """The ``k`` training examples with the most negative self-influence (likely mislabelled or
        atypical: the model must bend most to fit them)."""
        if self.self_influence is None:
            raise InfluenceConfigError(
                "self-influence was not computed; pass self_influence=True to InfluenceCallback or compute_influence."
            )
        idx, vals = top_k(self.self_influence, k, largest=False)
        return Ranked(self.train_indices[idx], vals)

    def predicted_loss_change(self) -> Tensor:
        """``[Q, N]``: first-order change in each query's loss if each training example were removed,
        ``−scores / n`` (loss units)."""
        return -self.scores / float(self.settings.get("num_train_total", self.num_train))

    # ------------------------------------------------------------------ persistence
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the results with ``torch.save`` (tensors on the CPU, plain-data settings)."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state = {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in state.items()}
        state["format_version"] = _FORMAT_VERSION
        torch.save(state, os.fspath(path))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> "InfluenceResults":
        """Read results written by :meth:`save` (safe ``weights_only`` loading)."""
        state = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
        version = state.pop("format_version", None)
        if version != _FORMAT_VERSION:
            raise InfluenceConfigError(f"{path} is not an InfluenceResults file of format {_FORMAT_VERSION} (found {version}).")
        return cls(**state)

    def to_dataframe(self) -> "pd.DataFrame":
        """Long-form table, one row per (query, training example): ``query_index``, ``train_index``,
        ``score`` and ``predicted_loss_change``. Needs pandas."""
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("to_dataframe() needs pandas: pip install pandas") from err
        q, n = self.scores.shape
        return pd.DataFrame(
            {
                "query_index": self.query_indices.repeat_interleave(n).numpy(),
                "train_index": self.train_indices.repeat(q).numpy(),
                "score": self.scores.reshape(-1).double().numpy(),
                "predicted_loss_change": self.predicted_loss_change().reshape(-1).double().numpy(),
            }
        )

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"InfluenceResults(queries={self.num_queries}, train={self.num_train}, solver={s.get('solver')!r}, "
            f"damping={s.get('damping')}, self_influence={self.self_influence is not None}, "
            f"wall_time={self.wall_time:.2f}s)"
        )
