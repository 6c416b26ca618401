"""``InfluenceProblem``: everything an inverse-HVP method may use to approximate ``(H + λI)⁻¹``.

The seam between the pipeline and the solvers (``settings.fit(problem, damping) -> InverseHVP``). A
solver that needs only Hessian-vector products uses :attr:`InfluenceProblem.operator`; a Kronecker-factored
method uses the objective's module and Fisher labels (:meth:`fisher_chunks`) to capture per-layer inputs
and output gradients; a low-rank method sweeps the operator. Nothing here knows Lightning, loggers or
devices beyond the tensors' own.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Iterator, Tuple

import torch
from torch import Tensor

from .data import ExampleSource
from .functional import ParamSpace, per_sample_grads
from .objective import Objective
from .operator import HessianOperator
from .scoring import checked_grads

__all__ = ["InfluenceProblem"]


class InfluenceProblem:
    """The trained model's objective, its training examples and how to sweep them.

    ``H`` is the Hessian of the mean training loss ``R(θ) = (1/n) Σ_i L(z_i, θ)`` at the trained
    parameters ``θ̂`` (:attr:`theta`), over the attributed parameters only (:attr:`space`).

    Args:
        objective: per-example loss as a function of the flat attributed parameters.
        train: the training examples, prepared for the parameters' device and dtype.
        chunk_size: examples per full-data pass chunk (forward passes, HVP sweeps).
        grad_chunk_size: examples per per-example-gradient chunk (``[B, P]`` in memory); default
            ``chunk_size``.
    """

    def __init__(self, objective: Objective, train: ExampleSource, chunk_size: int = 256,
                 grad_chunk_size: int | None = None) -> None:
        self.objective = objective
        self.train = train
        self.chunk_size = int(chunk_size)
        self.grad_chunk_size = int(grad_chunk_size or chunk_size)

    def subsample(self, max_examples: int, seed: int) -> "InfluenceProblem":
        """The same problem on at most ``max_examples`` training examples drawn without replacement (from
        ``seed``; kept in dataset order), or ``self`` when there are no more than that. Its Hessian is
        that of the subset's mean loss: an estimate of ``H`` for fitting approximations (a
        preconditioner), never the target of a solve."""
        n = self.num_examples
        if max_examples >= n:
            return self
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[: int(max_examples)]
        src = self.train
        sub = ExampleSource(src.dataset, src.collate_fn, src.prepare, indices=src.indices[pick.sort().values].tolist(),
                            what="training")
        return InfluenceProblem(self.objective, sub, self.chunk_size, self.grad_chunk_size)

    # ------------------------------------------------------------------ sizes
    @property
    def space(self) -> ParamSpace:
        return self.objective.space

    @property
    def theta(self) -> Tensor:
        return self.objective.theta

    @property
    def num_params(self) -> int:
        return self.objective.num_params

    @property
    def num_examples(self) -> int:
        return len(self.train)

    @property
    def dtype(self) -> torch.dtype:
        return self.theta.dtype

    @property
    def device(self) -> torch.device:
        return self.theta.device

    # ------------------------------------------------------------------ curvature access
    @cached_property
    def operator(self) -> HessianOperator:
        """Hessian-vector products of the mean training loss (built on first use)."""
        return HessianOperator(self.objective.loss, self.space, self.theta, self.train, self.chunk_size)

    def example_grads(self, batch: Any, start: int = 0) -> Tensor:
        """``∇L(z_i, θ̂)`` for each example of a prepared training batch, ``[B, P]`` (raises naming the
        dataset position ``start + j`` of a non-finite one)."""
        return checked_grads(self.objective.loss, self.space, self.theta, batch, "training", start)

    def grad_chunks(self) -> Iterator[Tuple[int, Any, Tensor]]:
        """``(start, batch, ∇L [B, P])`` over the training set in dataset order, ``grad_chunk_size`` at
        a time."""
        for start, batch in self.train.chunks(self.grad_chunk_size):
            yield start, batch, self.example_grads(batch, start)

    def fisher_chunks(self, seed: int, chunk_size: int | None = None) -> Iterator[Tuple[int, Any]]:
        """``(start, batch)`` over the training set with labels for the Fisher: drawn from the model's
        predictive distribution where :attr:`Objective.fisher` is ``"sampled"`` (the default cross-entropy
        does it here; a ``sample``-aware ``influence_loss`` does it in :attr:`Objective.fisher_loss`),
        the training labels otherwise. Use with ``objective.fisher_loss``. Same ``seed``, same labels."""
        gen = torch.Generator().manual_seed(int(seed))
        for start, batch in self.train.chunks(chunk_size or self.chunk_size):
            yield start, self.objective.fisher_batch(batch, gen)

    def fisher_grads(self, batch: Any) -> Tensor:
        """Per-example gradients ``[B, P]`` of :attr:`Objective.fisher_loss` on a batch from
        :meth:`fisher_chunks` (vmap randomness ``"different"``: a sampling loss draws per example)."""
        return per_sample_grads(self.objective.fisher_loss, self.space, self.theta, batch, randomness="different")
