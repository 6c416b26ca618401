"""Inverse-HVP solvers behind one interface: ``settings.fit(problem, damping).solve(V)``.

Solvers register themselves by subclassing :class:`SolverSettings` with ``name=`` and ``kind=``
(:mod:`.base`); :func:`resolve_solver` and :func:`solver_names` read the registry."""

from __future__ import annotations

from .base import (Curvature, FactoredInverse, InverseHVP, SolveResult, SolverKind, SolverSettings, registered_solvers,
                   resolve_solver, solver_names)
from .arnoldi import ArnoldiSettings
from .auto import AutoSettings, choose_solver
from .cg import CGSettings
from .ekfac import EKFACSettings, KFACSettings
from .exact import ExactSettings
from .lissa import LissaSettings
from .preconditioned import Preconditioned

__all__ = ["ArnoldiSettings", "AutoSettings", "CGSettings", "Curvature", "EKFACSettings", "ExactSettings", "FactoredInverse", "InverseHVP",
           "KFACSettings", "LissaSettings", "Preconditioned", "SolveResult", "SolverKind", "SolverSettings",
           "choose_solver", "registered_solvers", "resolve_solver", "solver_names"]
