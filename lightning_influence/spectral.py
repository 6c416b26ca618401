"""Cheap spectral estimates of a symmetric operator from matrix-vector products alone.

Used by the LiSSA solver to choose its scale and batch size without tuning, and by
:mod:`lightning_influence.damping` to check or choose the damping:

* :func:`power_iteration`: the eigenvalue of largest magnitude of ``A − shift·I`` (plus ``shift``), i.e.
  ``λ_max(A)`` with ``shift=0`` for a positive semi-definite ``A`` (LiSSA's scale, on minibatches).
* :func:`lanczos_extremes`: both extreme eigenvalues from one Krylov space; converges much faster than
  shifted power iteration at an end of the spectrum near zero (the smallest, possibly negative,
  eigenvalue of a trained network's Hessian).
* :func:`hutchinson_trace`: ``tr(A) ≈ mean_k z_kᵀ A z_k`` over Rademacher probes ``z_k``.

Every function takes ``matvec(V [K, P]) -> A V [K, P]`` acting on the *rows* of ``V`` (the batched
form :meth:`~lightning_influence.operator.HessianOperator.batch_hvp` already has), a dimension and a
seed; the same seed gives the same estimate. Results are plain data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Tuple

import torch
from torch import Tensor

__all__ = ["MatVec", "SpectralEstimate", "power_iteration", "lanczos_extremes", "hutchinson_trace", "rademacher"]

#: ``matvec(V [K, P]) -> A V [K, P]`` for a symmetric ``A``.
MatVec = Callable[[Tensor], Tensor]


@dataclass
class SpectralEstimate:
    """An estimate with how it was obtained.

    Attributes:
        value: the estimate.
        matvecs: matrix-vector products (calls of ``matvec``) spent.
        history: successive estimates (power iteration) or per-probe values (trace).
        stderr: standard error of the estimate where one is defined (trace), else ``nan``.
    """

    value: float
    matvecs: int
    history: List[float] = field(default_factory=list)
    stderr: float = float("nan")


def rademacher(k: int, dim: int, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[k, dim]`` random signs ``±1``, drawn on the CPU from ``seed`` (device-independent)."""
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randint(0, 2, (k, dim), generator=gen).to(dtype) * 2 - 1
    return z.to(device)


def power_iteration(
    matvec: MatVec,
    dim: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    iters: int = 20,
    tol: float = 1e-3,
    shift: float = 0.0,
    seed: int = 0,
) -> SpectralEstimate:
    """Dominant eigenvalue of ``A − shift·I`` by power iteration, returned as an eigenvalue of ``A``.

    With ``shift = 0`` and ``A`` positive semi-definite this is ``λ_max(A)``. With ``shift ≥ λ_max(A)``
    the dominant eigenvalue of ``A − shift·I`` is ``λ_min(A) − shift``, so the result is ``λ_min(A)``.
    The estimate is the Rayleigh quotient ``uᵀAu`` of the current unit vector, which never overshoots
    the extreme eigenvalue it approaches (it is ``≤ λ_max`` and ``≥ λ_min``): callers add a margin.

    Args:
        matvec: ``A`` applied to the rows of a ``[K, P]`` matrix (called here with ``K = 1``).
        dim: ``P``.
        dtype / device: of the vectors.
        iters: at most this many products.
        tol: stop once the estimate changes by less than ``tol`` (relative) between two products.
        shift: see above.
        seed: start vector (Gaussian, drawn on the CPU).

    Returns:
        :class:`SpectralEstimate` with the eigenvalue, the products spent and the estimate per product.
    """
    gen = torch.Generator().manual_seed(int(seed))
    u = torch.randn(1, dim, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    u = u / u.norm()
    history: List[float] = []
    est = float("nan")
    for i in range(1, iters + 1):
        au = matvec(u)
        if shift:
            au = au - shift * u
        rq = float((u * au).sum())  # Rayleigh quotient of A − shift·I
        history.append(rq + shift)
        norm = float(au.norm())
        if not math.isfinite(norm) or norm == 0.0:
            est = rq + shift
            break
        u = au / norm
        if len(history) >= 2 and abs(history[-1] - history[-2]) <= tol * max(abs(history[-1]), 1e-30):
            est = history[-1]
            break
        est = history[-1]
    return SpectralEstimate(value=float(est), matvecs=len(history), history=history)


def lanczos_extremes(
    matvec: MatVec,
    dim: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    iters: int = 40,
    seed: int = 0,
) -> Tuple[SpectralEstimate, SpectralEstimate]:
    """Smallest and largest eigenvalues of ``A`` by ``iters`` steps of Lanczos with full
    reorthogonalisation (``iters`` products, ``iters`` stored vectors). The extreme Ritz values converge
    much faster than power iteration at the end of the spectrum far from the shift (e.g. a small negative
    eigenvalue next to a large positive one); like the Rayleigh quotient they never overshoot.

    Returns:
        ``(λ_min, λ_max)`` estimates; ``history`` holds the Ritz value after each product.
    """
    gen = torch.Generator().manual_seed(int(seed))
    q = torch.randn(1, dim, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    q = q / q.norm()
    basis = [q]
    alphas: List[float] = []
    betas: List[float] = []
    lo: List[float] = []
    hi: List[float] = []
    for _ in range(min(iters, dim)):
        w = matvec(basis[-1])
        alphas.append(float((w * basis[-1]).sum()))
        qs = torch.cat(basis)
        w = w - (w @ qs.T) @ qs  # full reorthogonalisation (twice is enough)
        w = w - (w @ qs.T) @ qs
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        ev = torch.linalg.eigvalsh(t)
        lo.append(float(ev[0]))
        hi.append(float(ev[-1]))
        b = float(w.norm())
        if not math.isfinite(b) or b < 1e-12 * max(abs(lo[-1]), abs(hi[-1]), 1e-30):
            break
        betas.append(b)
        basis.append(w / b)
    n = len(lo)
    return SpectralEstimate(lo[-1], n, lo), SpectralEstimate(hi[-1], n, hi)


def hutchinson_trace(
    matvec: MatVec,
    dim: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    probes: int = 8,
    seed: int = 0,
) -> SpectralEstimate:
    """Hutchinson's estimate ``tr(A) ≈ (1/K) Σ_k z_kᵀ A z_k`` with ``K`` Rademacher probes, all applied
    in one batched ``matvec`` call. Unbiased; ``stderr`` is the standard error over probes."""
    z = rademacher(probes, dim, seed, dtype, device)
    vals = (z * matvec(z)).sum(1).double().cpu()
    stderr = float(vals.std(unbiased=True) / math.sqrt(probes)) if probes > 1 else float("nan")
    return SpectralEstimate(value=float(vals.mean()), matvecs=1, history=vals.tolist(), stderr=stderr)
