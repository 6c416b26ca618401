"""The curvature every solver inverts: the Hessian of the empirical risk at the trained parameters.

``H = ∇²R(θ̂)``, ``R(θ) = (1/n) Σ_i L(z_i, θ)``. Damping is *not* included here; solvers add ``λI``.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..data import ExampleSource
from ..distributed import Communicator, local_communicator, shard_bounds
from ..seeds import rank_seed
from ..autodiff import DEFAULT_PLAN, Differentiation, batch_hvp, per_sample_grads
from ..functional import ParamSpace, PerExampleLoss, batch_size_of

__all__ = ["DENSE_BLOCK", "HessianOperator"]

#: identity columns per sweep of :meth:`HessianOperator.dense` (right-hand sides batched in one full-data product)
DENSE_BLOCK = 512


class HessianOperator:
    """Hessian-vector products of the mean training loss, on minibatches or on the whole training set.

    Args:
        loss: per-example loss ``loss(params, batch) -> Tensor[B]``.
        space: layout of the flat parameter vector.
        theta: trained parameters ``[P]``.
        data: the training examples (already prepared for ``theta``'s device and dtype): all of them, or
            this process's shard of them when ``comm`` spans several processes.
        chunk_size: examples per HVP when sweeping the whole training set.
        comm: the processes sharing the training set (default: this one alone).
        num_total: ``n``, the training examples of all shards (default ``len(data)``).
        plan: how the products are taken (:class:`~lightning_influence.autodiff.Differentiation`: forward over
            reverse, reverse over reverse or finite differences, plain or composite kernels), chosen once
            per problem by :func:`~lightning_influence.autodiff.probe`.
    """

    def __init__(
        self,
        loss: PerExampleLoss,
        space: ParamSpace,
        theta: Tensor,
        data: ExampleSource,
        chunk_size: int = 256,
        comm: Optional[Communicator] = None,
        num_total: Optional[int] = None,
        plan: Differentiation = DEFAULT_PLAN,
    ) -> None:
        self.loss, self.space, self.theta, self.data = loss, space, theta, data
        self.plan = plan
        self.chunk_size = int(chunk_size)
        self.comm = local_communicator(comm)
        self._num_total = len(data) if num_total is None else int(num_total)
        self.hvp_calls = 0  # number of batched HVP evaluations (one per batch per call)
        #: right-hand sides vmapped together inside one HVP (``None``: all); see :meth:`tune_tangent_chunk`
        self.tangent_chunk: Optional[int] = None

    @property
    def num_params(self) -> int:
        return self.space.num_params

    @property
    def num_examples(self) -> int:
        """``n``: training examples of all shards."""
        return self._num_total

    @property
    def dtype(self) -> torch.dtype:
        return self.theta.dtype

    @property
    def device(self) -> torch.device:
        return self.theta.device

    def batch_hvp(self, batch: Any, vectors: Tensor) -> Tensor:
        """``H_B V``: the Hessian of the batch's mean loss times each row of ``vectors`` ``[Q, P]``."""
        self.hvp_calls += 1
        chunk = self.tangent_chunk if self.tangent_chunk and self.tangent_chunk < vectors.shape[0] else None
        return batch_hvp(self.plan, self.loss, self.space, self.theta, batch, vectors, chunk)

    def tune_tangent_chunk(
        self, batch: Any, vectors: Tensor, candidates: Sequence[int] = (64, 32, 16, 8), allow_all: bool = True
    ) -> int:
        """Time one HVP of ``vectors`` on ``batch`` in each candidate chunk size up to ``Q`` (and with all
        rows vmapped together when ``allow_all``), and keep the fastest as :attr:`tangent_chunk` (two calls
        each, the second timed). The results do not depend on the choice; on a CPU, chunks of 16–32
        right-hand sides keep the tangent activations in cache (``benchmarks/README.md``). Callers with many right-hand sides time a slice of them with ``allow_all=False``, so that
        tuning never holds the tangents of every query at once.

        Returns:
            the right-hand sides per vmap chosen (``Q`` when all at once).
        """
        q = int(vectors.shape[0])
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        best: Tuple[float, Optional[int]] = (float("inf"), None)
        options: List[Optional[int]] = ([None] if allow_all else []) + [c for c in candidates if c < q or not allow_all]
        for chunk in options or [None]:
            self.tangent_chunk = chunk
            for _ in range(2):
                sync()
                t0 = time.perf_counter()
                self.batch_hvp(batch, vectors)
                sync()
            best = min(best, (time.perf_counter() - t0, chunk), key=lambda b: b[0])
        self.tangent_chunk = best[1]
        return best[1] or q

    def example_grads(self, batch: Any) -> Tensor:
        """Per-example loss gradients ``∇L(z_i, θ̂)`` of a batch of training examples, ``[B, P]``."""
        return per_sample_grads(self.plan, self.loss, self.space, self.theta, batch)

    def full_hvp(self, vectors: Tensor) -> Tensor:
        """``H V`` for the whole training set: ``Σ_chunks (b/n) H_chunk V``, in dataset order (this
        process's shard, all-reduced)."""
        out = torch.zeros_like(vectors)
        n = self.num_examples
        for _, batch in self.data.chunks(self.chunk_size):
            b = batch_size_of(batch)
            out.add_(self.batch_hvp(batch, vectors), alpha=b / n)
        return self.comm.all_reduce_sum(out)

    def _local_batch_sizes(self, batch_size: int) -> List[int]:
        """Each rank's part of a minibatch of ``batch_size`` (at most its shard's size)."""
        comm, n = self.comm, self.num_examples
        batch_size = min(int(batch_size), n)
        sizes = []
        for r in range(comm.world_size):
            lo, hi = shard_bounds(n, r, comm.world_size)
            part = shard_bounds(batch_size, r, comm.world_size)
            sizes.append(min(part[1] - part[0], hi - lo))
        return sizes

    def minibatches(self, batch_size: int, seed: int) -> Iterator[Any]:
        """Endless random minibatches of training examples, determined by ``seed``; use with
        :meth:`minibatch_hvp`. Over several processes each draws its part from its own shard (``None``
        when it has none), so that a minibatch holds ``batch_size`` examples in all."""
        comm = self.comm
        gen = torch.Generator().manual_seed(rank_seed(seed, comm.rank))
        local = self._local_batch_sizes(batch_size)[comm.rank]
        if local == 0:
            return iter(lambda: None, object())
        return self.data.minibatches(local, gen)

    def minibatch_hvp(self, batch: Any, vectors: Tensor) -> Tensor:
        """``H_B V`` for a minibatch from :meth:`minibatches`: the Hessian of the mean loss over every
        process's part (one process: :meth:`batch_hvp`)."""
        if not self.comm.distributed:
            return self.batch_hvp(batch, vectors)
        mine = 0 if batch is None else batch_size_of(batch)
        part = self.batch_hvp(batch, vectors).mul_(mine) if mine else torch.zeros_like(vectors)
        summed = self.comm.all_reduce_sum(torch.cat([part.reshape(-1), part.new_tensor([mine])]))
        return summed[:-1].reshape_as(vectors) / summed[-1]

    def dense(self, block: int = DENSE_BLOCK) -> Tensor:
        """The explicit Hessian ``[P, P]`` of the mean training loss, built from HVPs with identity
        blocks (``P / block`` sweeps over the data). Symmetrised to remove round-off asymmetry."""
        p = self.num_params
        h = torch.empty(p, p, dtype=self.dtype, device=self.device)
        eye = torch.eye(p, dtype=self.dtype, device=self.device)
        for s in range(0, p, block):
            h[s : s + block] = self.full_hvp(eye[s : s + block])
        return 0.5 * (h + h.T)
