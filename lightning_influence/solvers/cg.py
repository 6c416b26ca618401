"""Batched conjugate gradient on full-training-set Hessian-vector products, optionally preconditioned by a
factored approximation of ``H + λI`` (EK-FAC, K-FAC, Arnoldi)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Union

import torch
from torch import Tensor

from ..checks import is_int, is_real
from ..curvature.damping import DampingChoice
from ..diagnostics import Diagnostic
from ..errors import InfluenceConfigError, NegativeCurvatureError
from .base import Curvature, InverseHVP, SolveResult, SolverKind, SolverSettings, check_finite
from .preconditioned import check_preconditioner

if TYPE_CHECKING:  # pragma: no cover
    from ..problem import InfluenceProblem

__all__ = ["CGSettings", "CGSolver"]


@dataclass(frozen=True)
class CGSettings(SolverSettings, name="cg", kind=SolverKind.ITERATIVE):
    """Conjugate gradient, one independent CG per right-hand side, all advanced together.

    Args:
        tol: stop a right-hand side when ``‖(H+λI)x − v‖ ≤ tol·‖v‖``.
        max_iter: iteration cap (default ``min(P, 1000)``); each iteration is one sweep over the data.
            Ending unconverged warns with the residual.
        preconditioner: ``None``, or a closed-form solver's name (``"arnoldi"``, ``"ekfac"``, ``"kfac"``)
            or settings: preconditioned CG with ``P⁻¹`` its inverse (fitted once at the same damping),
            started from ``x_0 = P⁻¹ v``.
    """

    tol: float = 1e-6
    max_iter: Optional[int] = None
    preconditioner: Union[str, SolverSettings, None] = None

    def __post_init__(self) -> None:
        if not is_real(self.tol) or not self.tol > 0:
            raise InfluenceConfigError(f"CGSettings.tol={self.tol!r} must be a positive number.")
        if self.max_iter is not None and (not is_int(self.max_iter)
                                          or self.max_iter < 1):
            raise InfluenceConfigError(f"CGSettings.max_iter={self.max_iter!r} must be a positive integer or None.")
        check_preconditioner("CGSettings", self.preconditioner)

    def build(self, problem: "InfluenceProblem", damping: DampingChoice, curvature: Curvature) -> "CGSolver":
        return CGSolver(problem, damping, self, curvature.preconditioner)


class CGSolver(InverseHVP):
    """Solves ``(H + λI) X = V`` by (preconditioned) CG. Requires ``H + λI`` positive definite: negative
    curvature along a search direction raises an error naming the fix (more damping)."""

    def __init__(self, problem: "InfluenceProblem", damping: DampingChoice, settings: CGSettings,
                 preconditioner=None) -> None:
        super().__init__(problem, damping)
        self.preconditioner = preconditioner
        self.settings = settings

    def _precondition(self, r: Tensor) -> Tensor:
        return r if self.preconditioner is None else self.preconditioner.apply(r)

    def solve(self, rhs: Tensor) -> SolveResult:
        max_iter = self.settings.max_iter or min(self.problem.num_params, 1000)
        hvp0 = self.hvp_calls
        bnorm = rhs.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
        if self.preconditioner is None:
            x = torch.zeros_like(rhs)
            r = rhs.clone()
        else:
            x = self._precondition(rhs)
            r = rhs - self.damped_full_hvp(x)
        z = self._precondition(r)
        p = z.clone()
        rs = (r * z).sum(1)
        active = r.norm(dim=1) / bnorm > self.settings.tol
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
            z = self._precondition(r)
            rs_new = (r * z).sum(1)
            check_finite(rs_new, "CG residual", it, history[-5:], "Raise damping or check the model for NaN.")
            rel = r.norm(dim=1) / bnorm
            history.append(float(rel[active].max()))
            beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(rhs.dtype).tiny), torch.zeros_like(rs))
            p = torch.where(active[:, None], z + beta[:, None] * p, p)
            rs = torch.where(active, rs_new, rs)
            active = active & (rel > self.settings.tol)
        converged = not bool(active.any())
        final = float((r.norm(dim=1) / bnorm).max())  # the recursive residual (inactive rows are frozen)
        if not converged:
            warnings.warn(
                f"CG stopped at max_iter={max_iter} before converging: the largest relative residual "
                f"‖(H+λI)x − v‖/‖v‖ is {final:.3g} > tol={self.settings.tol:g}, so the scores may be off by about "
                "that much. Raise CGSettings(max_iter=...), raise the damping, or use a preconditioner.",
                RuntimeWarning,
                stacklevel=3,
            )
        return SolveResult(x, [
            Diagnostic("iterations", it, "CG iterations", "full-data HVP sweeps of the solve", "max"),
            Diagnostic("converged", converged, "converged", "every right-hand side reached tol", "all"),
            Diagnostic("max_relative_residual", final, "largest relative residual",
                       "‖(H+λI)x − v‖/‖v‖ at the end, over the chunk's queries", "max"),
            Diagnostic("hvp_calls", self.hvp_calls - hvp0, "solve HVPs", "batched Hessian-vector products", "sum"),
            Diagnostic("residual_history", [{"label": "max over queries", "x": list(range(1, len(history) + 1)),
                                             "y": history}], "relative residual per iteration",
                       "largest ‖(H+λI)x − v‖/‖v‖ over the still-running queries after each CG iteration",
                       kind="series"),
        ])
