"""The one interface every inverse-HVP method implements.

A solver's *settings* are a frozen dataclass, validated on construction and serialisable into a logger's
config. ``settings.fit(problem, damping)`` looks at the :class:`~lightning_influence.problem.InfluenceProblem`
as much as it needs (HVP sweeps, per-layer statistics, spectral estimates), resolves the damping by its
own rule, and returns an :class:`InverseHVP` that solves ``(H + λI) X = V`` for a batch of right-hand
sides ``V [Q, P]``. Solvers see only tensors and the problem; never a Trainer, a device choice or a logger.

Two families:

* iterative (LiSSA, CG): each :meth:`InverseHVP.solve` runs Hessian-vector products;
* :class:`FactoredInverse` (EK-FAC, K-FAC, Arnoldi): the inverse is held in closed form, applies to any
  ``[Q, P]`` block at the cost of a few small matrix products, and gives ``gᵀ (Ĥ + λI)⁻¹ g`` for a batch
  of training gradients in the same pass as the scores (:meth:`InverseHVP.quadratic`). A factored
  inverse also serves as a preconditioner (:meth:`FactoredInverse.apply_inverse_sqrt`).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from ..diagnostics import Diagnostic
from ..errors import InfluenceConfigError, NegativeCurvatureError, SolverDivergedError

if TYPE_CHECKING:  # pragma: no cover
    from ..damping import AutoDamping, DampingChoice, Spectrum
    from ..problem import InfluenceProblem

__all__ = ["SolveResult", "InverseHVP", "FactoredInverse", "SolverSettings", "DampingSpec", "check_finite",
           "check_preconditioner", "damping_and_preconditioner"]

#: what ``fit`` receives: a fixed ``λ ≥ 0`` or an automatic rule (each solver applies its own)
DampingSpec = Union[float, "AutoDamping"]


@dataclass
class SolveResult:
    """``solution`` ``[Q, P]`` ≈ ``(H + λI)⁻¹ V``, with typed diagnostics for this chunk of queries."""

    solution: Tensor
    diagnostics: List[Diagnostic] = field(default_factory=list)


class InverseHVP(ABC):
    """``(H + λI)⁻¹`` fitted to one problem.

    Attributes:
        damping: the ``λ`` used (Hessian units).
        damping_record: how ``λ`` was chosen, merged into the results' settings.
        setup: diagnostics of the fit (how ``λ`` was chosen, spectral estimates, costs), as data.
        hvp_calls: batched Hessian-vector products spent so far (fit and solves).
    """

    def __init__(self, problem: "InfluenceProblem", damping: float) -> None:
        self.problem = problem
        self.damping = float(damping)
        self.setup: List[Diagnostic] = []
        #: how ``λ`` was chosen, as flat settings (``damping``, ``damping_mode``, estimates); solvers extend it
        self.damping_record: Dict[str, Any] = {"damping": self.damping}

    @property
    def hvp_calls(self) -> int:
        op = self.problem.__dict__.get("operator")  # only if built
        return int(op.hvp_calls) if op is not None else 0

    @abstractmethod
    def solve(self, rhs: Tensor) -> SolveResult:
        """Return ``(H + λI)⁻¹ rhs`` for every row of ``rhs`` ``[Q, P]``."""

    def quadratic(self, grads: Tensor) -> tuple[Tensor, List[Diagnostic]]:
        """``g_iᵀ (H + λI)⁻¹ g_i`` for every row ``g_i`` of ``grads`` ``[B, P]`` (self-influence is its
        negative), with the diagnostics of the solve. Iterative solvers solve the rows as one batch of
        right-hand sides; factored inverses override this with a closed form."""
        res = self.solve(grads)
        return (res.solution * grads).sum(dim=1), res.diagnostics

    def damped_full_hvp(self, vectors: Tensor) -> Tensor:
        """``(H + λI) V`` on the whole training set."""
        return self.problem.operator.full_hvp(vectors) + self.damping * vectors


class FactoredInverse(InverseHVP):
    """An approximate inverse ``(Ĥ + λI)⁻¹`` held in closed form (Kronecker factors, a low-rank
    eigendecomposition), symmetric positive definite.

    Attributes:
        spectrum: estimates of the extreme eigenvalues of the true Hessian ``H`` made while fitting (a
            Krylov method sees them; a Fisher approximation does not: ``None``). A solver preconditioned
            by this inverse reuses them for its damping and curvature check instead of its own Lanczos.
    """

    spectrum: Optional["Spectrum"] = None

    @abstractmethod
    def apply(self, vectors: Tensor) -> Tensor:
        """``(Ĥ + λI)⁻¹ V`` for every row of ``vectors`` ``[Q, P]``."""

    @abstractmethod
    def apply_inverse_sqrt(self, vectors: Tensor) -> Tensor:
        """``(Ĥ + λI)^{-1/2} V`` (the symmetric square root) for every row of ``vectors`` ``[Q, P]``."""

    def solve(self, rhs: Tensor) -> SolveResult:
        return SolveResult(self.apply(rhs), [])

    def quadratic(self, grads: Tensor) -> tuple[Tensor, List[Diagnostic]]:
        """``‖(Ĥ + λI)^{-1/2} g_i‖²`` per row: no solve, one application."""
        return self.apply_inverse_sqrt(grads).square().sum(dim=1), []


@dataclass(frozen=True)
class SolverSettings(ABC):
    """Base of every solver's settings. Subclasses are frozen dataclasses with ``name`` set."""

    name: ClassVar[str] = ""
    #: whether :meth:`fit` returns a :class:`FactoredInverse` (usable as a preconditioner)
    factored: ClassVar[bool] = False
    #: whether :meth:`fit` returns a low-rank inverse of ``H`` itself from a Krylov space: it estimates
    #: ``H``'s extreme eigenvalues on the way (resolving the damping and checking the curvature with them)
    #: and needs ``λ > 0`` on its complement
    low_rank: ClassVar[bool] = False

    @abstractmethod
    def fit(self, problem: "InfluenceProblem", damping: DampingSpec) -> InverseHVP:
        """Fit ``(H + λI)⁻¹`` to ``problem``. ``damping``: a fixed ``λ ≥ 0`` (Hessian units), or an
        :class:`~lightning_influence.damping.AutoDamping` that the solver resolves by its own rule."""

    def check_size(self, num_params: int, dtype: torch.dtype) -> None:
        """Raise :class:`~lightning_influence.errors.InfluenceConfigError` if ``num_params`` attributed
        parameters in ``dtype`` are too many for this solver. Cheap: run before any pass over the data
        (the callback runs it before training). Default: no limit."""

    def to_dict(self) -> Dict[str, Any]:
        """Settings as a flat dict (JSON-serialisable), including the solver's name."""
        out: Dict[str, Any] = {"solver": self.name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, SolverSettings) else v
        return out


