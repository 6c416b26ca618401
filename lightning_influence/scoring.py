"""Streaming influence scores: training gradients dotted with the solved ``s_test`` vectors, chunk by
chunk, so memory holds one chunk of per-sample gradients ``[B, P]`` plus the ``[Q, N]`` score matrix."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .data import ExampleSource
from .errors import InfluenceRuntimeError
from .functional import ParamSpace, PerExampleLoss, batch_size_of, per_sample_grads

__all__ = ["checked_grads", "influence_scores", "self_influence", "top_k"]

Solve = Callable[[Tensor], Tensor]
Progress = Optional[Callable[[int], None]]


def checked_grads(loss: PerExampleLoss, space: ParamSpace, theta: Tensor, batch: object, what: str, start: int) -> Tensor:
    """Per-sample gradients ``[B, P]``; raises naming the first example whose gradient is NaN/inf."""
    g = per_sample_grads(loss, space, theta, batch)
    bad = ~torch.isfinite(g).all(dim=1)
    if bool(bad.any()):
        first = start + int(bad.nonzero()[0])
        raise InfluenceRuntimeError(
            f"the loss gradient of {what} example {first} (and {int(bad.sum()) - 1} more in its chunk) is "
            "NaN/inf at the trained weights. Influence needs finite gradients: check that example's inputs "
            "and label, and the loss (e.g. log of zero)."
        )
    return g


def influence_scores(
    loss: PerExampleLoss,
    space: ParamSpace,
    theta: Tensor,
    train: ExampleSource,
    s_test: Tensor,
    chunk_size: int,
    progress: Progress = None,
) -> Tensor:
    """``I_up,loss(z_i, z_q) = −s_qᵀ ∇L(z_i, θ̂)`` for every query ``q`` and training example ``i``.

    Args:
        s_test: ``[Q, P]``, row ``q`` = ``(H + λI)⁻¹ ∇L(z_q, θ̂)``.

    Returns:
        ``[Q, N]`` scores on ``s_test``'s device, in ``train``'s order. Positive = harmful (upweighting
        ``z_i`` raises the query loss), negative = helpful.
    """
    n = len(train)
    scores = torch.empty(s_test.shape[0], n, dtype=s_test.dtype, device=s_test.device)
    for start, batch in train.chunks(chunk_size):
        g = checked_grads(loss, space, theta, batch, "training", start)
        scores[:, start : start + g.shape[0]] = -(s_test @ g.T)
        del g
        if progress:
            progress(batch_size_of(batch))
    return scores


def self_influence(
    loss: PerExampleLoss,
    space: ParamSpace,
    theta: Tensor,
    train: ExampleSource,
    solve: Solve,
    chunk_size: int,
    progress: Progress = None,
) -> Tensor:
    """``I_up,loss(z_i, z_i) = −∇L(z_i)ᵀ (H + λI)⁻¹ ∇L(z_i)`` for every training example ``[N]``.

    Each chunk's gradients are solved as one batch of right-hand sides. For positive definite ``H + λI``
    the values are ≤ 0; the most negative ones (largest magnitude) are the examples the model depends on
    most to fit themselves: likely mislabelled or atypical.
    """
    out = torch.empty(len(train), dtype=theta.dtype, device=theta.device)
    for start, batch in train.chunks(chunk_size):
        g = checked_grads(loss, space, theta, batch, "training", start)
        out[start : start + g.shape[0]] = -(solve(g) * g).sum(dim=1)
        if progress:
            progress(batch_size_of(batch))
    return out


def top_k(values: Tensor, k: int, largest: bool) -> Tuple[Tensor, Tensor]:
    """``(indices, values)`` of the ``k`` largest (or smallest) entries, ties broken by lower index."""
    k = min(int(k), values.numel())
    order = torch.argsort(values, descending=largest, stable=True)[:k]
    return order, values[order]
