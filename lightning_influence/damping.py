"""Damping from the spectrum: how much ``λI`` a (possibly non-convex) model's Hessian needs.

Influence functions assume ``H + λI`` is positive definite (the trained weights minimise a quadratic
model of the loss). A network stopped by SGD or Adam is rarely at a strict minimum: its Hessian has
negative eigenvalues, and then LiSSA's Neumann series diverges, CG meets non-positive curvature and a
dense solve returns numbers without meaning. This module estimates the extreme eigenvalues of the
Hessian with Lanczos and either checks a given damping or chooses one:

    λ = base + safety · max(0, −λ̂_min(H + base·I)),   raised to at least ``floor · λ̂_max(H)``,

``base`` being the damping the user's loss already implies (its coupled L2 weight decay). ``λ`` is in
the units of ``H``, the Hessian of the *mean* training loss. Lanczos Ritz values never overshoot the
extreme eigenvalues (``λ̂_min ≥ λ_min``), hence the safety factor. Knows nothing about Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Union

from .errors import InfluenceConfigError, NegativeCurvatureError
from .operator import HessianOperator
from .spectral import lanczos_extremes

__all__ = ["AutoDamping", "Spectrum", "estimate_spectrum", "check_curvature", "resolve_damping"]


@dataclass(frozen=True)
class AutoDamping:
    """Choose the damping from the Hessian's spectrum (``damping="auto"`` is ``AutoDamping()``).

    Args:
        base: damping the training loss already implies (e.g. its coupled L2 weight decay), Hessian units.
        safety: multiplier on ``−λ̂_min(H + base·I)`` when that is positive.
        floor: the result is at least ``floor · λ̂_max(H)`` (a relative minimum for a flat Hessian).
        iters: Lanczos steps (full-data Hessian-vector products) for the estimate.
        seed: start vector of Lanczos.
    """

    base: float = 0.0
    safety: float = 1.5
    floor: float = 1e-3
    iters: int = 60
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("base", "floor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= float(v) < math.inf:
                raise InfluenceConfigError(f"AutoDamping.{name}={v!r} must be a finite number ≥ 0.")
        if isinstance(self.safety, bool) or not isinstance(self.safety, (int, float)) or not self.safety >= 1:
            raise InfluenceConfigError(f"AutoDamping.safety={self.safety!r} must be a number ≥ 1.")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 2:
            raise InfluenceConfigError(f"AutoDamping.iters={self.iters!r} must be an integer ≥ 2.")

    def choose(self, lambda_min: float, lambda_max: float) -> float:
        """The damping for Hessian eigenvalue estimates ``lambda_min ≤ lambda_max`` (of ``H``, undamped)."""
        lam = self.base + self.safety * max(0.0, -(lambda_min + self.base))
        return float(max(lam, self.floor * abs(lambda_max)))


@dataclass(frozen=True)
class Spectrum:
    """Lanczos estimates of the extreme eigenvalues of ``H`` (undamped) and the products they cost."""

    lambda_min: float
    lambda_max: float
    hvps: int

    def as_dict(self) -> Dict[str, Any]:
        return {"lambda_min": self.lambda_min, "lambda_max": self.lambda_max, "spectrum_hvps": self.hvps}


def estimate_spectrum(operator: HessianOperator, iters: int = 60, seed: int = 0) -> Spectrum:
    """``λ_min(H)`` and ``λ_max(H)`` by ``iters`` steps of Lanczos on the full-data Hessian."""
    lo, hi = lanczos_extremes(
        operator.full_hvp, operator.num_params, iters=iters, seed=seed, dtype=operator.dtype, device=operator.device
    )
    return Spectrum(lo.value, hi.value, lo.matvecs)


def check_curvature(spectrum: Spectrum, damping: float, solver: str, safety: float = 1.5, floor: float = 1e-3) -> None:
    """Raise :class:`NegativeCurvatureError` when ``H + λI`` has a non-positive eigenvalue estimate,
    naming the damping that would fix it."""
    if spectrum.lambda_min + damping > 0:
        return
    need = AutoDamping(base=float(damping), safety=safety, floor=floor).choose(spectrum.lambda_min, spectrum.lambda_max)
    raise NegativeCurvatureError(
        f"H + λI is not positive definite: the smallest Hessian eigenvalue is estimated at "
        f"{spectrum.lambda_min:.4g} (Lanczos, {spectrum.hvps} HVPs), so with damping λ={damping:g} the curvature "
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
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (0 <= float(damping) < math.inf):
        raise InfluenceConfigError(
            f'damping={damping!r} must be a finite number ≥ 0 (it is added to the Hessian as λI), or "auto".'
        )
    return float(damping)
