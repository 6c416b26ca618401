"""``InfluenceProblem``: everything an inverse-HVP method may use to approximate ``(H + λI)⁻¹``.

The seam between the pipeline and the solvers (``settings.fit(problem, damping) -> InverseHVP``). A
solver that needs only Hessian-vector products uses :attr:`InfluenceProblem.operator`; a Kronecker-factored
method uses the objective's module and Fisher labels (:meth:`fisher_chunks`) to capture per-layer inputs
and output gradients; a low-rank method sweeps the operator. Nothing here knows Lightning, loggers or
devices beyond the tensors' own.

Under data parallelism (a :class:`~lightning_influence.distributed.Communicator` with ``W > 1``) every
process holds the same problem with its own contiguous shard of the training set (:attr:`shard`). Passes
over the training set are *declared* as sums (:meth:`InfluenceProblem.train_sum`, and the full-data and
minibatch products of :class:`~lightning_influence.curvature.operator.HessianOperator`): each process sums
its shard and the problem all-reduces, so a solver never touches the communicator and runs unchanged on
one process or several. Random streams that must differ per process come from :meth:`rank_seed`.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple, TypeVar

import torch
from torch import Tensor

from .curvature.operator import HessianOperator
from .data import ExampleSource
from .distributed import Communicator, local_communicator, shard_bounds
from .autodiff import per_sample_grads
from .functional import ParamSpace, batch_size_of
from .objective import Objective
from .scoring import checked_grads
from .seeds import Stream, derive_seed, rank_seed

T = TypeVar("T")

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
        gen = torch.Generator().manual_seed(derive_seed(seed, Stream.SUBSAMPLE))
        pick = torch.randperm(n, generator=gen)[: int(max_examples)]
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

    # ------------------------------------------------------------------ declared reductions
    def train_sum(self, fn: Callable[[int, Any], T], zero: Callable[[], T],
                  chunks: Optional[Iterable[Tuple[int, Any]]] = None) -> T:
        """``Σ fn(start, batch)`` over the whole training set: this process adds ``fn`` over its shard's
        chunks (``chunks``, default :meth:`~lightning_influence.data.ExampleSource.chunks` of the shard;
        ``start`` is the position in :attr:`train`) to ``zero()`` and the sums of every process are added
        in one collective. ``fn`` and ``zero`` return a tensor, or a list, tuple or dict of tensors (summed
        leaf by leaf; ``zero`` fixes the structure, also on a process whose shard is empty); every process
        gets the same total."""
        total: Any = zero()
        if chunks is None:
            lo = self.shard_bounds[0]
            chunks = ((lo + s, b) for s, b in self.shard.chunks(self.chunk_size))
        for start, batch in chunks:
            total = _add(total, fn(start, batch))
        return self.all_reduce(total)

    def grad_sum(self, fn: Callable[[int, Tensor], T], zero: Callable[[], T]) -> T:
        """``Σ fn(start, G_chunk)`` over per-example gradient chunks ``[B, P]`` of the whole training set
        (:meth:`grad_chunks` of this shard, then all-reduced): e.g. a sketch ``EᵀG``."""
        total: Any = zero()
        for start, _, g in self.grad_chunks():
            total = _add(total, fn(start, g))
        return self.all_reduce(total)

    def all_reduce(self, local: T) -> T:
        """Sum a per-process partial result (a tensor or a list, tuple or dict of tensors, the same
        structure on every process) over the processes: what :meth:`train_sum` does after its local loop."""
        comm = self.comm
        if not comm.distributed:
            return local
        leaves: List[Tensor] = []
        _flatten(local, leaves)
        summed = iter(comm.all_reduce_sum_all(leaves))
        return _rebuild(local, summed)

    def rank_seed(self, seed: int) -> int:
        """``seed`` for this process's own random stream (the same on one process as ``seed``)."""
        return rank_seed(seed, self.comm.rank)

    # ------------------------------------------------------------------ curvature access
    @cached_property
    def operator(self) -> HessianOperator:
        """Hessian-vector products of the mean training loss (built on first use; full-data products
        sweep this process's shard and all-reduce)."""
        return HessianOperator(self.objective.loss, self.space, self.theta, self.shard, self.chunk_size,
                               comm=self.comm, num_total=self.num_examples, plan=self.objective.differentiation)

    def example_grads(self, batch: Any, start: int = 0) -> Tensor:
        """``∇L(z_i, θ̂)`` for each example of a prepared training batch, ``[B, P]`` (raises naming the
        dataset position ``start + j`` of a non-finite one)."""
        return checked_grads(self.objective.loss, self.space, self.theta, batch, "training", start,
                             plan=self.objective.differentiation)

    def grad_chunks(self) -> Iterator[Tuple[int, Any, Tensor]]:
        """``(start, batch, ∇L [B, P])`` over this process's shard in dataset order, ``grad_chunk_size``
        at a time; ``start`` is the position in :attr:`train` (the column of the scores)."""
        lo = self.shard_bounds[0]
        for start, batch in self.shard.chunks(self.grad_chunk_size):
            yield lo + start, batch, self.example_grads(batch, lo + start)

    def fisher_chunks(self, seed: int, chunk_size: int | None = None) -> Iterator[Tuple[int, Any]]:
        """``(start, batch)`` over this process's shard with labels for the Fisher: drawn from the model's
        predictive distribution where :attr:`Objective.fisher` is ``"sampled"`` (the default cross-entropy
        does it here, each example's draw a function of ``seed`` and its dataset position, so one process
        and several draw the same; a ``sample``-aware ``influence_loss`` does it in
        :attr:`Objective.fisher_loss`), the training labels otherwise. Use with ``objective.fisher_loss``.
        ``start`` is the position in :attr:`train`."""
        lo = self.shard_bounds[0]
        for start, batch in self.shard.chunks(chunk_size or self.chunk_size):
            positions = self.shard.indices[start : start + batch_size_of(batch)].tolist()
            yield lo + start, self.objective.fisher_batch(batch, seed, positions)

    def fisher_grads(self, batch: Any) -> Tensor:
        """Per-example gradients ``[B, P]`` of :attr:`Objective.fisher_loss` on a batch from
        :meth:`fisher_chunks` (vmap randomness ``"different"``: a sampling loss draws per example)."""
        return per_sample_grads(self.objective.differentiation, self.objective.fisher_loss, self.space, self.theta, batch,
                                randomness="different")


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, Tensor):
        return a.add_(b)
    if isinstance(a, dict):
        return {k: _add(a[k], b[k]) for k in a}
    return type(a)(_add(x, y) for x, y in zip(a, b))


def _flatten(tree: Any, out: List[Tensor]) -> None:
    if isinstance(tree, Tensor):
        out.append(tree)
    elif isinstance(tree, dict):
        for k in tree:
            _flatten(tree[k], out)
    else:
        for x in tree:
            _flatten(x, out)


def _rebuild(tree: Any, leaves: Iterator[Tensor]) -> Any:
    if isinstance(tree, Tensor):
        return next(leaves)
    if isinstance(tree, dict):
        return {k: _rebuild(tree[k], leaves) for k in tree}
    return type(tree)(_rebuild(x, leaves) for x in tree)
