"""``InfluenceProblem``: everything an inverse-HVP method may use to approximate ``(H + λI)⁻¹``.

The seam between the pipeline and the solvers (``settings.fit(problem, damping) -> InverseHVP``). A
solver that needs only Hessian-vector products uses :attr:`InfluenceProblem.operator`; a Kronecker-factored
method uses the objective's module and Fisher labels (:meth:`fisher_chunks`) to capture per-layer inputs
and output gradients; a low-rank method sweeps the operator. Nothing here knows Lightning, loggers or
devices beyond the tensors' own.

Under data parallelism (a :class:`~lightning_influence.distributed.Communicator` with ``W > 1``) every
process holds the same problem with its own contiguous shard of the training set (:attr:`shard`); the
full-data passes here and in :class:`~lightning_influence.operator.HessianOperator` sum the shard and
all-reduce, so a solver written against this class runs unchanged on one process or several.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Iterator, Tuple

import torch
from torch import Tensor

from .data import ExampleSource
from .distributed import Communicator, local_communicator, shard_bounds
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
        comm: the processes sharing the work (default: this one alone).
    """

    def __init__(self, objective: Objective, train: ExampleSource, chunk_size: int = 256,
                 grad_chunk_size: int | None = None, comm: Communicator | None = None) -> None:
        self.objective = objective
        self.train = train
        self.chunk_size = int(chunk_size)
        self.grad_chunk_size = int(grad_chunk_size or chunk_size)
        self.comm = local_communicator(comm)
        #: ``[start, stop)``: this process's contiguous shard, as positions in :attr:`train`
        self.shard_bounds = shard_bounds(len(train), self.comm.rank, self.comm.world_size)
        lo, hi = self.shard_bounds
        self.shard = train if (lo, hi) == (0, len(train)) else train.subset(range(lo, hi), allow_empty=True)

    def subsample(self, max_examples: int, seed: int) -> "InfluenceProblem":
        """The same problem on at most ``max_examples`` training examples drawn without replacement (from
        ``seed``; kept in dataset order), or ``self`` when there are no more than that. Its Hessian is
        that of the subset's mean loss: an estimate of ``H`` for fitting approximations (a
        preconditioner), never the target of a solve."""
        n = self.num_examples
        if max_examples >= n:
            return self
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[: int(max_examples)]
        return InfluenceProblem(self.objective, self.train.subset(pick.sort().values), self.chunk_size,
                                self.grad_chunk_size, self.comm)

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
        """``n``: training examples in all (every shard)."""
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
        """Hessian-vector products of the mean training loss (built on first use; full-data products
        sweep this process's shard and all-reduce)."""
        return HessianOperator(self.objective.loss, self.space, self.theta, self.shard, self.chunk_size,
                               comm=self.comm, num_total=self.num_examples)

    def example_grads(self, batch: Any, start: int = 0) -> Tensor:
        """``∇L(z_i, θ̂)`` for each example of a prepared training batch, ``[B, P]`` (raises naming the
        dataset position ``start + j`` of a non-finite one)."""
        return checked_grads(self.objective.loss, self.space, self.theta, batch, "training", start)

    def grad_chunks(self) -> Iterator[Tuple[int, Any, Tensor]]:
        """``(start, batch, ∇L [B, P])`` over this process's shard in dataset order, ``grad_chunk_size``
        at a time; ``start`` is the position in :attr:`train` (the column of the scores)."""
        lo = self.shard_bounds[0]
        for start, batch in self.shard.chunks(self.grad_chunk_size):
            yield lo + start, batch, self.example_grads(batch, lo + start)

    def fisher_chunks(self, seed: int, chunk_size: int | None = None) -> Iterator[Tuple[int, Any]]:
        """``(start, batch)`` over the training set with labels for the Fisher: drawn from the model's
        predictive distribution where :attr:`Objective.fisher` is ``"sampled"`` (the default cross-entropy
        does it here; a ``sample``-aware ``influence_loss`` does it in :attr:`Objective.fisher_loss`),
        the training labels otherwise. Use with ``objective.fisher_loss``. Same ``seed`` (and rank),
        same labels. Covers this process's shard; ``start`` is the position in :attr:`train`."""
        gen = torch.Generator().manual_seed(int(seed) + 1_000_003 * self.comm.rank)
        lo = self.shard_bounds[0]
        for start, batch in self.shard.chunks(chunk_size or self.chunk_size):
            yield lo + start, self.objective.fisher_batch(batch, gen)

    def fisher_grads(self, batch: Any) -> Tensor:
        """Per-example gradients ``[B, P]`` of :attr:`Objective.fisher_loss` on a batch from
        :meth:`fisher_chunks` (vmap randomness ``"different"``: a sampling loss draws per example)."""
        return per_sample_grads(self.objective.fisher_loss, self.space, self.theta, batch, randomness="different")
