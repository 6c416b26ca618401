"""Arnoldi: a low-rank eigendecomposition of the Hessian, inverted in closed form (Schioppa et al., 2022,
"Scaling up influence functions").

The Hessian ``H`` of the mean training loss is symmetric, so Arnoldi's iteration is Lanczos'
(:class:`~lightning_influence.curvature.spectral.Lanczos`, with full reorthogonalisation): ``m`` full-data
Hessian-vector products (one right-hand side each, one sweep over the training set each) build an
orthonormal Krylov basis ``Q [m, P]`` and the tridiagonal ``T = Q H Qᵀ``. The eigenpairs ``(θ_i, s_i)`` of
``T`` give Ritz pairs ``(θ_i, y_i = Qᵀ s_i)`` of ``H`` with residual ``‖H y_i − θ_i y_i‖ = β_m |s_{m,i}|``
(no further product needed). The ``k`` kept pairs form ``U [k, P]`` (orthonormal rows) and ``μ [k]``, and

    (Ĥ + λI)⁻¹ = Uᵀ diag(1/(μ + λ)) U + (I − UᵀU)/λ,

the inverse on the subspace plus the damping alone on its complement (``Ĥ = Uᵀ diag(μ) U``). Applying it
to ``V [Q, P]`` costs two ``[Q, P] × [P, k]`` products; memory is ``k × P`` (never ``P × P``; the Krylov
basis, ``m × P``, lives only during the fit). ``(Ĥ + λI)^{-1/2}`` is the same with ``1/√(μ + λ)`` and
``1/√λ``, so ``gᵀ(Ĥ + λI)⁻¹g = ‖(Ĥ + λI)^{-1/2} g‖²`` (self-influence) costs one application.

Which pairs are kept: those whose omission would change the inverse most. Leaving an exact eigenpair
``(μ, u)`` to the complement changes ``(H + λI)⁻¹`` by ``(1/λ − 1/(μ + λ)) u uᵀ``, of norm
``e(μ) = |μ| / (λ |μ + λ|)``: the largest positive eigenvalues, and negative ones close to ``−λ``.
Pairs are ranked by ``λ·e(θ) = |θ| / |θ + λ|`` (for a positive semi-definite ``H``: by ``θ``).

Error bound. If ``U`` holds exact eigenvectors of ``H`` and ``μ_{k+1}`` is the discarded eigenvalue of
largest ``e`` (``H + λI`` positive definite), then

    ‖(Ĥ + λI)⁻¹ − (H + λI)⁻¹‖₂ = e(μ_{k+1}) = |μ_{k+1}| / (λ (μ_{k+1} + λ)),

which for a positive semi-definite ``H`` is ``μ_{k+1} / (λ(μ_{k+1} + λ)) < 1/λ``, with ``μ_{k+1}`` the
(k+1)-th largest eigenvalue. Relative to ``1/λ`` (the inverse's norm along the flattest directions) the
error is ``μ_{k+1}/(μ_{k+1} + λ)``. Ritz pairs are not exact; their residuals add to this (small once
converged, see ``ritz_tol``). The diagnostics report the bound with ``μ_{k+1}`` estimated by the
largest-``e`` discarded Ritz value; by interlacing a Ritz value never exceeds the eigenvalue of the
same rank, so this estimate can be low while the Krylov space is small.

Rank (``rank="auto"``): the Krylov space grows ``check_every`` products at a time (a check is the
eigendecomposition of the small ``T_m``, no product); at each check the Ritz pairs are ranked by ``e`` and
``k`` is the number with ``λ·e(θ) > tol``, i.e. every direction whose omission would change
``(H + λI)⁻¹`` by more than ``tol/λ`` in spectral norm (``tol`` relative to the complement's ``1/λ``; for
PSD ``H``: ``θ > λ·tol/(1 − tol)``), capped at ``max_rank``. The fit stops once ``k`` is settled (it hits
``max_rank``, or the Ritz values of the same run ``w = min(block, max(check_every, k))`` products earlier,
read off the leading ``(m − w) × (m − w)`` block of ``T_m``, gave the same ``k``) and every kept pair has
converged: ``β_m |s_{m,i}| ≤ ritz_tol·(|θ_i| + λ)`` (an eigenvalue error ``δ`` moves ``1/(θ + λ)`` by
``δ/(θ + λ)`` relative). A Hessian with a few large eigenvalues and the rest far below the threshold thus
stops at the first check (20 products at a fixed damping). With ``rank=k`` the first check comes after
``krylov_factor·k`` products (extreme Ritz pairs converge well before ``m = k``, interior ones need more)
and the space grows until the top ``k`` have converged. In both modes at most
``max(krylov_factor·max_rank, …)`` products are spent (``≤ P``); ending unconverged warns. If the space
becomes invariant (``β_m ≈ 0``) before that, its Ritz pairs are exact; unless the rule is already met,
Lanczos goes on from a fresh start vector orthogonal to the basis (:meth:`Lanczos.restart`): a single
Krylov space holds one direction per distinct eigenvalue, so e.g. the null directions of a softmax output
layer (a repeated eigenvalue 0) need restarts before a rank ``k = P`` is reached.

As a preconditioner (``gain_tol``, :meth:`ArnoldiSettings.as_preconditioner`) a partly converged space is
still a valid preconditioner (the outer solve is exact for any symmetric positive definite one), so the
fit also stops when more products stop paying: the Ritz pairs predict the condition number of the
preconditioned system, ``κ̂ = max (θ + λ)/λ`` (or its inverse, for ``θ < 0``) over every Ritz direction
except the kept pairs that have converged (there it is 1); once the last ``block`` products lowered ``κ̂``
by less than the fraction ``gain_tol`` and added fewer than ``gain_tol`` times as many converged kept
pairs as there were, Lanczos stops (diagnostic ``lanczos_stop="gain"``, no warning). CG's iterations grow
like ``√κ``; LiSSA's steps like ``κ``, so LiSSA's named default keeps growing to the rule above
(:mod:`~lightning_influence.solvers.preconditioned`).

Damping, from the same Krylov space (no extra passes): the fit's first step
(:meth:`ArnoldiSettings.estimate`) runs at least ``AutoDamping.iters`` Lanczos products (``block`` for a
fixed damping), and the damping rule reads the extreme Ritz values ``θ_min, θ_max`` of that space
(:meth:`AutoDamping.choose`); the build then extends the same run. A fixed ``λ`` with ``θ_min + λ ≤ 0``
raises :class:`NegativeCurvatureError` naming the damping needed (checked at every check, so it fails
early). Extreme Ritz values never overshoot (``θ_min ≥ λ_min(H)``, ``θ_max ≤ λ_max(H)``) and only move
outwards as the space grows: if the final space needs more automatic damping than its first steps did,
the rule is applied once more to the final extremes and the choice records that it was raised.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Tuple, Union

import torch
from torch import Tensor

from ..checks import is_int, is_real
from ..curvature.damping import AutoDamping, DampingChoice, DampingSpec, HessianKrylov, Spectrum, check_curvature
from ..curvature.spectral import Lanczos
from ..diagnostics import Diagnostic
from ..errors import InfluenceConfigError
from ..seeds import Stream, derive_seed
from .base import Curvature, FactoredInverse, SolverKind, SolverSettings

if TYPE_CHECKING:  # pragma: no cover
    from ..problem import InfluenceProblem

__all__ = ["ArnoldiSettings", "ArnoldiInverse"]


@dataclass(frozen=True)
class ArnoldiSettings(SolverSettings, name="arnoldi", kind=SolverKind.LOW_RANK):
    """Settings of the low-rank (Arnoldi/Lanczos) inverse; the defaults need no tuning.

    Args:
        rank: ``"auto"`` (keep every direction that matters at the tolerance ``tol``, up to
            ``max_rank``) or the number ``k`` of eigenpairs to keep (``≤ max_rank``; clipped to ``P``).
        max_rank: cap on ``k``; memory of the fitted inverse is ``k × P`` numbers.
        tol: automatic rank: keep the Ritz pairs with ``|θ|/|θ + λ| > tol`` (the spectral-norm error of
            the inverse left by the discarded ones, relative to ``1/λ``); in ``(0, 1)``.
        krylov_factor: ``≥ 1``; Lanczos products before the first check with a fixed rank
            (``krylov_factor·k``), and the cap on products, ``krylov_factor·max_rank`` (``≤ P``).
        block: Lanczos products of the first extension at a fixed damping, and the window of the
            automatic rank's settling test (the rank must be the same ``min(block, max(check_every, k))``
            products earlier) and of the preconditioner's gain test (``gain_tol``).
        check_every: Lanczos products between convergence checks (a check is an eigendecomposition of the
            small tridiagonal ``T_m``: no product).
        ritz_tol: a kept Ritz pair has converged when its residual ``‖H y − θ y‖ ≤ ritz_tol·(|θ| + λ)``.
        gain_tol: ``None`` (a solver of its own: grow until the criterion above is met or the cap), or, for a
            preconditioner, a fraction in ``(0, 1)``: also stop once the last ``block`` products lowered the
            estimated condition number of the preconditioned system (see the module docstring) by less
            than this fraction. Its solve stays exact; more products would cost more than they save.
        seed: seed of the Lanczos start vector (and of the subset below); the same seed gives the same inverse.
        max_examples: ``None`` (default) to run Lanczos on the Hessian of the whole training set, or a cap:
            Lanczos then sees the mean-loss Hessian of at most this many training examples drawn at random,
            so the fit costs ``passes × max_examples`` example-HVPs whatever ``N``. The eigenpairs, the
            damping and the curvature check are then the subset's estimates. Meant for a preconditioner
            (LiSSA's default uses 4,096), whose solve stays exact for the full ``H``; as a solver of its own
            it returns the subset's inverse.
    """

    rank: Union[int, str] = "auto"
    max_rank: int = 200
    tol: float = 0.05
    krylov_factor: float = 2.0
    block: int = 20
    check_every: int = 5
    ritz_tol: float = 1e-3
    gain_tol: Optional[float] = None
    seed: int = 0
    max_examples: Optional[int] = None

    def __post_init__(self) -> None:
        def bad(arg: str, what: str) -> InfluenceConfigError:
            return InfluenceConfigError(f"ArnoldiSettings.{arg}={getattr(self, arg)!r} must be {what}.")

        def pos_int(v: Any) -> bool:
            return is_int(v) and v >= 1

        def number(v: Any) -> bool:
            return is_real(v) and math.isfinite(float(v))

        if not (self.rank == "auto" or pos_int(self.rank)):
            raise bad("rank", 'a positive integer or "auto"')
        for arg in ("max_rank", "block", "check_every"):
            if not pos_int(getattr(self, arg)):
                raise bad(arg, "a positive integer")
        if pos_int(self.rank) and self.rank > self.max_rank:  # type: ignore[operator]
            raise InfluenceConfigError(
                f"ArnoldiSettings.rank={self.rank!r} exceeds max_rank={self.max_rank!r}; raise max_rank to at least "
                f"{self.rank} or lower rank."
            )
        if not (number(self.tol) and 0 < self.tol < 1):
            raise bad("tol", "a number in (0, 1) (e.g. 0.05)")
        if not (number(self.krylov_factor) and self.krylov_factor >= 1):
            raise bad("krylov_factor", "a number ≥ 1 (e.g. 2)")
        if not (number(self.ritz_tol) and self.ritz_tol > 0):
            raise bad("ritz_tol", "a positive number (e.g. 1e-3)")
        if not (self.gain_tol is None or (number(self.gain_tol) and 0 < self.gain_tol < 1)):
            raise bad("gain_tol", "None or a number in (0, 1) (e.g. 0.25)")
        if not is_int(self.seed):
            raise bad("seed", "an integer")
        if not (self.max_examples is None or pos_int(self.max_examples)):
            raise bad("max_examples", "None or a positive integer (e.g. 4096)")

    @classmethod
    def as_preconditioner(cls) -> "ArnoldiSettings":
        """The settings LiSSA's default preconditioner uses (``preconditioner="arnoldi"``): keep every
        direction whose curvature exceeds a quarter of the damping (``tol=0.2``: ``|θ|/|θ + λ| > 0.2``, i.e.
        ``θ > λ/4`` for PSD ``H``), at most 100 of them, with Ritz pairs accepted at a 1% residual (a
        preconditioner needs directions, not digits: the recursion makes the answer exact), and Lanczos on a
        random 4,096 training examples at most (its cost stops growing with ``n``; the full-data residual
        keeps the solve exact). Chosen by measurement (``benchmarks/README.md``, section 4). Lanczos stops as
        soon as that is met, or once ``block`` more products lowered the estimated condition number of the
        preconditioned system by less than a quarter (``gain_tol=0.25``): CG's on the digits demo's MLP 75
        products where it ran its cap of 200 (``benchmarks/bench_lanczos.py``). LiSSA's named default drops
        the gain stop (:mod:`~lightning_influence.solvers.preconditioned`: its steps grow like κ)."""
        return cls(tol=0.2, max_rank=100, ritz_tol=1e-2, gain_tol=0.25, max_examples=4096)

    def estimate(self, problem: "InfluenceProblem", damping: DampingSpec) -> Curvature:
        """The first Lanczos products on the Hessian of the training set (or of ``max_examples`` of its
        examples): at least ``AutoDamping.iters`` for automatic damping, ``krylov_factor·rank`` for a fixed
        rank, ``block`` otherwise. Their extreme Ritz values are the spectrum the damping rule reads."""
        seen = problem if self.max_examples is None else problem.subsample(self.max_examples, self.seed)
        op = seen.operator
        p = problem.num_params
        fixed_rank = self._fixed_rank(p)
        if not isinstance(damping, AutoDamping) and float(damping) <= 0 and fixed_rank != p:
            raise _zero_damping(float(damping), fixed_rank or self.max_rank, p)  # before any product
        first = self.block
        if fixed_rank is not None:
            first = max(first, int(math.ceil(self.krylov_factor * fixed_rank)))
        if isinstance(damping, AutoDamping):
            first = max(first, damping.iters)
        lz = Lanczos(op.full_hvp, p, dtype=problem.dtype, device=problem.device, seed=self.seed)
        lz.extend(min(first, self._cap(p)))
        theta = lz.ritz()[0]
        spectrum = Spectrum(float(theta[0]), float(theta[-1]), lz.steps,
                            seen.num_examples if seen is not problem else None)
        return Curvature(spectrum, state=HessianKrylov(spectrum, lz, seen, (self.max_examples, self.seed)))

    def build(self, problem: "InfluenceProblem", damping: DampingChoice, curvature: Curvature) -> "ArnoldiInverse":
        """Extend the Lanczos run of :meth:`estimate` until the kept Ritz pairs converge (see the module
        docstring) and return the closed-form inverse.

        Raises:
            NegativeCurvatureError: with a fixed damping, ``θ_min + λ ≤ 0`` (``H + λI`` is indefinite);
                the message names the damping needed.
            InfluenceConfigError: a fixed damping ``λ ≤ 0`` while the kept subspace is not all of
                parameter space (the complement would be inverted as ``1/0``).
        """
        return _fit(self, problem, damping, curvature.state)

    def _fixed_rank(self, p: int) -> Optional[int]:
        return None if self.rank == "auto" else min(int(self.rank), p)

    def _cap(self, p: int) -> int:
        """The most Lanczos products: ``krylov_factor·max_rank`` (at least the fixed rank), at most ``P``."""
        return min(p, max(int(math.ceil(self.krylov_factor * self.max_rank)), self._fixed_rank(p) or 0))


class ArnoldiInverse(FactoredInverse):
    """``(Ĥ + λI)⁻¹ = Uᵀ diag(1/(μ + λ)) U + (I − UᵀU)/λ`` with ``U [k, P]`` orthonormal rows.

    Attributes:
        eigenvalues: ``μ [k]`` (float64, CPU), ranked by ``|μ|/|μ + λ|``, largest first.
        eigenvectors: ``U [k, P]`` in the problem's dtype and device.
        error_bound: ``|μ_{k+1}|/(λ|μ_{k+1} + λ|)`` with ``μ_{k+1}`` estimated by the first discarded Ritz
            value (``nan`` when no Ritz value was discarded); see the module docstring.
        converged: whether every kept Ritz pair met ``ritz_tol`` (and the automatic rank settled).
    """

    def __init__(self, problem: "InfluenceProblem", damping: Union[float, DampingChoice], eigenvalues: Tensor,
                 eigenvectors: Tensor) -> None:
        super().__init__(problem, damping)
        self.eigenvalues = eigenvalues.to(torch.float64).cpu()
        self.eigenvectors = eigenvectors
        lam = self.damping
        mu = self.eigenvalues.to(dtype=eigenvectors.dtype, device=eigenvectors.device)
        #: no complement: U spans parameter space, the ``1/λ`` term vanishes (and λ = 0 is allowed)
        self.full_rank = eigenvectors.shape[0] >= eigenvectors.shape[1]
        if self.full_rank:
            self._inv, self._isqrt = 1.0 / (mu + lam), (mu + lam).rsqrt()
        else:
            self._inv, self._isqrt = 1.0 / (mu + lam) - 1.0 / lam, (mu + lam).rsqrt() - lam ** -0.5
        self.error_bound = math.nan
        self.converged = True
        #: the extreme Ritz values of the final Krylov space (estimates of ``H``'s; a preconditioned solver reads them)
        self.spectrum: Optional[Spectrum] = None

    @property
    def rank(self) -> int:
        return int(self.eigenvectors.shape[0])

    def _apply(self, vectors: Tensor, diag: Tensor, complement: float) -> Tensor:
        u = self.eigenvectors
        coeff = (vectors.to(u.dtype) @ u.T) * diag  # [Q, k]
        out = coeff @ u
        if not self.full_rank:
            out = out + complement * vectors
        return out.to(vectors.dtype)

    def apply(self, vectors: Tensor) -> Tensor:
        """``(Ĥ + λI)⁻¹ V = V/λ + ((V Uᵀ) diag(1/(μ + λ) − 1/λ)) U`` for the rows of ``V [Q, P]``."""
        return self._apply(vectors, self._inv, 0.0 if self.full_rank else 1.0 / self.damping)

    def apply_inverse_sqrt(self, vectors: Tensor) -> Tensor:
        """``(Ĥ + λI)^{-1/2} V = V/√λ + ((V Uᵀ) diag(1/√(μ + λ) − 1/√λ)) U`` for the rows of ``V``."""
        return self._apply(vectors, self._isqrt, 0.0 if self.full_rank else self.damping ** -0.5)


# --------------------------------------------------------------------------------------------- fitting
def _impact(theta: Tensor, lam: float) -> Tensor:
    """``λ·e(θ) = |θ| / |θ + λ|``: how much leaving the pair to the complement changes the inverse,
    relative to ``1/λ``."""
    return theta.abs() / (theta + lam).abs().clamp_min(1e-300)


def _fit(st: ArnoldiSettings, problem: "InfluenceProblem", choice: DampingChoice, krylov: HessianKrylov) -> ArnoldiInverse:
    t0 = time.perf_counter()
    seen, lz = krylov.problem, krylov.lanczos
    p = problem.num_params
    auto_damping = choice.mode == "auto"
    fixed_rank = st._fixed_rank(p)
    cap = st._cap(p)
    converged = False
    stop = "cap"
    restarts = 0
    lam = choice.value
    target = lz.steps
    while True:
        lz.extend(target - lz.steps)
        theta, s, res = lz.ritz()
        lo, hi = float(theta[0]), float(theta[-1])
        if not auto_damping:
            check_curvature(Spectrum(lo, hi, lz.steps), lam, "arnoldi")
        k, order, ok = _select(st, theta, res, lam, fixed_rank)
        if ok and _settled(st, lz, lam, k, fixed_rank):
            converged, stop = True, "converged"
            break
        if st.gain_tol is not None and _stalled(st, lz, lam, fixed_rank, theta, res):
            stop = "gain"
            break
        if lz.steps >= cap:
            break
        if lz.exhausted:  # invariant space, m < P: go on from a fresh orthogonal start vector
            restarts += 1
            if not lz.restart(derive_seed(st.seed, Stream.RESTART, restarts)):
                converged, stop = ok, "exhausted"
                break
        target = min(cap, lz.steps + st.check_every)
    spectrum = Spectrum(lo, hi, lz.steps, krylov.spectrum.examples)
    choice = choice.refined(spectrum, f"raised after {lz.steps} Lanczos steps")  # the grown space's extremes
    if choice.value != lam:
        lam = choice.value
        k, order, ok = _select(st, theta, res, lam, fixed_rank)
    kept = order[:k]
    if lam <= 0 and k < p:
        raise _zero_damping(lam, k, p)
    u = s[:, kept].T.to(dtype=problem.dtype, device=problem.device) @ lz.basis  # [k, m] @ [m, P]
    inv = ArnoldiInverse(problem, choice, theta[kept], u)
    inv.converged = converged
    if not converged and stop != "gain":
        warnings.warn(
            f"solver='arnoldi' stopped after {lz.steps} Lanczos steps (cap {cap} = krylov_factor·max_rank) before the "
            f"{k} kept Ritz pairs converged (ritz_tol={st.ritz_tol:g}) or the automatic rank settled; the "
            "inverse may be inaccurate. Raise max_rank or krylov_factor, loosen ritz_tol, or raise the damping.",
            RuntimeWarning,
            stacklevel=4,
        )
    nxt = order[k] if k < len(order) else None
    mu_next = float(theta[nxt]) if nxt is not None else math.nan
    inv.error_bound = float(_impact(theta[nxt : nxt + 1], lam)[0]) / lam if nxt is not None and lam > 0 else math.nan
    inv.spectrum = spectrum
    max_res = float((res[kept] / (theta[kept].abs() + lam)).max()) if k else 0.0
    inv.setup = _diagnostics(st, inv, lz.steps, max_res, converged, mu_next, time.perf_counter() - t0)
    inv.setup.append(Diagnostic("lanczos_stop", stop, "Lanczos stopped by",
                                {"converged": "the kept Ritz pairs converged and the rank settled",
                                 "gain": f"the last {st.block} products lowered the preconditioned condition estimate "
                                         f"by less than gain_tol={st.gain_tol}",
                                 "cap": f"the product cap ({cap}) before convergence",
                                 "exhausted": "an invariant Krylov space that no restart could extend"}[stop]))
    inv.setup.append(Diagnostic("lanczos_examples", seen.num_examples, "examples seen by Lanczos",
                                f"training examples whose mean-loss Hessian the Krylov space is built from "
                                f"(of {problem.num_examples}; max_examples={st.max_examples})"))
    return inv


def _zero_damping(lam: float, k: int, p: int) -> InfluenceConfigError:
    return InfluenceConfigError(
        f"damping={lam:g} with solver='arnoldi' keeps at most {k} of {p} directions and inverts the rest as 1/λ, "
        "which needs λ > 0. Fix: a positive damping (e.g. the L2 coefficient the model was trained with), "
        "damping='auto', or ArnoldiSettings(rank=P, max_rank=P) with P the number of parameters."
    )


def _select(st: ArnoldiSettings, theta: Tensor, res: Tensor, lam: float,
            fixed_rank: Optional[int]) -> Tuple[int, Tensor, bool]:
    """``(k, order, converged)``: the Ritz pairs ranked by impact, how many to keep, and whether the kept
    ones meet ``ritz_tol``."""
    impact = _impact(theta, lam) if lam > 0 else theta.abs()
    order = torch.argsort(impact, descending=True, stable=True)
    if fixed_rank is None:
        k = min(int((impact > st.tol).sum()), st.max_rank)
    else:
        k = min(fixed_rank, theta.numel())
    kept = order[:k]
    ok = bool((res[kept] <= st.ritz_tol * (theta[kept].abs() + max(lam, 0.0))).all())
    ok = ok and (fixed_rank is None or k == fixed_rank)
    return k, order, ok


def _settled(st: ArnoldiSettings, lz: Lanczos, lam: float, k: int, fixed_rank: Optional[int]) -> bool:
    """Whether the rank is settled: fixed, at its cap, or the same as ``min(block, max(check_every, k))``
    products earlier (read off the leading block of the tridiagonal: no product)."""
    if fixed_rank is not None or k >= st.max_rank:
        return True
    earlier = lz.steps - min(st.block, max(st.check_every, k))
    if earlier < 1:
        return False
    theta = lz.ritz(earlier)[0]
    return _select(st, theta, torch.zeros_like(theta), lam, fixed_rank)[0] == k


def _condition(st: ArnoldiSettings, theta: Tensor, res: Tensor, lam: float,
               fixed_rank: Optional[int]) -> Tuple[float, int]:
    """The condition number of the preconditioned system ``P^{-1/2}(H + λI)P^{-1/2}`` that the Ritz pairs
    predict (``1`` along the kept pairs that have converged, ``(θ + λ)/λ`` or its inverse along every other
    Ritz direction, where ``P`` acts as ``λI``), and the number of kept pairs that have converged."""
    k, order, _ = _select(st, theta, res, lam, fixed_rank)
    done = torch.zeros(theta.numel(), dtype=torch.bool)
    kept = order[:k]
    done[kept] = res[kept] <= st.ritz_tol * (theta[kept].abs() + lam)
    rest = (theta[~done] + lam) / lam
    if rest.numel() == 0:
        return 1.0, int(done.sum())
    rest = rest.clamp_min(1e-300)
    return float(torch.maximum(rest, 1.0 / rest).max()), int(done.sum())


def _stalled(st: ArnoldiSettings, lz: Lanczos, lam: float, fixed_rank: Optional[int], theta: Tensor,
             res: Tensor) -> bool:
    """Preconditioner: the last ``block`` products lowered the predicted condition number by less than
    ``gain_tol`` (relative) and added fewer than ``gain_tol`` times as many converged kept pairs as there
    were (the condition estimate cannot see eigenvalues the space has not reached yet; new converged pairs
    say that it is still reaching them)."""
    earlier = lz.steps - st.block
    if earlier < 1 or lam <= 0:
        return False
    gain = float(st.gain_tol or 0.0)
    kappa0, done0 = _condition(st, *lz.ritz(earlier)[::2], lam, fixed_rank)
    kappa, done = _condition(st, theta, res, lam, fixed_rank)
    return kappa > (1.0 - gain) * kappa0 and done - done0 < gain * max(done0, 1)


def _diagnostics(st: ArnoldiSettings, inv: ArnoldiInverse, passes: int, max_res: float, converged: bool,
                 mu_next: float, seconds: float) -> List[Diagnostic]:
    k, mu = inv.rank, inv.eigenvalues
    return [
        Diagnostic("rank", k, "rank k", f"eigenpairs of H kept ({'automatic, tol=' + str(st.tol) if st.rank == 'auto' else 'fixed'}; "
                   f"cap {st.max_rank})"),
        Diagnostic("eigenvalue_largest", float(mu.max()) if k else math.nan, "largest kept eigenvalue μ_1",
                   "largest Ritz value kept (Hessian units, undamped)", reduce="max"),
        Diagnostic("eigenvalue_smallest", float(mu.min()) if k else math.nan, "smallest kept eigenvalue μ_k",
                   "smallest Ritz value kept (Hessian units, undamped)", reduce="min"),
        Diagnostic("lanczos_passes", passes, "Lanczos passes", "full-data Hessian-vector products spent (one right-hand "
                   "side each): the Krylov dimension"),
        Diagnostic("next_eigenvalue_estimate", mu_next, "μ_{k+1} estimate",
                   "the discarded Ritz value that matters most (may underestimate μ_{k+1}); nan if none", reduce="max"),
        Diagnostic("error_bound", inv.error_bound, "‖(Ĥ+λI)⁻¹ − (H+λI)⁻¹‖₂ estimate",
                   "|μ_{k+1}|/(λ|μ_{k+1}+λ|) for exact eigenpairs, with μ_{k+1} estimated; compare with 1/λ",
                   reduce="max"),
        Diagnostic("ritz_residual", max_res, "largest relative Ritz residual",
                   "max over kept pairs of ‖H y − θ y‖/(|θ| + λ); converged below ritz_tol", reduce="max"),
        Diagnostic("rank_capped", bool(st.rank == "auto" and k >= st.max_rank), "rank capped",
                   "the automatic rank reached max_rank: more directions exceed tol (see error_bound)", reduce="any"),
        Diagnostic("converged", bool(converged), "converged", "kept Ritz pairs met ritz_tol and the rank settled "
                   "within the step cap", reduce="all"),
        Diagnostic("fit_seconds", seconds, "fit seconds", "wall-clock seconds of the Lanczos fit", reduce="sum"),
    ]
