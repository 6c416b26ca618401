"""``InfluenceResults``: the one object every report and user reads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Dict, NamedTuple, Optional, Union

import torch
from torch import Tensor

from .errors import InfluenceConfigError
from .scoring import top_k

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["InfluenceResults", "Ranked"]

_FORMAT_VERSION = 1


class Ranked(NamedTuple):
    """Training examples ranked for one query: dataset ``indices`` and their ``scores``."""

    indices: Tensor
    scores: Tensor


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
