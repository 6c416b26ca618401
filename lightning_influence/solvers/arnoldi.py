"""Arnoldi: a low-rank eigendecomposition of the Hessian, inverted in closed form (Schioppa et al., 2022,
"Scaling up influence functions").

The Hessian ``H`` of the mean training loss is symmetric, so Arnoldi's iteration is Lanczos'
(:class:`~lightning_influence.spectral.Lanczos`, with full reorthogonalisation): ``m`` full-data
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

Rank (``rank="auto"``): the Krylov space grows ``block`` products at a time; after each block the Ritz
pairs are ranked by ``e`` and ``k`` is the number with ``λ·e(θ) > tol``, i.e. every direction whose
omission would change ``(H + λI)⁻¹`` by more than ``tol/λ`` in spectral norm (``tol`` relative to the
complement's ``1/λ``; for PSD ``H``: ``θ > λ·tol/(1 − tol)``), capped at ``max_rank``. The fit stops
once ``k`` is the same as after the previous block (or hits ``max_rank``) and every kept pair has
converged: ``β_m |s_{m,i}| ≤ ritz_tol·(|θ_i| + λ)`` (an eigenvalue error ``δ`` moves ``1/(θ + λ)`` by
``δ/(θ + λ)`` relative). With ``rank=k`` the first check comes after ``krylov_factor·k`` products
(extreme Ritz pairs converge well before ``m = k``, interior ones need more) and the space grows until
the top ``k`` have converged. In both modes at most ``max(krylov_factor·max_rank, …)`` products are spent
(``≤ P``); ending unconverged warns. If the space becomes invariant (``β_m ≈ 0``) before that, its
Ritz pairs are exact; unless the rule is already met, Lanczos goes on from a fresh start vector
orthogonal to the basis (:meth:`Lanczos.restart`): a single Krylov space holds one direction per
distinct eigenvalue, so e.g. the null directions of a softmax output layer (a repeated eigenvalue 0)
need restarts before a rank ``k = P`` is reached.

Damping: a fixed ``λ`` is used as given; if the smallest Ritz value gives ``θ_min + λ ≤ 0`` the fit
raises :class:`NegativeCurvatureError` naming the damping needed (with a fixed damping this is checked
after every block, so it fails early). An :class:`~lightning_influence.damping.AutoDamping` is resolved by
:meth:`AutoDamping.choose` applied to the extreme Ritz values ``θ_min, θ_max`` of the *same* Krylov space
after every block (no extra passes; the first check comes after at least ``AutoDamping.iters`` products,
so the estimate is never poorer than the HVP solvers' separate Lanczos run of that length). Extreme Ritz
values never overshoot (``θ_min ≥ λ_min(H)``, ``θ_max ≤ λ_max(H)``) and only move outwards as the
space grows, so ``λ`` only grows with ``m``; the final ``λ`` is that of the final space.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import ClassVar, TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from ..checks import is_int, is_real
from ..damping import AutoDamping, Spectrum, check_curvature
from ..diagnostics import Diagnostic
from ..errors import InfluenceConfigError
from ..spectral import Lanczos
from .base import DampingSpec, FactoredInverse, SolverSettings

if TYPE_CHECKING:  # pragma: no cover
    from ..problem import InfluenceProblem

__all__ = ["ArnoldiSettings", "ArnoldiInverse"]


@dataclass(frozen=True)
class ArnoldiSettings(SolverSettings):
    """Settings of the low-rank (Arnoldi/Lanczos) inverse; the defaults need no tuning.

    Args:
        rank: ``"auto"`` (keep every direction that matters at the tolerance ``tol``, up to
            ``max_rank``) or the number ``k`` of eigenpairs to keep (``≤ max_rank``; clipped to ``P``).
        max_rank: cap on ``k``; memory of the fitted inverse is ``k × P`` numbers.
        tol: automatic rank: keep the Ritz pairs with ``|θ|/|θ + λ| > tol`` (the spectral-norm error of
            the inverse left by the discarded ones, relative to ``1/λ``); in ``(0, 1)``.
        krylov_factor: ``≥ 1``; Lanczos products before the first check with a fixed rank
            (``krylov_factor·k``), and the cap on products, ``krylov_factor·max_rank`` (``≤ P``).
        block: Lanczos products between convergence checks.
        ritz_tol: a kept Ritz pair has converged when its residual ``‖H y − θ y‖ ≤ ritz_tol·(|θ| + λ)``.
        seed: seed of the Lanczos start vector (and of the subset below); the same seed gives the same inverse.
        max_examples: ``None`` (default) to run Lanczos on the Hessian of the whole training set, or a cap:
            Lanczos then sees the mean-loss Hessian of at most this many training examples drawn at random,
            so the fit costs ``passes × max_examples`` example-HVPs whatever ``N``. The eigenpairs, the
            damping and the curvature check are then the subset's estimates. Meant for a preconditioner
            (LiSSA's default uses 4,096), whose solve stays exact for the full ``H``; as a solver of its own
            it returns the subset's inverse.
    """

    name = "arnoldi"
    factored: ClassVar[bool] = True
    low_rank: ClassVar[bool] = True
    rank: Union[int, str] = "auto"
    max_rank: int = 200
    tol: float = 0.05
    krylov_factor: float = 2.0
    block: int = 20
    ritz_tol: float = 1e-3
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
        for arg in ("max_rank", "block"):
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
        if not is_int(self.seed):
            raise bad("seed", "an integer")
        if not (self.max_examples is None or pos_int(self.max_examples)):
            raise bad("max_examples", "None or a positive integer (e.g. 4096)")

    def fit(self, problem: "InfluenceProblem", damping: DampingSpec) -> "ArnoldiInverse":
        """Run Lanczos on ``problem.operator.full_hvp`` until the kept Ritz pairs converge (see the module
        docstring), resolve the damping from the same Krylov space, and return the closed-form inverse.

        Raises:
            NegativeCurvatureError: with a fixed damping, ``θ_min + λ ≤ 0`` (``H + λI`` is indefinite);
                the message names the damping needed.
            InfluenceConfigError: a fixed damping ``λ ≤ 0`` while the kept subspace is not all of
                parameter space (the complement would be inverted as ``1/0``).
        """
        return _fit(self, problem, damping)


class ArnoldiInverse(FactoredInverse):
    """``(Ĥ + λI)⁻¹ = Uᵀ diag(1/(μ + λ)) U + (I − UᵀU)/λ`` with ``U [k, P]`` orthonormal rows.

    Attributes:
        eigenvalues: ``μ [k]`` (float64, CPU), ranked by ``|μ|/|μ + λ|``, largest first.
        eigenvectors: ``U [k, P]`` in the problem's dtype and device.
        damping_record: ``{"damping", "damping_mode", "lambda_min_estimate", "lambda_max_estimate", …}``.
        error_bound: ``|μ_{k+1}|/(λ|μ_{k+1} + λ|)`` with ``μ_{k+1}`` estimated by the first discarded Ritz
            value (``nan`` when no Ritz value was discarded); see the module docstring.
        converged: whether every kept Ritz pair met ``ritz_tol`` (and the automatic rank settled).
    """

    def __init__(self, problem: "InfluenceProblem", damping: float, eigenvalues: Tensor, eigenvectors: Tensor) -> None:
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


def _resolve(damping: DampingSpec, lo: float, hi: float) -> float:
    return damping.choose(lo, hi) if isinstance(damping, AutoDamping) else float(damping)


def _fit(st: ArnoldiSettings, problem: "InfluenceProblem", damping: DampingSpec) -> ArnoldiInverse:
    t0 = time.perf_counter()
    seen = problem if st.max_examples is None else problem.subsample(st.max_examples, st.seed)
    op = seen.operator
    p = problem.num_params
    auto_damping = isinstance(damping, AutoDamping)
    fixed_rank: Optional[int] = None if st.rank == "auto" else min(int(st.rank), p)
    cap = min(p, max(int(math.ceil(st.krylov_factor * st.max_rank)), fixed_rank or 0))
    first = st.block
    if fixed_rank is not None:
        first = max(first, int(math.ceil(st.krylov_factor * fixed_rank)))
    if isinstance(damping, AutoDamping):
        first = max(first, damping.iters)
    if not auto_damping and float(damping) <= 0 and fixed_rank != p:  # fail before any product
        raise _zero_damping(float(damping), fixed_rank if fixed_rank is not None else st.max_rank, p)
    lz = Lanczos(op.full_hvp, p, dtype=problem.dtype, device=problem.device, seed=st.seed)
    target = min(first, cap)
    prev_k: Optional[int] = None
    converged = False
    restarts = 0
    while True:
        lz.extend(target - lz.steps)
        theta, s, res = lz.ritz()
        lo, hi = float(theta[0]), float(theta[-1])
        lam = _resolve(damping, lo, hi)
        if not auto_damping:
            check_curvature(Spectrum(lo, hi, lz.steps), lam, "arnoldi")
        k, order, ok = _select(st, theta, res, lam, fixed_rank)
        settled = fixed_rank is not None or k == prev_k or k >= st.max_rank
        if ok and settled:
            converged = True
            break
        if lz.steps >= cap:
            break
        if lz.exhausted:  # invariant space, m < P: go on from a fresh orthogonal start vector
            restarts += 1
            if not lz.restart(st.seed + 1_000_003 * restarts):
                converged = ok
                break
        prev_k = k
        target = min(cap, lz.steps + st.block)

    kept = order[:k]
    if lam <= 0 and k < p:
        raise _zero_damping(lam, k, p)
    u = s[:, kept].T.to(dtype=problem.dtype, device=problem.device) @ lz.basis  # [k, m] @ [m, P]
    inv = ArnoldiInverse(problem, lam, theta[kept], u)
    inv.converged = converged
    if not converged:
        warnings.warn(
            f"solver='arnoldi' stopped after {lz.steps} Lanczos steps (cap {cap} = krylov_factor·max_rank) before the "
            f"{k} kept Ritz pairs converged (ritz_tol={st.ritz_tol:g}) or the automatic rank settled; the "
            "inverse may be inaccurate. Raise max_rank or krylov_factor, loosen ritz_tol, or raise the damping.",
            RuntimeWarning,
            stacklevel=3,
        )
    nxt = order[k] if k < len(order) else None
    mu_next = float(theta[nxt]) if nxt is not None else math.nan
    inv.error_bound = float(_impact(theta[nxt : nxt + 1], lam)[0]) / lam if nxt is not None and lam > 0 else math.nan
    mode = "auto" if auto_damping else "fixed"
    record: Dict[str, Any] = {"damping": lam, "damping_mode": mode, "lambda_min_estimate": lo,
                              "lambda_max_estimate": hi, "spectrum_passes": lz.steps}
    if isinstance(damping, AutoDamping):
        record["damping_base"] = damping.base
    inv.damping_record = record
    inv.spectrum = Spectrum(lo, hi, lz.steps)
    mu = inv.eigenvalues
    max_res = float((res[kept] / (theta[kept].abs() + lam)).max()) if k else 0.0
    inv.setup = _diagnostics(st, inv, mode, lo, hi, lz.steps, mu, mu_next, max_res, converged,
                             time.perf_counter() - t0, damping)
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


def _diagnostics(st: ArnoldiSettings, inv: ArnoldiInverse, mode: str, lo: float, hi: float, passes: int,
                 mu: Tensor, mu_next: float, max_res: float, converged: bool, seconds: float,
                 damping: DampingSpec) -> List[Diagnostic]:
    k = inv.rank
    out = [
        Diagnostic("rank", k, "rank k", f"eigenpairs of H kept ({'automatic, tol=' + str(st.tol) if st.rank == 'auto' else 'fixed'}; "
                   f"cap {st.max_rank})"),
        Diagnostic("eigenvalue_largest", float(mu.max()) if k else math.nan, "largest kept eigenvalue μ_1",
                   "largest Ritz value kept (Hessian units, undamped)", reduce="max"),
        Diagnostic("eigenvalue_smallest", float(mu.min()) if k else math.nan, "smallest kept eigenvalue μ_k",
                   "smallest Ritz value kept (Hessian units, undamped)", reduce="min"),
        Diagnostic("lanczos_passes", passes, "Lanczos passes", "full-data Hessian-vector products spent (one right-hand "
                   "side each): the Krylov dimension"),
        Diagnostic("damping", inv.damping, "damping λ",
                   "chosen from the Krylov space's extreme Ritz values: max(base, −λ_min(H) + margin)" if mode == "auto"
                   else "added to the Hessian of the mean training loss (fixed)"),
        Diagnostic("damping_mode", mode, "damping mode", "'auto': AutoDamping.choose on the Lanczos extremes; "
                   "'fixed': as given"),
        Diagnostic("lambda_min_estimate", lo, "λ_min(H) estimate (undamped)",
                   "smallest Ritz value of the Krylov space (never below λ_min(H))", reduce="min"),
        Diagnostic("lambda_max_estimate", hi, "λ_max(H) estimate (undamped)",
                   "largest Ritz value of the Krylov space (never above λ_max(H))", reduce="max"),
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
    if isinstance(damping, AutoDamping):
        out.insert(5, Diagnostic("damping_base", damping.base, "damping base", "the L2 coefficient λ never goes below"))
    return out
