"""The linear datamodeling score (LDS; Park et al., 2023, TRAK): how well attribution scores predict what
retraining on random subsets of the training set does.

Protocol: draw ``m`` subsets ``S_j`` (each example kept with the same fraction ``α``, e.g. ``m = 100``,
``α = 0.5``), retrain on each, and measure each test example's output ``f_q(S_j)`` (its loss, or a
margin). The attribution's prediction for a subset is the sum of its examples' scores: with influence
scores (``I_up,loss``, positive = harmful), removing the examples outside ``S`` changes the loss by about
``Σ_{i∉S} −score_i / n``, so the predicted loss is ``const + (1/n) Σ_{i∈S} score_i``, increasing in
``Σ_{i∈S} score_i`` (:func:`predicted_outputs`). The LDS of query ``q`` is the Spearman correlation across
the ``m`` subsets between ``f_q(S_j)`` and that sum; the LDS is its mean over queries (near 1: the scores
rank subsets as retraining does; 0: no better than chance).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..errors import InfluenceConfigError
from ..seeds import derive_seed

__all__ = ["linear_datamodeling_score", "predicted_outputs", "spearman", "subset_masks"]

_STREAM = 0x4C4453  # "LDS"


def subset_masks(num_examples: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> Tensor:
    """``[m, n]`` boolean masks of ``m`` random subsets, each of exactly ``round(fraction · n)`` examples drawn
    without replacement from its own seed (subset ``j``: ``derive_seed(seed, stream, j)``)."""
    if not 0.0 < float(fraction) <= 1.0:
        raise InfluenceConfigError(
            f"fraction={fraction!r} must be in (0, 1] (the share of examples each subset keeps).")
    if num_subsets < 2:
        raise InfluenceConfigError(f"num_subsets={num_subsets!r} must be at least 2 (a correlation across subsets).")
    size = max(1, round(float(fraction) * num_examples))
    masks = torch.zeros(num_subsets, num_examples, dtype=torch.bool)
    for j in range(num_subsets):
        gen = torch.Generator().manual_seed(derive_seed(seed, _STREAM, j))
        masks[j, torch.randperm(num_examples, generator=gen)[:size]] = True
    return masks


def predicted_outputs(scores: Tensor, masks: Tensor) -> Tensor:
    """``[Q, m]``: ``Σ_{i∈S_j} scores[q, i]``, the attribution's prediction for each subset (for influence
    scores, an increasing affine function of the predicted query loss; see the module docstring)."""
    return scores.double() @ masks.double().T


def _ranks(x: Tensor) -> Tensor:
    """Ranks along the last dimension, ties given their average rank."""
    order = torch.argsort(x, dim=-1, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], dtype=torch.float64).expand_as(x).contiguous())
    # average ties: mean rank of each group of equal values
    sorted_x = x.gather(-1, order)
    out = ranks.clone()
    for row in range(x.shape[0]):
        _, inverse, counts = torch.unique_consecutive(sorted_x[row], return_inverse=True, return_counts=True)
        if counts.max() == 1:
            continue
        starts = torch.cumsum(counts, 0) - counts
        mean_rank = (starts + (counts - 1) / 2.0).double()
        out[row, order[row]] = mean_rank[inverse]
    return out


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of the rows of ``a`` and ``b`` ``[Q, m]`` (ties: average ranks), ``[Q]``;
    NaN for a row that is constant."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def linear_datamodeling_score(scores: Tensor, masks: Tensor, outputs: Tensor) -> Tuple[float, Tensor]:
    """``(LDS, per-query [Q])`` of influence ``scores`` ``[Q, n]`` (positive = harmful) against the retrained
    models' ``outputs`` ``[m, Q]`` (the loss of query ``q`` after training on subset ``j``; use a quantity
    that *rises* with the loss, or negate a margin) on the subsets ``masks`` ``[m, n]``."""
    if outputs.shape != (masks.shape[0], scores.shape[0]) or masks.shape[1] != scores.shape[1]:
        raise InfluenceConfigError(
            f"scores {tuple(scores.shape)} [Q, n], masks {tuple(masks.shape)} [m, n] and outputs "
            f"{tuple(outputs.shape)} [m, Q] disagree.")
    per_query = spearman(outputs.double().T, predicted_outputs(scores, masks))
    return float(per_query.nanmean()), per_query
