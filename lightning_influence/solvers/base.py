"""The one interface every inverse-HVP method implements.

A solver's *settings* are a frozen dataclass, validated on construction and serialisable into a logger's
config. ``settings.build(operator, damping)`` returns an :class:`InverseHVP` that solves
``(H + λI) X = V`` for a batch of right-hand sides ``V [Q, P]``. Solvers see only tensors and the
:class:`~lightning_influence.operator.HessianOperator`; never a Trainer, a device choice or a logger.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Optional

import torch
from torch import Tensor

from ..errors import SolverDivergedError
from ..operator import HessianOperator

if TYPE_CHECKING:  # pragma: no cover
    from ..damping import Spectrum

__all__ = ["SolveResult", "InverseHVP", "SolverSettings", "check_finite"]


@dataclass
class SolveResult:
    """``solution`` ``[Q, P]`` ≈ ``(H + λI)⁻¹ V``, with diagnostics as plain data (floats, ints, lists)."""

    solution: Tensor
    diagnostics: Dict[str, Any] = field(default_factory=dict)


class InverseHVP(ABC):
    """A solver bound to one Hessian operator and damping."""

    def __init__(self, operator: HessianOperator, damping: float) -> None:
        self.operator = operator
        self.damping = float(damping)

    @abstractmethod
    def solve(self, rhs: Tensor) -> SolveResult:
        """Return ``(H + λI)⁻¹ rhs`` for every row of ``rhs`` ``[Q, P]``."""

    def damped_hvp(self, batch: Any, vectors: Tensor) -> Tensor:
        """``(H_B + λI) V`` on a minibatch."""
        return self.operator.batch_hvp(batch, vectors) + self.damping * vectors

    def damped_full_hvp(self, vectors: Tensor) -> Tensor:
        """``(H + λI) V`` on the whole training set."""
        return self.operator.full_hvp(vectors) + self.damping * vectors


@dataclass(frozen=True)
class SolverSettings(ABC):
    """Base of every solver's settings. Subclasses are frozen dataclasses with ``name`` set."""

    name: ClassVar[str] = ""

    @abstractmethod
    def build(self, operator: HessianOperator, damping: float, spectrum: Optional["Spectrum"] = None) -> InverseHVP:
        """Bind these settings to an operator and a damping ``λ ≥ 0``. ``spectrum``: extreme-eigenvalue
        estimates of ``H`` already made (by automatic damping), which a solver may reuse."""

    def to_dict(self) -> Dict[str, Any]:
        """Settings as a flat dict (JSON-serialisable), including the solver's name."""
        return {"solver": self.name, **dataclasses.asdict(self)}


def check_finite(x: Tensor, what: str, step: int, history: Any = None, fix: str = "") -> None:
    """Raise :class:`SolverDivergedError` if ``x`` holds NaN or inf."""
    if not bool(torch.isfinite(x).all()):
        hist = f" Norm history: {history}." if history else ""
        raise SolverDivergedError(f"{what} became NaN/inf at step {step}.{hist} {fix}".strip())
