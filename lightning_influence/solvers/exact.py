"""Exact solver: form ``H + λI`` explicitly and solve. The reference other solvers are tested against;
only for small parameter counts (memory ``P²``, time ``O(P·n)`` HVP work plus ``O(P³)``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..checks import is_int
from ..curvature.damping import AutoDamping, DampingChoice, DampingRule, DampingSpec, Spectrum, SpectrumRule
from ..diagnostics import Diagnostic
from ..errors import InfluenceConfigError, InfluenceRuntimeError
from .base import Curvature, InverseHVP, SolveResult, SolverKind, SolverSettings

if TYPE_CHECKING:  # pragma: no cover
    from ..problem import InfluenceProblem

__all__ = ["ExactSettings", "ExactSolver"]


@dataclass(frozen=True)
class ExactSettings(SolverSettings, name="exact", kind=SolverKind.DIRECT):
    """Explicit Hessian and a dense solve. Its exact eigenvalues serve the automatic damping (no Lanczos).

    Args:
        max_params: refuse above this many attributed parameters (the Hessian takes ``P²`` numbers).
        block: identity columns per HVP sweep when forming the Hessian.
    """

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

    @property
    def damping_rule(self) -> DampingRule:
        return SpectrumRule(check=False)  # an indefinite H + λI warns (below) instead of raising

    def estimate(self, problem: "InfluenceProblem", damping: DampingSpec) -> Curvature:
        """The explicit Hessian (``P / block`` sweeps over the data) and its exact extreme eigenvalues."""
        hessian = problem.operator.dense(self.block)
        if not bool(torch.isfinite(hessian).all()):
            raise InfluenceRuntimeError(
                "the Hessian has NaN/inf entries: some training example has a non-finite gradient or curvature "
                "at the trained weights. Check the data and the loss."
            )
        evals = torch.linalg.eigvalsh(hessian)
        spectrum = Spectrum(float(evals[0]), float(evals[-1]), 0, None, None, "H (dense, exact)")
        return Curvature(spectrum, state=hessian)

    def build(self, problem: "InfluenceProblem", damping: DampingChoice, curvature: Curvature) -> "ExactSolver":
        return ExactSolver(problem, damping, self, curvature.state)


class ExactSolver(InverseHVP):
    """Factorises ``H + λI`` once (LU, which also handles indefinite matrices); each ``solve`` is a
    pair of triangular solves."""

    def __init__(self, problem: "InfluenceProblem", damping: DampingChoice, settings: ExactSettings,
                 hessian: Tensor) -> None:
        super().__init__(problem, damping)
        p = problem.num_params
        self.settings = settings
        self.hessian = hessian
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
                stacklevel=4,
            )
        self.setup = [
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