def damping_and_preconditioner(
    problem: "InfluenceProblem", damping: DampingSpec, preconditioner: Union[str, SolverSettings, None]
) -> Tuple["DampingChoice", Optional[FactoredInverse]]:
    """The damping of a Hessian-vector-product solver (LiSSA, CG) and its fitted preconditioner.

    A preconditioner that estimates the Hessian's spectrum itself (Arnoldi's Krylov space) is fitted
    first with the same damping argument: it applies the same rule (:meth:`AutoDamping.choose` on the
    extreme Ritz values, or the fixed ``λ`` checked for negative curvature), and its estimates replace
    the solver's own Lanczos passes. Otherwise :func:`~lightning_influence.damping.hessian_damping` runs
    first and the preconditioner (e.g. EK-FAC, which sees the Fisher, not ``H``) is fitted at that ``λ``.
    The preconditioner's setup diagnostics are returned with the choice, prefixed ``preconditioner_``.
    """
    import time
    import warnings

    from ..damping import AutoDamping, DampingChoice, hessian_damping

    if preconditioner is None:
        return hessian_damping(problem, damping), None
    from . import resolve_solver

    settings = resolve_solver(preconditioner)
    t0 = time.perf_counter()
    pre: Optional[FactoredInverse] = None
    low_rank = settings.low_rank
    if low_rank and not isinstance(damping, AutoDamping) and float(damping) <= 0:
        # a low-rank inverse needs λ > 0 on its complement: no preconditioner, the plain solver's own checks
        choice = hessian_damping(problem, damping)
        note = Diagnostic("preconditioner", "none", "preconditioner",
                          f"{settings.name} was skipped: at damping λ = {float(damping):g} its complement (1/λ) is singular")
        return DampingChoice(choice.value, choice.spectrum, choice.record, choice.diagnostics + [note]), None
    if low_rank:  # sees H itself: let it resolve the damping and check the curvature
        try:
            with warnings.catch_warnings():  # a preconditioner needs no converged eigenpairs: any SPD P serves
                warnings.filterwarnings("ignore", message=".*before the .* kept Ritz pairs converged")
                pre = settings.fit(problem, damping)  # type: ignore[assignment]
        except NegativeCurvatureError as err:
            raise NegativeCurvatureError(f"(found by the {settings.name} preconditioner's Krylov space) {err}") from err
        assert isinstance(pre, FactoredInverse) and pre.spectrum is not None
        record = dict(pre.damping_record)
        shared = ("damping", "damping_mode", "damping_base", "lambda_min_estimate", "lambda_max_estimate")
        choice = DampingChoice(pre.damping, pre.spectrum, record, [d for d in pre.setup if d.name in shared])
    else:
        choice = hessian_damping(problem, damping)
        pre = settings.fit(problem, choice.value)  # type: ignore[assignment]
        assert isinstance(pre, FactoredInverse)
    seconds = time.perf_counter() - t0
    items = [d for d in choice.diagnostics] + [
        Diagnostic("preconditioner", settings.name, "preconditioner",
                   "factored approximation P ≈ H + λI fitted once; the solve is preconditioned by it"),
        Diagnostic("preconditioner_seconds", seconds, "preconditioner fit (s)", "seconds spent fitting it"),
    ] + [Diagnostic(f"preconditioner_{d.name}", d.value, f"preconditioner: {d.label}", d.meaning, d.reduce, d.kind)
         for d in pre.setup if d not in choice.diagnostics]
    return DampingChoice(choice.value, choice.spectrum, choice.record, items), pre


def check_preconditioner(owner: str, preconditioner: Union[str, SolverSettings, None]) -> None:
    """Raise :class:`~lightning_influence.errors.InfluenceConfigError` unless ``preconditioner`` is ``None`` or
    names (or is the settings of) a factored solver; ``owner`` names the settings class in the message."""
    if preconditioner is None:
        return
    from . import resolve_solver  # the registry imports the solver modules

    if not resolve_solver(preconditioner).factored:
        raise InfluenceConfigError(
            f"{owner}.preconditioner={preconditioner!r} must be None or a factored solver "
            '("ekfac", "kfac", "arnoldi" or its settings).'
        )


def check_finite(x: Tensor, what: str, step: int, history: Any = None, fix: str = "") -> None:
    """Raise :class:`SolverDivergedError` if ``x`` holds NaN or inf."""
    if not bool(torch.isfinite(x).all()):
        hist = f" Norm history: {history}." if history else ""
        raise SolverDivergedError(f"{what} became NaN/inf at step {step}.{hist} {fix}".strip())
