"""Inverse-HVP solvers behind one interface: ``settings.fit(problem, damping).solve(V)``."""

from __future__ import annotations

from typing import Dict, Type, Union

from ..errors import InfluenceConfigError
from .base import FactoredInverse, InverseHVP, SolverSettings, SolveResult
from .arnoldi import ArnoldiSettings
from .cg import CGSettings
from .ekfac import EKFACSettings, KFACSettings
from .exact import ExactSettings
from .lissa import LissaSettings

__all__ = ["SOLVERS", "ArnoldiSettings", "CGSettings", "EKFACSettings", "ExactSettings", "KFACSettings", "FactoredInverse", "InverseHVP", "LissaSettings", "SolveResult",
           "SolverSettings", "resolve_solver"]

SOLVERS: Dict[str, Type[SolverSettings]] = {
    "lissa": LissaSettings,
    "cg": CGSettings,
    "exact": ExactSettings,
    "ekfac": EKFACSettings,
    "kfac": KFACSettings,
    "arnoldi": ArnoldiSettings,
}


def resolve_solver(solver: Union[str, SolverSettings]) -> SolverSettings:
    """Settings from a solver name (with default settings) or a settings object."""
    if isinstance(solver, SolverSettings):
        return solver
    if isinstance(solver, str) and solver in SOLVERS:
        return SOLVERS[solver]()
    raise InfluenceConfigError(
        f"solver={solver!r} is not a known solver; use one of {sorted(SOLVERS)} or a settings object "
        "such as LissaSettings(depth=..., scale=...)."
    )
