"""Cheap spectral estimates of a symmetric operator from matrix-vector products alone.

Used by the LiSSA solver to choose its scale and batch size without tuning, and by
:mod:`lightning_influence.curvature.damping` to check or choose the damping:

* :func:`power_iteration`: the eigenvalue of largest magnitude of ``A − shift·I`` (plus ``shift``), i.e.
  ``λ_max(A)`` with ``shift=0`` for a positive semi-definite ``A`` (LiSSA's full-Hessian ``λ_max`` for its batch size).
* :class:`Lanczos`: the Krylov basis and tridiagonal matrix of symmetric Lanczos with full
  reorthogonalisation, grown step by step; its Ritz pairs with residual estimates (the low-rank
  Arnoldi solver keeps the top ones).
* :func:`lanczos_extremes`: both extreme eigenvalues from one Krylov space (a :class:`Lanczos` run; LiSSA's scale);
  converges much faster than shifted power iteration at an end of the spectrum near zero (the
  smallest, possibly negative, eigenvalue of a trained network's Hessian).
* :func:`hutchinson_trace`: ``tr(A) ≈ mean_k z_kᵀ A z_k`` over Rademacher probes ``z_k``.

Every function takes ``matvec(V [K, P]) -> A V [K, P]`` acting on the *rows* of ``V`` (the batched
form :meth:`~lightning_influence.curvature.operator.HessianOperator.batch_hvp` already has), a dimension and a
seed; the same seed gives the same estimate. Results are plain data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["MatVec", "SpectralEstimate", "Lanczos", "power_iteration", "lanczos_extremes", "lanczos_run", "hutchinson_trace", "rademacher"]

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


class Lanczos:
    """Symmetric Lanczos with full reorthogonalisation, grown one product at a time.

    After ``m`` steps from the unit start vector ``q_1`` the orthonormal basis ``Q_m = [q_1 … q_m]``
    (rows of :attr:`basis`, ``[m, P]``) spans the Krylov space ``K_m(A, q_1)`` and

        A Q_mᵀ = Q_mᵀ T_m + β_m q_{m+1} e_mᵀ,

    with ``T_m`` (:meth:`tridiagonal`) symmetric tridiagonal: diagonal ``α_i = q_iᵀ A q_i``, off-diagonal
    ``β_i = ‖r_i‖`` (the norm of ``A q_i`` minus its projection on the basis). Each step reorthogonalises
    the new vector against the whole basis twice (classical Gram–Schmidt, "twice is enough"), so ``Q_m``
    stays orthonormal to round-off and no spurious copies of converged Ritz values appear.

    Ritz pairs: if ``T_m s = θ s`` (``‖s‖ = 1``) then ``y = Q_mᵀ s`` satisfies
    ``‖A y − θ y‖ = β_m |s_m|`` (:meth:`ritz`), computable without another product. By Cauchy
    interlacing the ``j``-th largest Ritz value never exceeds the ``j``-th largest eigenvalue of ``A``
    (and the ``j``-th smallest is never below the ``j``-th smallest): the extreme Ritz values approach
    ``λ_max(A)`` from below and ``λ_min(A)`` from above, and never overshoot.

    Memory: the basis, ``m × P`` numbers (in ``dtype``); ``T_m`` is held as two lists of floats.

    Args:
        matvec: ``A`` on the rows of a ``[K, P]`` matrix (called with ``K = 1``).
        dim: ``P``.
        dtype / device: of the basis.
        seed: the start vector is Gaussian, drawn on the CPU from ``seed`` (device-independent).
    """

    def __init__(self, matvec: MatVec, dim: int, *, dtype: torch.dtype, device: torch.device, seed: int = 0) -> None:
        self.matvec = matvec
        self.dim = int(dim)
        gen = torch.Generator().manual_seed(int(seed))
        q = torch.randn(1, self.dim, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        self._buf = torch.empty(min(16, self.dim + 1), self.dim, dtype=dtype, device=device)
        self._buf[:1] = q / q.norm()
        self._rows = 1  # basis vectors held (m + 1 after m steps, unless broken down)
        self.alphas: List[float] = []
        #: ``β_1 … β_m``: ``β_m`` (the last) is the residual norm, not part of ``T_m``
        self.betas: List[float] = []
        #: the Krylov space is invariant (``β_m ≈ 0``, or ``m = P``): its Ritz pairs are exact
        self.exhausted = False

    @property
    def steps(self) -> int:
        """``m``: products with ``A`` so far (the Krylov dimension)."""
        return len(self.alphas)

    @property
    def basis(self) -> Tensor:
        """``Q_m`` ``[m, P]``, orthonormal rows."""
        return self._buf[: self.steps]

    @property
    def residual_norm(self) -> float:
        """``β_m``: the norm of the part of ``A q_m`` outside the Krylov space (``0`` when exhausted)."""
        return 0.0 if self.exhausted or not self.betas else self.betas[-1]

    def step(self, breakdown_scale: Optional[Callable[["Lanczos"], float]] = None) -> bool:
        """One product: extend the basis by one vector. Returns ``False`` (and sets :attr:`exhausted`)
        once the Krylov space is invariant: ``β_m < 1e-12 · scale`` or ``m = P``. ``scale`` bounds
        ``‖T_m‖₂``: ``breakdown_scale(self)`` if given (called once ``α_m`` is known), else Gershgorin's
        bound. Calling it on an exhausted space does nothing."""
        if self.exhausted:
            return False
        m = self.steps
        q = self._buf[m : m + 1]
        w = self.matvec(q)
        self.alphas.append(float((w * q).sum()))
        qs = self._buf[: m + 1]
        w = w - (w @ qs.T) @ qs  # full reorthogonalisation (twice is enough)
        w = w - (w @ qs.T) @ qs
        b = float(w.norm())
        if breakdown_scale is None:
            off = [0.0] + self.betas + [0.0]
            scale = max(abs(a) + off[i] + off[i + 1] for i, a in enumerate(self.alphas))
        else:
            scale = breakdown_scale(self)
        if not math.isfinite(b) or b < 1e-12 * max(abs(scale), 1e-30) or m + 1 >= self.dim:
            self.exhausted = True
            return False
        self.betas.append(b)
        if m + 2 > self._buf.shape[0]:
            grown = torch.empty(min(2 * self._buf.shape[0], self.dim + 1), self.dim, dtype=w.dtype, device=w.device)
            grown[: m + 1] = self._buf[: m + 1]
            self._buf = grown
        self._buf[m + 1 : m + 2] = w / b
        return True

    def restart(self, seed: int) -> bool:
        """After the space became invariant with ``m < P``: continue from a new Gaussian vector (from
        ``seed``) orthogonalised against the basis, with ``β = 0`` at the junction (``T`` becomes block
        diagonal and the residual relation above still holds). This finds the directions a single
        Krylov space misses: other copies of eigenvalues of multiplicity > 1, e.g. the exact null
        directions of a softmax output layer. Returns ``False`` (nothing to add) when ``m = P`` or
        the new vector lies in the span of the basis."""
        m = self.steps
        if not self.exhausted or m >= self.dim:
            return False
        gen = torch.Generator().manual_seed(int(seed))
        qs = self.basis
        w = torch.randn(1, self.dim, generator=gen, dtype=torch.float64).to(dtype=qs.dtype, device=qs.device)
        w = w / w.norm()
        w = w - (w @ qs.T) @ qs
        w = w - (w @ qs.T) @ qs
        b = float(w.norm())
        if not b > 1e-8:
            return False
        if m + 1 > self._buf.shape[0]:
            grown = torch.empty(min(2 * self._buf.shape[0], self.dim + 1), self.dim, dtype=w.dtype, device=w.device)
            grown[:m] = qs
            self._buf = grown
        self._buf[m : m + 1] = w / b
        self.betas.append(0.0)
        self.exhausted = False
        return True

    def extend(self, steps: int) -> int:
        """Up to ``steps`` more products (fewer once exhausted); returns the products made."""
        done = 0
        while done < steps and not self.exhausted:
            done += 1
            self.step()
        return done

    def tridiagonal(self, steps: Optional[int] = None) -> Tensor:
        """``T_m`` ``[m, m]`` in float64 on the CPU (``T_j``, its leading ``j × j`` block, with ``steps=j``:
        the tridiagonal the run had after ``j`` steps)."""
        m = self.steps if steps is None else max(0, min(int(steps), self.steps))
        t = torch.diag(torch.tensor(self.alphas[:m], dtype=torch.float64))
        if m > 1:
            off = torch.tensor(self.betas[: m - 1], dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        return t

    def ritz(self, steps: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Ritz values ``θ`` ``[m]`` (ascending), the eigenvectors ``S`` ``[m, m]`` of ``T_m`` (columns;
        the Ritz vectors are ``Q_mᵀ S``) and the residual norms ``β_m |S_{m,i}|`` ``[m]``, all float64 on
        the CPU. ``steps=j < m``: the Ritz pairs the run had after ``j`` steps (``T_j`` and ``β_j``), no
        product needed: a convergence test can compare the space with an earlier one of itself."""
        m = self.steps if steps is None else max(1, min(int(steps), self.steps))
        theta, s = torch.linalg.eigh(self.tridiagonal(m))
        beta = self.residual_norm if m == self.steps else self.betas[m - 1]
        return theta, s, beta * s[-1].abs()


