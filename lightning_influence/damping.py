"""Damping from the spectrum: how much ``λI`` a (possibly non-convex) model's Hessian needs.

Influence functions assume ``H + λI`` is positive definite (the trained weights minimise a quadratic
model of the loss). A network stopped by SGD or Adam is rarely at a strict minimum: its Hessian has
negative eigenvalues, and then LiSSA's Neumann series diverges, CG meets non-positive curvature and a
dense solve returns numbers without meaning. This module estimates the extreme eigenvalues of the
Hessian with Lanczos and either checks a given damping or chooses one:

    λ = max(base, −λ̂_min + margin),   margin = max((safety − 1)·max(0, −λ̂_min), floor·|λ̂_max|),

so the smallest eigenvalue estimate of ``H + λI`` is at least ``margin`` (a fraction of the negative
curvature, and at least ``floor`` of the largest eigenvalue: a bound on the condition number), and never
below ``base``, the damping the user's loss already implies (its coupled L2 weight decay). ``λ`` is in
the units of ``H``, the Hessian of the *mean* training loss. Lanczos Ritz values never overshoot the
extreme eigenvalues (``λ̂_min ≥ λ_min``), hence the margin. Knows nothing about Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

from .checks import is_int, is_real
from .diagnostics import Diagnostic
from .errors import InfluenceConfigError, NegativeCurvatureError
from .operator import HessianOperator
from .spectral import lanczos_extremes

if TYPE_CHECKING:  # pragma: no cover
    from .problem import InfluenceProblem

__all__ = ["AutoDamping", "DampingChoice", "Spectrum", "estimate_spectrum", "check_curvature", "hessian_damping",
           "resolve_damping"]


@dataclass(frozen=True)
class AutoDamping:
    """Choose the damping from the Hessian's spectrum (``damping="auto"`` is ``AutoDamping()``).

    Args:
        base: damping the training loss already implies (e.g. its coupled L2 weight decay), Hessian units.
        safety: ``> 1``; with negative curvature, ``λ ≥ safety · |λ̂_min|`` (unless ``base`` is larger).
        floor: ``> 0``; the smallest eigenvalue of ``H + λI`` is kept at least ``floor · |λ̂_max(H)|``
            (unless ``base`` gives more), which bounds its condition number by about ``1/floor``.
        iters: Lanczos steps (full-data Hessian-vector products) for the estimate.
        seed: start vector of Lanczos.
    """

    base: float = 0.0
    safety: float = 1.5
    floor: float = 1e-3
    iters: int = 60
    seed: int = 0

    def __post_init__(self) -> None:
        def number(v: Any) -> bool:
            return is_real(v) and math.isfinite(float(v))

        if not (number(self.base) and self.base >= 0):
            raise InfluenceConfigError(f"AutoDamping.base={self.base!r} must be a finite number ≥ 0.")
        if not (number(self.floor) and self.floor > 0):
            raise InfluenceConfigError(f"AutoDamping.floor={self.floor!r} must be a finite number > 0 (e.g. 1e-3).")
        if not (number(self.safety) and self.safety > 1):
            raise InfluenceConfigError(f"AutoDamping.safety={self.safety!r} must be a finite number > 1 (e.g. 1.5).")
        if not is_int(self.iters) or self.iters < 2:
            raise InfluenceConfigError(f"AutoDamping.iters={self.iters!r} must be an integer ≥ 2.")
        if not is_int(self.seed):
            raise InfluenceConfigError(f"AutoDamping.seed={self.seed!r} must be an integer.")

    def choose(self, lambda_min: float, lambda_max: float) -> float:
        """The damping for Hessian eigenvalue estimates ``lambda_min ≤ lambda_max`` (of ``H``, undamped)."""
        margin = max((self.safety - 1.0) * max(0.0, -lambda_min), self.floor * abs(lambda_max))
        return float(max(self.base, -lambda_min + margin))


@dataclass(frozen=True)
class Spectrum:
    """Lanczos estimates of the extreme eigenvalues of ``H`` (undamped) and their cost in full-data
    Hessian-vector products (``passes``, each a sweep over the whole training set)."""

    lambda_min: float
    lambda_max: float
    passes: int


def estimate_spectrum(operator: HessianOperator, iters: int = 60, seed: int = 0) -> Spectrum:
    """``λ_min(H)`` and ``λ_max(H)`` by ``iters`` steps of Lanczos on the full-data Hessian."""
    lo, hi = lanczos_extremes(
        operator.full_hvp, operator.num_params, iters=iters, seed=seed, dtype=operator.dtype, device=operator.device
    )
    return Spectrum(lo.value, hi.value, lo.matvecs)


@dataclass(frozen=True)
class DampingChoice:
    """The damping a solver settled on: ``value`` (λ, Hessian units), the spectrum estimated on the way
    (if any), the settings record (``damping``, ``damping_mode``, …) and the same as diagnostics."""

    value: float
    spectrum: Optional[Spectrum] = None
    record: Dict[str, Any] = field(default_factory=dict)
    diagnostics: List[Diagnostic] = field(default_factory=list)


def hessian_damping(problem: "InfluenceProblem", spec: Union[float, AutoDamping]) -> DampingChoice:
    """The rule of the Hessian-vector-product solvers (LiSSA, CG, exact): a fixed ``λ`` as given, or for
    :class:`AutoDamping` Lanczos on the full-data Hessian (``spec.iters`` passes) and
    :meth:`AutoDamping.choose`. The spectrum is returned for reuse (curvature checks, batch sizes)."""
    if not isinstance(spec, AutoDamping):
        lam = float(spec)
        return DampingChoice(lam, None, {"damping": lam, "damping_mode": "fixed"}, [
            Diagnostic("damping", lam, "damping λ", "added to the Hessian of the mean training loss (fixed)")])
    spectrum = estimate_spectrum(problem.operator, spec.iters, spec.seed)
    lam = spec.choose(spectrum.lambda_min, spectrum.lambda_max)
    record = {"damping": lam, "damping_mode": "auto", "damping_base": spec.base,
              "lambda_min_estimate": spectrum.lambda_min, "lambda_max_estimate": spectrum.lambda_max,
              "spectrum_passes": spectrum.passes}
    return DampingChoice(lam, spectrum, record, [
        Diagnostic("damping", lam, "damping λ", "chosen from the spectrum: max(base, −λ_min(H) + margin)"),
        Diagnostic("damping_base", spec.base, "damping base", "the L2 coefficient λ never goes below"),
        Diagnostic("lambda_min_estimate", spectrum.lambda_min, "λ_min(H) estimate (undamped)",
                   "smallest eigenvalue of the Hessian H without damping (Lanczos; never overshoots)", reduce="min"),
        Diagnostic("lambda_max_estimate", spectrum.lambda_max, "λ_max(H) estimate (undamped)",
                   "largest eigenvalue of the Hessian H without damping (Lanczos)", reduce="max"),
        Diagnostic("spectrum_passes", spectrum.passes, "Lanczos passes", "full-data Hessian-vector products spent "
                   "on the spectrum estimate"),
    ])


def check_curvature(spectrum: Spectrum, damping: float, solver: str) -> None:
    """Raise :class:`NegativeCurvatureError` when ``H + λI`` has a non-positive eigenvalue estimate,
    naming the damping that would fix it (what ``AutoDamping(base=damping)`` would choose)."""
    if spectrum.lambda_min + damping > 0:
        return
    need = AutoDamping(base=float(damping)).choose(spectrum.lambda_min, spectrum.lambda_max)
    raise NegativeCurvatureError(
        f"H + λI is not positive definite: the smallest Hessian eigenvalue is estimated at "
        f"{spectrum.lambda_min:.4g} (Lanczos, {spectrum.passes} full-data HVPs), so with damping λ={damping:g} the curvature "
        f"is {spectrum.lambda_min + damping:.3g} along some direction and solver={solver!r} cannot give "
        f"meaningful influence (the trained weights are not at a minimum). Fix: damping ≥ {need:.3g}, or "
        "damping='auto' (chooses it), or train closer to convergence."
    )


def resolve_damping(damping: Union[float, str, AutoDamping]) -> Union[float, AutoDamping]:
    """Validate a damping argument: a finite number ``≥ 0``, ``"auto"`` or an :class:`AutoDamping`."""
    if isinstance(damping, AutoDamping):
        return damping
    if isinstance(damping, str):
        if damping == "auto":
            return AutoDamping()
        raise InfluenceConfigError(f'damping={damping!r} must be a number ≥ 0, "auto" or AutoDamping(...).')
    if not is_real(damping) or not (0 <= float(damping) < math.inf):
        raise InfluenceConfigError(
            f'damping={damping!r} must be a finite number ≥ 0 (it is added to the Hessian as λI), or "auto".'
        )
    return float(damping)
