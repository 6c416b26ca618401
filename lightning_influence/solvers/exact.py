"""Exact solver: form ``H + λI`` explicitly and solve. The reference other solvers are tested against;
only for small parameter counts (memory ``P²``, time ``O(P·n)`` HVP work plus ``O(P³)``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..checks import is_int
from ..damping import AutoDamping, hessian_damping
from ..diagnostics import Diagnostic
from ..errors import InfluenceConfigError, InfluenceRuntimeError
from .base import DampingSpec, InverseHVP, SolveResult, SolverSettings

if TYPE_CHECKING:  # pragma: no cover
    from ..problem import InfluenceProblem

__all__ = ["ExactSettings", "ExactSolver"]


@dataclass(frozen=True)
class ExactSettings(SolverSettings):
    """Explicit Hessian and a dense solve.

    Args:
        max_params: refuse above this many attributed parameters (the Hessian takes ``P²`` numbers).
        block: identity columns per HVP sweep when forming the Hessian.
    """

    name = "exact"
    max_params: int = 10_000
    block: int = 512

    def __post_init__(self) -> None:
        for arg in ("max_params", "block"):
            v = getattr(self, arg)
            if not is_int(v) or v < 1:
                raise InfluenceConfigError(f"ExactSettings.{arg}={v!r} must be a positive integer.")

    def check_size(self, num_params: int, dtype: torch.dtype) -> None:
        if num_params > self.max_params:
            gib = num_params * num_params * torch.empty((), dtype=dtype).element_size() / 2**30
            raise InfluenceConfigError(
                f"solver='exact' would form a {num_params}×{num_params} Hessian ({gib:.1f} GiB); that is above "
                f"ExactSettings.max_params={self.max_params}. Use solver='lissa' or 'cg', attribute to fewer "
                "parameters (params=[...]), or raise max_params."
            )

    def fit(self, problem: "InfluenceProblem", damping: DampingSpec) -> "ExactSolver":
        return ExactSolver(problem, damping, self)


class ExactSolver(InverseHVP):
    """Factorises ``H + λI`` once (LU, which also handles indefinite matrices); each ``solve`` is a
    pair of triangular solves."""

    def __init__(self, problem: "InfluenceProblem", damping: DampingSpec, settings: ExactSettings) -> None:
        p = problem.num_params
        settings.check_size(p, problem.dtype)  # before any pass over the data (automatic damping's included)
        choice = hessian_damping(problem, damping)
        super().__init__(problem, choice.value)
        self.damping_record = dict(choice.record)
        self.settings = settings
        self.hessian = problem.operator.dense(settings.block)
        if not bool(torch.isfinite(self.hessian).all()):
            raise InfluenceRuntimeError(
                "the Hessian has NaN/inf entries: some training example has a non-finite gradient or curvature "
                "at the trained weights. Check the data and the loss."
            )
        a = self.hessian + self.damping * torch.eye(p, dtype=self.hessian.dtype, device=self.hessian.device)
        evals = torch.linalg.eigvalsh(a)
        self.min_eig, self.max_eig = float(evals[0]), float(evals[-1])
        if self.min_eig <= 0:
            need = AutoDamping().choose(self.min_eig - self.damping, self.max_eig - self.damping)
            warnings.warn(
                f"H + λI is not positive definite (smallest eigenvalue {self.min_eig:.4g} at damping "
                f"λ={self.damping:g}): the trained weights are not at a minimum, so the influence scores are "
                f"solutions of an indefinite system and may not mean much. Use damping ≥ {need:.3g} or "
                "damping='auto'.",
                RuntimeWarning,
                stacklevel=3,
            )
        self.setup = list(choice.diagnostics) + [
            Diagnostic("min_eigenvalue", self.min_eig, "λ_min(H + λI) (damped)",
                       "smallest eigenvalue of the damped Hessian the scores invert (dense eigendecomposition)", "min"),
            Diagnostic("max_eigenvalue", self.max_eig, "λ_max(H + λI) (damped)",
                       "largest eigenvalue of the damped Hessian", "max"),
            Diagnostic("num_params", p, "parameters", "size of the explicit Hessian's side"),
        ]
        self._lu, self._pivots, info = torch.linalg.lu_factor_ex(a)
        if int(info) != 0:
            raise InfluenceRuntimeError(
                f"H + λI is singular (λ={self.damping:g}, smallest eigenvalue {self.min_eig:.3g}); "
                "raise the damping."
            )

    def solve(self, rhs: Tensor) -> SolveResult:
        x = torch.linalg.lu_solve(self._lu, self._pivots, rhs.T).T
        return SolveResult(x.contiguous(), [])