def lanczos_extremes(
    matvec: MatVec,
    dim: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    iters: int = 40,
    seed: int = 0,
) -> Tuple[SpectralEstimate, SpectralEstimate]:
    """Smallest and largest eigenvalues of ``A`` by ``iters`` steps of :class:`Lanczos` with full
    reorthogonalisation (``iters`` products, ``iters`` stored vectors). The extreme Ritz values converge
    much faster than power iteration at the end of the spectrum far from the shift (e.g. a small negative
    eigenvalue next to a large positive one); like the Rayleigh quotient they never overshoot.

    Returns:
        ``(λ_min, λ_max)`` estimates; ``history`` holds the Ritz value after each product.
    """
    lo, hi, _ = lanczos_run(matvec, dim, dtype=dtype, device=device, iters=iters, seed=seed)
    n = len(lo)
    return SpectralEstimate(lo[-1], n, lo), SpectralEstimate(hi[-1], n, hi)


def lanczos_run(matvec: MatVec, dim: int, *, dtype: torch.dtype, device: torch.device, iters: int,
                seed: int = 0, stop: Optional[Callable[[List[float], List[float]], bool]] = None,
                ) -> Tuple[List[float], List[float], Lanczos]:
    """Up to ``iters`` Lanczos steps, stopping at a breakdown, or once ``stop(lo, hi)`` says the Ritz extremes
    so far are enough: the smallest and largest Ritz values after each step (never empty: a run exhausted at
    once gives its only Ritz value) and the run, for reuse."""
    lz = Lanczos(matvec, dim, dtype=dtype, device=device, seed=seed)
    lo: List[float] = []
    hi: List[float] = []

    def extremes(run: Lanczos) -> float:  # record this step's Ritz extremes; they scale the breakdown test
        ev = torch.linalg.eigvalsh(run.tridiagonal())
        lo.append(float(ev[0]))
        hi.append(float(ev[-1]))
        return max(abs(lo[-1]), abs(hi[-1]))

    for _ in range(min(int(iters), dim)):
        if not lz.step(extremes) or (stop is not None and lo and stop(lo, hi)):
            break
    if not lo:  # exhausted at once (one dimension): its only Ritz value
        theta = lz.ritz()[0]
        lo, hi = [float(theta[0])], [float(theta[-1])]
    return lo, hi, lz


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
