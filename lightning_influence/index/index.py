"""``InfluenceIndex``: the stored training-set side of influence, read back from its folder, answering
new queries with one matrix product per chunk of stored rows.

Sign convention (Koh & Liang, 2017), the same as :class:`~lightning_influence.results.InfluenceResults`:
``scores[q, i] = I_up,loss(z_i, z_q) = −∇L(z_q)ᵀ (H + λI)⁻¹ ∇L(z_i)``, in units of query loss per unit of
up-weighting; **positive = harmful**, negative = helpful; removing ``z_i`` changes the query loss by about
``−scores[q, i] / n``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..data import Collate
from ..errors import InfluenceConfigError
from ..objective import LossFn
from ..record import RunRecord
from ..results import InfluenceResults
from .fingerprint import check_fingerprint
from .sketch import CountSketch, KroneckerWhitening
from .storage import open_rows, read_meta

__all__ = ["InfluenceIndex"]

#: bytes of stored rows read per step of a query (the rest stays on disk)
READ_BYTES = 256 << 20


class InfluenceIndex:
    """An index built by :func:`~lightning_influence.index.build_index`, memory-mapped from its folder.

    Attributes:
        path: the folder.
        representation: ``"exact"`` or ``"compressed"``.
        num_examples: ``N``, training examples (columns of the scores).
        num_params: ``P``, attributed parameters (the length of a query gradient).
        dim: ``D``, numbers stored per example (``P`` exact, ``k`` compressed).
        dtype: the dtype of the stored numbers and of the maths.
        train_indices: ``[N]`` training-dataset positions of the columns, in order.
        damping / solver: ``λ`` (Hessian units) and the solver's name the index was built with.
        record: the :class:`~lightning_influence.record.RunRecord` of the build.
        meta: the whole metadata (``index.json``).
    """

    def __init__(self, path: str, meta: Dict[str, Any]) -> None:
        self.path = path
        self.meta = meta
        self.representation: str = meta["representation"]
        self.num_examples = int(meta["num_examples"])
        self.num_params = int(meta["num_params"])
        self.dim = int(meta["dim"])
        self.dtype: torch.dtype = getattr(torch, meta["dtype"])
        self.train_indices = torch.tensor(meta["train_indices"], dtype=torch.long)
        self.damping = float(meta["damping"])
        self.solver = str(meta["solver"])
        self.record = RunRecord.from_dict(meta["record"])
        self._shards: List[Tuple[int, int, np.ndarray]] = []
        selfs: List[Optional[np.ndarray]] = []
        covered = 0
        for s in sorted(meta["shards"], key=lambda s: int(s["start"])):
            a, b = int(s["start"]), int(s["stop"])
            if a != covered:
                raise InfluenceConfigError(
                    f"{path}: the shards do not cover examples {covered}..{a - 1}; rebuild the index.")
            self._shards.append((a, b, open_rows(os.path.join(path, s["rows"]), b - a, self.dim, self.dtype)))
            name = s.get("self_influence")
            selfs.append(None if name is None else open_rows(os.path.join(path, name), b - a, 0, self.dtype))
            covered = b
        if covered != self.num_examples:
            raise InfluenceConfigError(
                f"{path}: the shards hold {covered} of {self.num_examples} examples; rebuild the index.")
        #: ``[N]`` ``I_up,loss(z_i, z_i)`` when the build could compute it without extra solves, else ``None``
        self.self_influence: Optional[Tensor] = (
            torch.from_numpy(np.concatenate([np.asarray(x) for x in selfs]))
            if selfs and all(x is not None for x in selfs) else None)
        proj = meta.get("projection")
        self._query_matrix: Optional[np.ndarray] = None
        self._sketch: Optional[Tuple[KroneckerWhitening, CountSketch]] = None
        if self.representation == "compressed" and proj.get("kind") == "sketch":
            state = torch.load(os.path.join(path, proj["files"]["whitening"]), map_location="cpu", weights_only=True)
            self._sketch = (KroneckerWhitening.from_state(state), CountSketch(self.dim, self.num_params, proj["seed"]))
        elif self.representation == "compressed":
            self._query_matrix = open_rows(os.path.join(path, proj["files"]["query"]), self.dim, self.num_params,
                                           self.dtype)

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"]) -> "InfluenceIndex":
        """The index in folder ``path`` (every shard, in training-set order), memory-mapped: nothing but the
        metadata is read until a query.

        Raises:
            InfluenceConfigError: ``path`` is not an index folder (naming it and the fix).
            ResultsFileError: a shard file is missing or has the wrong size.
        """
        if isinstance(path, (str, os.PathLike)):
            folder = os.path.abspath(os.fspath(path))
        else:
            raise InfluenceConfigError(f"path={path!r} must be a folder path (str or os.PathLike).")
        return cls(folder, read_meta(folder))

    @property
    def projection_dim(self) -> Optional[int]:
        """``k`` of a compressed index, else ``None``."""
        return self.dim if self.representation == "compressed" else None

    @property
    def disk_bytes(self) -> int:
        """Bytes of every file of the index."""
        return sum(os.path.getsize(os.path.join(self.path, f)) for f in os.listdir(self.path)
                   if os.path.isfile(os.path.join(self.path, f)) and not f.startswith("."))

    @property
    def params(self) -> Tuple[str, ...]:
        """Names of the attributed parameters, in the order of a query gradient's entries."""
        return tuple(self.meta["model"]["params"])

    def __repr__(self) -> str:
        return (f"InfluenceIndex({self.path!r}, {self.representation}, N={self.num_examples}, P={self.num_params}, "
                f"D={self.dim}, solver={self.solver!r}, damping={self.damping:g})")

    # ------------------------------------------------------------------ checks
    def check_module(self, module: nn.Module) -> None:
        """Raise :class:`~lightning_influence.index.IndexMismatchError` (an ``InfluenceConfigError``) unless
        ``module``'s attributed parameters are bit for bit those the index was built for."""
        check_fingerprint(self.meta["model"], module, self.path)

    def _check_grads(self, grads: Tensor) -> Tensor:
        if not isinstance(grads, Tensor) or grads.dim() != 2 or grads.shape[1] != self.num_params:
            got = tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__
            raise InfluenceConfigError(
                f"query_grads must be a [Q, {self.num_params}] tensor of query loss gradients over the index's "
                f"parameters, got {got}.")
        return grads.to(self.dtype)

    # ------------------------------------------------------------------ queries
    @property
    def projection(self) -> Optional[str]:
        """How a compressed index projects: ``"whitened"``/``"plain"`` (a stored Gaussian ``[k, P]`` matrix) or
        ``"sketch"`` (whitened in the factored eigenbasis, then CountSketched); ``None`` when exact."""
        return None if self.representation != "compressed" else str(self.meta["projection"]["kind"])

    def project(self, grads: Tensor) -> Tensor:
        """The query side of a dot product with the stored rows: ``grads`` itself (exact), ``M_query grads``
        ``[Q, k]`` (Gaussian) or ``S c(grads)`` ``[Q, k]`` (sketch)."""
        grads = self._check_grads(grads)
        if self._sketch is not None:
            whitening, sketch = self._sketch
            step = max(1, READ_BYTES // max(1, 2 * self.num_params * grads.element_size()))
            return torch.cat([sketch.apply(whitening.coordinates(grads[s : s + step]))
                              for s in range(0, grads.shape[0], step)] or [grads.new_zeros(0, self.dim)])
        if self._query_matrix is None:
            return grads
        step = max(1, READ_BYTES // max(1, self.num_params * grads.element_size()))
        parts = [grads @ torch.from_numpy(np.array(self._query_matrix[r : r + step])).to(grads.device).T
                 for r in range(0, self.dim, step)]
        return torch.cat(parts, dim=1)

    def _blocks(self, device: torch.device):
        """``(first_column, stored rows [b, D])`` over every shard, ``READ_BYTES`` at a time."""
        step = max(1, READ_BYTES // max(1, self.dim * torch.empty((), dtype=self.dtype).element_size()))
        for a, b, rows in self._shards:
            for s in range(0, b - a, step):
                yield a + s, torch.from_numpy(np.array(rows[s : s + step])).to(device)

    def scores(self, query_grads: Tensor, *, module: Optional[nn.Module] = None) -> Tensor:
        """``[Q, N]`` influence scores of every indexed training example on each query, from the query loss
        gradients ``query_grads`` ``[Q, P]`` (positive = harmful). Nothing of the training set is
        recomputed: the stored rows are read chunk by chunk. With ``module``, its weights are checked
        against the index's first (:meth:`check_module`)."""
        if module is not None:
            self.check_module(module)
        return self.scores_from_projection(self.project(query_grads))

    def scores_from_projection(self, z: Tensor) -> Tensor:
        """``[Q, N]`` scores from the queries' side already projected (``z = project(query_grads)`` ``[Q, D]``,
        or computed another way to the same values, as :func:`~lightning_influence.index.explain` does for a
        sketch)."""
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != self.dim:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise InfluenceConfigError(f"z must be a [Q, {self.dim}] tensor (index.project of the query gradients), "
                                       f"got {got}.")
        out = torch.empty(z.shape[0], self.num_examples, dtype=z.dtype, device=z.device)
        for first, rows in self._blocks(z.device):
            out[:, first : first + rows.shape[0]] = -(z @ rows.T)
        return out

    def top_k(self, query_grads: Tensor, k: int = 10, *, largest: bool = True,
              module: Optional[nn.Module] = None) -> Tuple[Tensor, Tensor]:
        """``(train dataset positions [Q, k'], scores [Q, k'])`` of the ``k' = min(k, N)`` highest (``largest``:
        the most harmful) or lowest (most helpful) scores per query, in order, ties to the lower position;
        streamed, so the ``[Q, N]`` matrix is never held."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InfluenceConfigError(f"k={k!r} must be a positive integer (training examples per query).")
        if module is not None:
            self.check_module(module)
        z = self.project(query_grads)
        k = min(k, self.num_examples)
        best_v = torch.empty(z.shape[0], 0, dtype=z.dtype, device=z.device)
        best_i = torch.empty(z.shape[0], 0, dtype=torch.long, device=z.device)
        for first, rows in self._blocks(z.device):
            v = torch.cat([best_v, -(z @ rows.T)], dim=1)
            cols = torch.arange(first, first + rows.shape[0], device=z.device).expand(z.shape[0], -1)
            i = torch.cat([best_i, cols], dim=1)
            order = torch.argsort(v, dim=1, descending=largest, stable=True)[:, :k]
            best_v, best_i = v.gather(1, order), i.gather(1, order)
        return self.train_indices.to(best_i.device)[best_i], best_v

    def explain(self, module: nn.Module, dataset: Dataset, indices: Optional[Sequence[int]] = None, *,
                num_queries: int = 16, loss_fn: Optional[LossFn] = None, collate_fn: Optional[Collate] = None,
                chunk_size: int = 256) -> InfluenceResults:
        """:func:`~lightning_influence.index.explain` with this index."""
        from .explain import explain

        return explain(self, module, dataset, indices, num_queries=num_queries, loss_fn=loss_fn,
                       collate_fn=collate_fn, chunk_size=chunk_size)

