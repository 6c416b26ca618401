"""LiSSA: the stochastic Neumann recursion of Agarwal et al. (2017), batched over right-hand sides.

With ``A = H + λI`` and a scale ``s`` larger than the top eigenvalue of every minibatch ``A_B``,

    h_0 = v,    h_t = v + (I − A_{B_t} / s) h_{t−1},    A⁻¹ v ≈ h_T / s,

because ``Σ_k (I − A/s)^k = s A⁻¹``. All right-hand sides share the minibatch ``B_t`` of each step, so one
vmapped HVP advances every query. ``repeats`` independent recursions (seeds ``seed, seed+1, …``) are
averaged. Damping ``λ`` is in Hessian units and independent of ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch import Tensor

from ..errors import InfluenceConfigError, SolverDivergedError
from ..operator import HessianOperator
from .base import InverseHVP, SolveResult, SolverSettings, check_finite

__all__ = ["LissaSettings", "LissaSolver"]


@dataclass(frozen=True)
class LissaSettings(SolverSettings):
    """Settings of the LiSSA recursion.

    Args:
        depth: recursion steps per repeat (each one minibatch HVP for all queries at once).
        batch_size: training examples per minibatch HVP.
        scale: ``s`` above; must exceed the largest eigenvalue of ``H_B + λI`` for the recursion to contract.
        repeats: independent recursions averaged.
        seed: seed of the minibatch sampler; the same seed gives the same result.
    """

    name = "lissa"
    depth: int = 1000
    batch_size: int = 64
    scale: float = 10.0
    repeats: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for arg in ("depth", "batch_size", "repeats"):
            v = getattr(self, arg)
            if not isinstance(v, int) or v < 1:
                raise InfluenceConfigError(f"LissaSettings.{arg}={v!r} must be a positive integer.")
        if not (isinstance(self.scale, (int, float)) and self.scale > 0):
            raise InfluenceConfigError(f"LissaSettings.scale={self.scale!r} must be a positive number.")

    def build(self, operator: HessianOperator, damping: float) -> "LissaSolver":
        return LissaSolver(operator, damping, self)


class LissaSolver(InverseHVP):
    """Runs the recursion; diverging estimates raise :class:`SolverDivergedError` with the fix."""

    def __init__(self, operator: HessianOperator, damping: float, settings: LissaSettings) -> None:
        super().__init__(operator, damping)
        self.settings = settings

    def solve(self, rhs: Tensor) -> SolveResult:
        st = self.settings
        total = torch.zeros_like(rhs)
        vnorm = rhs.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
        norms: List[List[float]] = []
        for r in range(st.repeats):
            batches = self.operator.minibatches(st.batch_size, st.seed + r)
            h = rhs.clone()
            hist: List[float] = []
            for t in range(1, st.depth + 1):
                h = rhs + h - self.damped_hvp(next(batches), h) / st.scale
                if t % 10 == 0 or t == st.depth:
                    ratio = float((h.norm(dim=1) / vnorm).max())
                    hist.append(ratio)
                    check_finite(h, "LiSSA estimate", t, hist[-5:], f"Raise scale above {st.scale:g} or add damping.")
                    if ratio > 1e6 * (t + 1):
                        raise SolverDivergedError(
                            f"LiSSA diverged at step {t}: ‖h_t‖/‖v‖ = {ratio:.3g} grows geometrically "
                            f"(history {hist[-5:]}). scale={st.scale:g} is below the top eigenvalue of the "
                            "minibatch Hessian plus damping, or the Hessian has negative curvature: raise scale "
                            "or damping."
                        )
            total += h / st.scale
            norms.append(hist)
        return SolveResult(total / st.repeats, {"depth": st.depth, "scale": st.scale, "norm_history": norms})
