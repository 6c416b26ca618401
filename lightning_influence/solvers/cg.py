"""Batched conjugate gradient on full-training-set Hessian-vector products."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional

import torch
from torch import Tensor

from ..errors import InfluenceConfigError, NegativeCurvatureError
from ..operator import HessianOperator
from .base import InverseHVP, SolveResult, SolverSettings, check_finite

if TYPE_CHECKING:  # pragma: no cover
    from ..damping import Spectrum

__all__ = ["CGSettings", "CGSolver"]


@dataclass(frozen=True)
class CGSettings(SolverSettings):
    """Conjugate gradient, one independent CG per right-hand side, all advanced together.

    Args:
        tol: stop a right-hand side when ``‖(H+λI)x − v‖ ≤ tol·‖v‖``.
        max_iter: iteration cap (default ``min(P, 1000)``); each iteration is one sweep over the data.
    """

    name = "cg"
    tol: float = 1e-6
    max_iter: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.tol > 0:
            raise InfluenceConfigError(f"CGSettings.tol={self.tol} must be positive.")
        if self.max_iter is not None and self.max_iter < 1:
            raise InfluenceConfigError(f"CGSettings.max_iter={self.max_iter} must be a positive integer.")

    def build(self, operator: HessianOperator, damping: float, spectrum: Optional["Spectrum"] = None) -> "CGSolver":
        return CGSolver(operator, damping, self)


class CGSolver(InverseHVP):
    """Solves ``(H + λI) X = V`` by CG. Requires ``H + λI`` positive definite: negative curvature along
    a search direction raises an error naming the fix (more damping)."""

    def __init__(self, operator: HessianOperator, damping: float, settings: CGSettings) -> None:
        super().__init__(operator, damping)
        self.settings = settings

    def solve(self, rhs: Tensor) -> SolveResult:
        max_iter = self.settings.max_iter or min(self.operator.num_params, 1000)
        x = torch.zeros_like(rhs)
        r = rhs.clone()
        p = r.clone()
        rs = (r * r).sum(1)
        bnorm = rs.sqrt().clamp_min(torch.finfo(rhs.dtype).tiny)
        active = rs.sqrt() / bnorm > self.settings.tol
        history: List[float] = []
        it = 0
        for it in range(1, max_iter + 1):
            if not bool(active.any()):
                it -= 1
                break
            ap = self.damped_full_hvp(p)
            pap = (p * ap).sum(1)
            if bool((pap[active] <= 0).any()):
                raise NegativeCurvatureError(
                    f"CG met non-positive curvature pᵀ(H+λI)p ≤ 0 at iteration {it} with damping λ={self.damping:g}: "
                    "the Hessian is not positive definite here. Raise damping (e.g. above the magnitude of "
                    "the most negative Hessian eigenvalue), or pass damping='auto' to choose it from the spectrum."
                )
            alpha = torch.where(active, rs / pap.clamp_min(torch.finfo(rhs.dtype).tiny), torch.zeros_like(rs))
            x.addcmul_(alpha[:, None], p)
            r.addcmul_(alpha[:, None], ap, value=-1.0)
            rs_new = (r * r).sum(1)
            check_finite(rs_new, "CG residual", it, history[-5:], "Raise damping or check the model for NaN.")
            rel = rs_new.sqrt() / bnorm
            history.append(float(rel.max()))
            beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(rhs.dtype).tiny), torch.zeros_like(rs))
            p = torch.where(active[:, None], r + beta[:, None] * p, p)
            rs = torch.where(active, rs_new, rs)
            active = active & (rel > self.settings.tol)
        converged = not bool(active.any())
        final = (rs.sqrt() / bnorm)
        return SolveResult(
            x,
            {
                "iterations": it,
                "converged": converged,
                "max_relative_residual": float(final.max()),
                "residual_history": history,
            },
        )
