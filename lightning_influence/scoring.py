"""Streaming influence scores: training gradients dotted with the solved ``s_test`` vectors, chunk by
chunk, so memory holds one chunk of per-sample gradients ``[B, P]`` plus the ``[Q, N]`` score matrix."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Tuple

import torch
from torch import Tensor

from .errors import InfluenceRuntimeError
from .autodiff import DEFAULT_PLAN, Differentiation, per_sample_grads
from .functional import ParamSpace, PerExampleLoss, batch_size_of, nonfinite_rows

if TYPE_CHECKING:  # pragma: no cover
    from .problem import InfluenceProblem

__all__ = ["checked_grads", "influence_scores", "score_shard", "self_influence", "top_k"]

#: ``quadratic(G [B, P]) -> [B]``: ``gᵢᵀ (H + λI)⁻¹ gᵢ`` per row
Quadratic = Callable[[Tensor], Tensor]
Progress = Optional[Callable[[int], None]]


def checked_grads(loss: PerExampleLoss, space: ParamSpace, theta: Tensor, batch: object, what: str, start: int,
                  indices: Optional[Tensor] = None, plan: Differentiation = DEFAULT_PLAN) -> Tensor:
    """Per-sample gradients ``[B, P]`` (by ``plan``'s strategy, :mod:`~lightning_influence.autodiff`);
    raises naming the first example whose gradient is NaN/inf: its dataset index ``indices[start + j]``
    (``start + j`` when ``indices`` is ``None``, i.e. the batch covers the dataset in order)."""
    g = per_sample_grads(plan, loss, space, theta, batch)
    bad = nonfinite_rows(g)
    if bool(bad.any()):
        first = start + int(bad.nonzero()[0])
        if indices is not None:
            first = int(indices[first])
        raise InfluenceRuntimeError(
            f"the loss gradient of {what} example {first} (and {int(bad.sum()) - 1} more in its chunk) is "
            "NaN/inf at the trained weights. Influence needs finite gradients: check that example's inputs "
            "and label, and the loss (e.g. log of zero)."
        )
    return g


def influence_scores(
    problem: "InfluenceProblem",
    s_test: Tensor,
    progress: Progress = None,
    quadratic: Optional[Quadratic] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """``I_up,loss(z_i, z_q) = −s_qᵀ ∇L(z_i, θ̂)`` for every query ``q`` and training example ``i``, in one
    streamed pass of per-example gradients (``problem.grad_chunk_size`` at a time).

    Args:
        s_test: ``[Q, P]``, row ``q`` = ``(H + λI)⁻¹ ∇L(z_q, θ̂)``.
        quadratic: optional ``quadratic(G [B, P]) -> gᵢᵀ(H + λI)⁻¹gᵢ [B]``; when given, self-influence
            ``I_up,loss(z_i, z_i) = −gᵢᵀ(H + λI)⁻¹gᵢ`` is computed from the same gradients.

    Returns:
        ``([Q, N] scores, [N] self-influence or None)`` on ``s_test``'s device, in the training set's
        order. Positive scores = harmful (upweighting ``z_i`` raises the query loss), negative = helpful.
    """
    scores, self_inf = score_shard(problem, s_test, progress, quadratic)
    comm = problem.comm
    return comm.gather_columns(scores), None if self_inf is None else comm.gather_columns(self_inf)


def score_shard(
    problem: "InfluenceProblem",
    s_test: Tensor,
    progress: Progress = None,
    quadratic: Optional[Quadratic] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`influence_scores` for this process's shard of the training set only (no collectives):
    ``([Q, N_shard] scores, [N_shard] self-influence or None)``, columns ``problem.shard_bounds``."""
    lo, hi = problem.shard_bounds
    scores = torch.empty(s_test.shape[0], hi - lo, dtype=s_test.dtype, device=s_test.device)
    self_inf = torch.empty(hi - lo, dtype=s_test.dtype, device=s_test.device) if quadratic is not None else None
    for start, batch, g in problem.grad_chunks():
        cols = slice(start - lo, start - lo + g.shape[0])
        scores[:, cols] = -(s_test @ g.T)
        if quadratic is not None:
            self_inf[cols] = -quadratic(g)
        del g
        if progress:
            progress(batch_size_of(batch))
    return scores, self_inf


def self_influence(problem: "InfluenceProblem", quadratic: Quadratic, chunk_size: int, progress: Progress = None) -> Tensor:
    """``I_up,loss(z_i, z_i) = −∇L(z_i)ᵀ (H + λI)⁻¹ ∇L(z_i)`` for every training example ``[N]``, the
    gradients of ``chunk_size`` examples handed to ``quadratic`` at a time (an iterative solver solves
    them as one batch of right-hand sides).

    For positive definite ``H + λI`` the values are ≤ 0; the most negative ones (largest magnitude) are the
    examples the model depends on most to fit themselves: likely mislabelled or atypical.

    Over several processes every one walks the whole training set in the same chunks (the right-hand
    sides must be the same everywhere), and the solver splits each solve's Hessian-vector products by
    shard.
    """
    out = torch.empty(problem.num_examples, dtype=problem.dtype, device=problem.device)
    for start, batch in problem.train.chunks(chunk_size):
        g = problem.example_grads(batch, start)
        out[start : start + g.shape[0]] = -quadratic(g)
        if progress:
            progress(batch_size_of(batch))
    return out


def top_k(values: Tensor, k: int, largest: bool) -> Tuple[Tensor, Tensor]:
    """``(indices, values)`` of the ``k`` largest (or smallest) entries, ties broken by lower index."""
    k = min(int(k), values.numel())
    order = torch.argsort(values, descending=largest, stable=True)[:k]
    return order, values[order]
