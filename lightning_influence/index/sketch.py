"""The structured projection of a large compressed index: the whitened training gradient in the Kronecker
inverse's own eigenbasis, then a seeded CountSketch down to ``k`` numbers.

Why not the Gaussian ``R (H + λI)^{-1/2}`` of :mod:`~lightning_influence.index.projection`: that matrix is
``[k, P]`` (4 GB at ``P = 10⁶``, ``k = 1,024`` in float32) and must be stored for the queries. Here nothing of
size ``k·P`` exists:

* **Whitening in eigen-coordinates** (:class:`KroneckerWhitening`). For a K-FAC/EK-FAC inverse
  ``α (Ĥ + λI)⁻¹ = Q diag(α/(Λ + λ)) Qᵀ`` with ``Q`` orthogonal (per layer ``Q_S ⊗ Q_A``, the diagonal part,
  the dense blocks), the coordinates ``c(v) = diag(√α (Λ + λ)^{-1/2}) Qᵀ v`` satisfy
  ``c(u)·c(v) = α uᵀ(Ĥ + λI)⁻¹ v`` exactly: the back rotation of ``apply_inverse_sqrt`` is skipped (it
  changes no inner product), which halves the work. What the queries need is the factors themselves
  (per layer ``in'² + out² + out·in'`` numbers: megabytes), saved beside the rows.
  The training side is computed from the captured layer inputs ``a`` and output gradients ``g``
  (:meth:`KroneckerWhitening.batch_coordinates`): ``Q_Sᵀ G_i Q_A = Σ_t (Q_Sᵀ g_t)(Q_Aᵀ a_t)ᵀ`` costs
  ``T(in'² + out² + out·in')`` per example and layer, where rotating a formed per-example gradient costs
  ``out·in'·(out + in')`` (for a 960 × 1,025 layer and ``T = 1``: 3 million multiply-adds against 2 billion).
* **CountSketch** (:class:`CountSketch`; Charikar et al. 2002, the sparse JL transform): every coordinate
  ``j`` goes to one bucket ``h(j) ∈ [0, k)`` with a sign ``s(j) = ±1``, ``(S x)_b = Σ_{h(j)=b} s(j) x_j``.
  ``E[(S x)·(S y)] = x·y`` (unbiased) with variance ``(‖x‖²‖y‖² + (x·y)² − 2 Σ_j x_j² y_j²)/k``, at most the
  Gaussian projection's. Applying it costs one pass over the vector; the map is ``P`` bucket numbers and
  ``P`` signs, redrawn from the seed (CPU generator: the same on every device and process).

Score ``[q, i] ≈ −(S c(g_q)) · (S c(g_i))``, the same estimator as the whitened Gaussian index, with the same
sign convention (positive = harmful).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from ..functional import batch_size_of, nonfinite_rows
from ..seeds import derive_seed

__all__ = ["CountSketch", "KroneckerWhitening"]

#: numbers of one slice of a layer's rotated per-example blocks ``[b, out, in']`` (the memory of the build)
BLOCK_ELEMENTS = 1 << 24
#: the stream name of the sketch's buckets and signs under the index's seed (see :mod:`lightning_influence.seeds`)
_STREAM = 0x534B4348  # "SKCH"


class CountSketch:
    """The seeded ``[k, P]`` CountSketch ``S`` (never formed): ``P`` buckets in ``[0, k)`` and ``P`` signs."""

    def __init__(self, dim: int, num_coordinates: int, seed: int) -> None:
        self.dim, self.num_coordinates, self.seed = int(dim), int(num_coordinates), int(seed)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, _STREAM, 0))
        self.buckets = torch.randint(0, self.dim, (self.num_coordinates,), generator=gen)
        self.signs = torch.randint(0, 2, (self.num_coordinates,), generator=gen).mul_(2).sub_(1).to(torch.int8)

    def apply(self, vectors: Tensor) -> Tensor:
        """``S vᵀ`` for every row of ``vectors`` ``[Q, P]``: ``[Q, k]`` in the rows' dtype and device."""
        if vectors.shape[-1] != self.num_coordinates:
            raise ValueError(f"the sketch maps {self.num_coordinates} coordinates, got rows of {vectors.shape[-1]}")
        return self.accumulate(vectors.new_zeros(vectors.shape[0], self.dim), vectors, 0)

    def accumulate(self, out: Tensor, part: Tensor, offset: int, signed: bool = False) -> Tensor:
        """``out += S[:, offset : offset + m] partᵀ`` for the coordinates ``offset …`` of rows ``part`` ``[Q, m]``
        (``S`` is linear: a vector sketched part by part is sketched whole); ``signed``: ``part`` is already
        multiplied by the signs. Returns ``out``."""
        m = part.shape[1]
        buckets = self.buckets[offset : offset + m].to(part.device)
        if not signed:
            part = part * self.signs[offset : offset + m].to(device=part.device, dtype=part.dtype)
        return out.index_add_(1, buckets, part)


@dataclass
class _Layer:
    weight: Tuple[int, int]
    bias: Optional[Tuple[int, int]]
    out_features: int
    in_features: int
    q_a: Tensor  # [in', in']
    q_s: Tensor  # [out, out]
    scale: Tensor  # [out, in']: √α (Λ + λ)^{-1/2}


class KroneckerWhitening:
    """``v ↦ c(v)``, the coordinates of ``√α (Ĥ + λI)^{-1/2} v`` in a K-FAC/EK-FAC inverse's orthonormal
    eigenbasis (see the module docstring), as a self-contained set of tensors that can be saved and loaded
    without the model, the training data or the solver.

    Attributes:
        num_params: ``P``, the length of the vectors (and of their coordinates).
    """

    def __init__(self, num_params: int, layers: List[_Layer], diag_index: Tensor, diag_scale: Tensor,
                 blocks: List[Tuple[Tensor, Tensor, Tensor]], plan: Any = None) -> None:
        self.num_params = int(num_params)
        self.layers, self.blocks = layers, blocks
        self.diag_index, self.diag_scale = diag_index, diag_scale
        #: the inverse's :class:`~lightning_influence.solvers.kronecker.capture.LayerPlan` (build time only:
        #: not saved), for :meth:`batch_coordinates`
        self.plan = plan

    @classmethod
    def of(cls, inverse: Any) -> Optional["KroneckerWhitening"]:
        """The whitening of a fitted :class:`~lightning_influence.solvers.ekfac.KroneckerInverse` (its
        calibration ``α`` and damping included), on the CPU; ``None`` for any other inverse."""
        from ..solvers.ekfac import KroneckerInverse

        if not isinstance(inverse, KroneckerInverse):
            return None
        root_alpha, root_rest = math.sqrt(float(inverse.scale)), math.sqrt(float(inverse.rest_scale))
        lam = float(inverse.damping)
        layers = [
            _Layer(tuple(l.weight_slice), None if l.bias_slice is None else tuple(l.bias_slice), l.out_features,
                   l.in_features, inverse.q_a[k].detach().cpu(), inverse.q_s[k].detach().cpu(),
                   (inverse.eigenvalues[k].detach().cpu().double() + lam).rsqrt().mul_(root_alpha))
            for k, l in enumerate(inverse.plan.layers)]
        diag_scale = (inverse._diag_values.detach().cpu().double() + lam).rsqrt().mul_(root_rest)
        blocks = [(idx.detach().cpu(), q.detach().cpu(), (ev.detach().cpu().double() + lam).rsqrt().mul_(root_rest))
                  for idx, q, ev in inverse.blocks]
        return cls(inverse.problem.num_params, layers, inverse._diag_index.detach().cpu(), diag_scale, blocks,
                   plan=inverse.plan)

    # ------------------------------------------------------------------ applying
    def _gather(self, layer: _Layer, flat: Tensor) -> Tensor:
        q = flat.shape[0]
        w = flat[:, layer.weight[0] : layer.weight[1]].reshape(q, layer.out_features, layer.in_features)
        if layer.bias is None:
            return w
        return torch.cat([w, flat[:, layer.bias[0] : layer.bias[1]].reshape(q, layer.out_features, 1)], dim=2)

    def coordinates(self, vectors: Tensor) -> Tensor:
        """``c(v)`` for every row of ``vectors`` ``[Q, P]``: ``[Q, P]`` in the rows' dtype and device, laid out
        layer by layer (``[out, in']`` each), then the diagonal part, then the dense blocks."""
        if vectors.dim() != 2 or vectors.shape[1] != self.num_params:
            raise ValueError(f"expected [Q, {self.num_params}] vectors, got {tuple(vectors.shape)}")
        dt, dev = vectors.dtype, vectors.device
        parts = []
        for layer in self.layers:
            rot = layer.q_s.to(dev, dt).T @ self._gather(layer, vectors) @ layer.q_a.to(dev, dt)
            parts.append((rot * layer.scale.to(dev, dt)).flatten(1))
        if self.diag_index.numel():
            parts.append(vectors[:, self.diag_index.to(dev)] * self.diag_scale.to(dev, dt))
        for idx, q, scale in self.blocks:
            parts.append((vectors[:, idx.to(dev)] @ q.to(dev, dt)) * scale.to(dev, dt))
        out = torch.cat(parts, dim=1)
        if out.shape[1] != self.num_params:  # pragma: no cover - a plan always covers every coordinate once
            raise RuntimeError(f"the whitening covers {out.shape[1]} of {self.num_params} coordinates")
        return out

    def _batch_parts(self, objective: Any, batch: Any, signs: Optional[Tensor] = None) -> Iterator[Tensor]:
        """The parts ``[b, m]`` of ``c(∇L(z_i))`` in :meth:`coordinates`' layout, from the captures: each layer
        in slices of the batch (all of them before the next layer), then the diagonal part and the dense blocks
        whole. With ``signs`` (``[P]``, a CountSketch's), every coordinate comes multiplied by its sign (one
        multiplication with the scale instead of two passes)."""
        from ..solvers.kronecker.capture import capture_layers, diagonal_grads, per_example_blocks

        if self.plan is None:
            raise RuntimeError("batch coordinates need the inverse's layer plan: make the whitening with .of()")

        def scaled(scale: Tensor, offset: int, like: Tensor) -> Tensor:
            scale = scale.to(like.device, like.dtype)
            if signs is None:
                return scale
            return scale * signs[offset : offset + scale.numel()].to(like.device, like.dtype).view_as(scale)

        offset = 0
        for layer, (a, g) in zip(self.layers, capture_layers(objective, self.plan, batch, loss=objective.loss)):
            scale = scaled(layer.scale, offset, a)
            for blk in per_example_blocks(a @ layer.q_a.to(a.device, a.dtype), g @ layer.q_s.to(a.device, a.dtype),
                                          BLOCK_ELEMENTS):
                yield (blk * scale).flatten(1)
            offset += layer.scale.numel()
        if self.diag_index.numel() or self.blocks:
            dg = diagonal_grads(objective, self.plan, batch, loss=objective.loss)
            where = torch.full((self.num_params,), -1, dtype=torch.long)
            where[self.plan.diagonal_index.cpu()] = torch.arange(self.plan.diagonal_index.numel())
            if self.diag_index.numel():
                yield dg[:, where[self.diag_index].to(dg.device)] * scaled(self.diag_scale, offset, dg)
                offset += self.diag_scale.numel()
            for idx, q, scale in self.blocks:
                yield (dg[:, where[idx].to(dg.device)] @ q.to(dg.device, dg.dtype)) * scaled(scale, offset, dg)
                offset += scale.numel()

    def batch_coordinates(self, objective: Any, batch: Any) -> Tensor:
        """``c(∇L(z_i))`` ``[B, P]`` for a prepared training batch, from the layers' captured inputs and output
        gradients of the per-example training loss (``objective.loss``) and the diagonal parameters'
        per-example gradients: equal to ``coordinates`` of the formed gradients (to round-off), without
        forming or rotating them (see the module docstring). Needs the plan (a whitening made by :meth:`of`)."""
        rows = batch_size_of(batch)
        per_layer: List[List[Tensor]] = []
        for part in self._batch_parts(objective, batch):  # a layer's slices of the batch come in order
            if not per_layer or sum(p.shape[0] for p in per_layer[-1]) == rows:
                per_layer.append([])
            per_layer[-1].append(part)
        return torch.cat([torch.cat(parts) for parts in per_layer], dim=1)

    def batch_sketch(self, objective: Any, batch: Any, sketch: CountSketch, start: int = 0) -> Tuple[Tensor, Tensor]:
        """``(S c(∇L(z_i)) [B, k], ‖c(∇L(z_i))‖² [B])`` for a prepared training batch: :meth:`batch_coordinates`
        sketched and squared part by part, so the ``[B, P]`` coordinates are never held whole (the build's and
        the queries' route; ``‖c‖² = α ∇Lᵀ(Ĥ + λI)⁻¹∇L`` is minus the self-influence).

        Raises:
            InfluenceRuntimeError: a training example's gradient is not finite (naming its position
                ``start + j`` in the training set)."""
        from ..errors import InfluenceRuntimeError

        rows = batch_size_of(batch)
        z = norms = None
        offset = row = 0
        for part in self._batch_parts(objective, batch, sketch.signs):  # signs: ±1, so the norms are unchanged
            if z is None:
                z, norms = part.new_zeros(rows, sketch.dim), part.new_zeros(rows)
            b = part.shape[0]
            sketch.accumulate(z[row : row + b], part, offset, signed=True)
            norms[row : row + b] += torch.linalg.vector_norm(part, dim=1).square()
            row += b
            if row == rows:  # the layer (or part) is done for every example: the next coordinates
                row, offset = 0, offset + part.shape[1]
        bad = nonfinite_rows(z) | ~torch.isfinite(norms)
        if bool(bad.any()):
            raise InfluenceRuntimeError(
                f"the loss gradient of training example {start + int(bad.nonzero()[0])} is not finite at "
                "the trained weights; check that example and the loss.")
        return z, norms

    def with_plan(self, plan: Any) -> Optional["KroneckerWhitening"]:
        """This whitening bound to ``plan`` (a :class:`~lightning_influence.solvers.kronecker.capture.LayerPlan`
        of the same model, made again where the queries are answered) for :meth:`batch_coordinates`, or
        ``None`` when the plan lays the parameters out otherwise than the inverse's did."""
        same = len(plan.layers) == len(self.layers) and all(
            (tuple(l.weight_slice), None if l.bias_slice is None else tuple(l.bias_slice), l.out_features,
             l.in_features) == (s.weight, s.bias, s.out_features, s.in_features)
            for l, s in zip(plan.layers, self.layers))
        diagonal = torch.cat([self.diag_index] + [idx for idx, _, _ in self.blocks]).sort().values
        if not same or not torch.equal(plan.diagonal_index.cpu().sort().values, diagonal.cpu()):
            return None
        return KroneckerWhitening(self.num_params, self.layers, self.diag_index, self.diag_scale, self.blocks, plan)

    # ------------------------------------------------------------------ files
    def state(self) -> Dict[str, Any]:
        """Plain tensors, ints and lists (``torch.load(..., weights_only=True)`` reads them back)."""
        return {
            "num_params": self.num_params,
            "layers": [{"weight": list(l.weight), "bias": None if l.bias is None else list(l.bias),
                        "out_features": l.out_features, "in_features": l.in_features, "q_a": l.q_a, "q_s": l.q_s,
                        "scale": l.scale} for l in self.layers],
            "diag_index": self.diag_index, "diag_scale": self.diag_scale,
            "blocks": [{"index": i, "q": q, "scale": s} for i, q, s in self.blocks],
        }

    @classmethod
    def from_state(cls, state: Dict[str, Any]) -> "KroneckerWhitening":
        layers = [_Layer(tuple(d["weight"]), None if d["bias"] is None else tuple(d["bias"]), int(d["out_features"]),
                         int(d["in_features"]), d["q_a"], d["q_s"], d["scale"]) for d in state["layers"]]
        blocks = [(d["index"], d["q"], d["scale"]) for d in state["blocks"]]
        return cls(int(state["num_params"]), layers, state["diag_index"], state["diag_scale"], blocks)

    @property
    def numel(self) -> int:
        """Numbers held (the factors, scales and indices)."""
        n = sum(l.q_a.numel() + l.q_s.numel() + l.scale.numel() for l in self.layers)
        n += self.diag_index.numel() + self.diag_scale.numel()
        return n + sum(i.numel() + q.numel() + s.numel() for i, q, s in self.blocks)
