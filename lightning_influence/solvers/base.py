"""The one interface every inverse-HVP method implements, and the registry solvers join by subclassing.

A solver's *settings* are a frozen dataclass, validated on construction, serialisable into a logger's
config, and registered under its name by subclassing::

    @dataclass(frozen=True)
    class MySettings(SolverSettings, name="mine", kind=SolverKind.ITERATIVE):
        tol: float = 1e-6

        def build(self, problem, damping, curvature):
            return MySolver(problem, damping, self)

``resolve_solver("mine")`` then finds it, the callback and :func:`~lightning_influence.pipeline.compute_influence`
accept ``solver="mine"``, and the conformance tests (``tests/solvers/test_conformance.py``) run it.

Every solver is fitted in the same three steps (:meth:`SolverSettings.fit`, final):

1. :meth:`SolverSettings.estimate`: measure what does not depend on ``λ`` (a Lanczos run on ``H``, the
   dense Hessian, the Kronecker factors): a :class:`Curvature`;
2. the damping rule of the solver's kind (:attr:`SolverSettings.damping_rule`) turns the damping argument
   and that curvature into one :class:`~lightning_influence.curvature.damping.DampingChoice`: chosen once,
   before the inverse exists, and the only record of ``λ``;
3. :meth:`SolverSettings.build`: the :class:`InverseHVP` at that ``λ``, which solves ``(H + λI) X = V`` for
   a batch of right-hand sides ``V [Q, P]``.

Solvers see only tensors and the :class:`~lightning_influence.problem.InfluenceProblem`; never a Trainer,
a device choice, a logger or the communicator (passes over the training set are declared sums of the
problem). A preconditioner is composition (:class:`~lightning_influence.solvers.preconditioned.Preconditioned`),
so no solver imports another.

Example:
    >>> from lightning_influence.solvers import resolve_solver, solver_names
    >>> solver_names()
    ['arnoldi', 'auto', 'cg', 'ekfac', 'exact', 'kfac', 'lissa']
    >>> resolve_solver("cg").kind.value, resolve_solver("ekfac").kind.closed_form
    ('iterative', True)

Kinds (:class:`SolverKind`) say what a solver inverts and what it costs:

* ``iterative`` (LiSSA, CG): each :meth:`InverseHVP.solve` runs Hessian-vector products; self-influence
  solves every training gradient as a right-hand side;
* ``direct`` (exact): an explicit factorisation; solves are cheap, the fit is ``P`` HVP sweeps;
* ``low_rank`` (Arnoldi) and ``factored`` (EK-FAC, K-FAC): a :class:`FactoredInverse` held in closed form
  that applies to any ``[Q, P]`` block at the cost of a few small matrix products, gives
  ``gᵀ(Ĥ + λI)⁻¹g`` for a batch of training gradients in the scoring pass, and serves as a
  preconditioner. ``low_rank`` inverts ``H`` on a Krylov subspace; ``factored`` a Fisher approximation.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional, Tuple, Type, Union

import torch
from torch import Tensor

from ..curvature.damping import (AutoDamping, DampingChoice, DampingRule, DampingSpec, FactoredRule, Spectrum,
                                 SpectrumRule, resolve_damping)
from ..diagnostics import Diagnostic
from ..errors import InfluenceConfigError, SolverDivergedError
from ..functional import nonfinite_rows

if TYPE_CHECKING:  # pragma: no cover
    from ..problem import InfluenceProblem

__all__ = ["Curvature", "DampingSpec", "FactoredInverse", "InverseHVP", "SolveResult", "SolverKind", "SolverSettings",
           "check_finite", "registered_solvers", "resolve_solver", "solver_names"]


class SolverKind(str, enum.Enum):
    """What a solver inverts and how its cost grows (see the module docstring)."""

    ITERATIVE = "iterative"
    DIRECT = "direct"
    LOW_RANK = "low_rank"
    FACTORED = "factored"
    #: picks one of the others per problem (``solver="auto"``)
    AUTO = "auto"

    @property
    def closed_form(self) -> bool:
        """Whether the fitted inverse is a :class:`FactoredInverse`: applied in closed form, self-influence
        in the scoring pass, usable as a preconditioner."""
        return self in (SolverKind.LOW_RANK, SolverKind.FACTORED)

    @property
    def sees_hessian(self) -> bool:
        """Whether it inverts ``H`` (or a subspace of it) rather than a Fisher approximation."""
        return self is not SolverKind.FACTORED

    def self_influence_cost(self, name: str) -> str:
        """One line on what ``self_influence=True`` costs with a solver of this kind."""
        if self is SolverKind.ITERATIVE:
            return (f"self_influence=True with solver={name!r} solves every training example's gradient as a "
                    "right-hand side: usually the largest part of the influence computation. A closed-form solver "
                    f"({', '.join(repr(n) for n in solver_names(closed_form=True))}) computes self-influence in the "
                    "scoring pass at almost no extra cost.")
        if self is SolverKind.DIRECT:
            return f"self_influence=True with solver={name!r} applies its factorisation to every training gradient."
        if self is SolverKind.AUTO:
            return (f"self_influence=True with solver={name!r}: the cost depends on the solver it picks (it is logged "
                    "when influence runs).")
        return f"self_influence=True with solver={name!r} is computed in the scoring pass at almost no extra cost."


_REGISTRY: Dict[str, Type["SolverSettings"]] = {}


@dataclass
class SolveResult:
    """``solution`` ``[Q, P]`` ≈ ``(H + λI)⁻¹ V``, with typed diagnostics for this chunk of queries."""

    solution: Tensor
    diagnostics: List[Diagnostic] = field(default_factory=list)


@dataclass
class Curvature:
    """What a solver measured before its damping was chosen (independent of ``λ``).

    Attributes:
        spectrum: extreme eigenvalues (and for a factored approximation the mean) of the matrix the solver
            inverts, read by its damping rule; ``None`` when none was needed.
        state: the solver's own measurement, handed to its :meth:`SolverSettings.build` (a Lanczos run, the
            dense Hessian, Kronecker factors).
        preconditioner: a fitted :class:`FactoredInverse` for an iterative solver
            (:class:`~lightning_influence.solvers.preconditioned.Preconditioned` sets it).
        diagnostics: what the measurement cost and found, kept with the inverse's setup diagnostics.
    """

    spectrum: Optional[Spectrum] = None
    state: Any = None
    preconditioner: Optional["FactoredInverse"] = None
    diagnostics: List[Diagnostic] = field(default_factory=list)


class InverseHVP(ABC):
    """``(H + λI)⁻¹`` fitted to one problem.

    Attributes:
        choice: the :class:`~lightning_influence.curvature.damping.DampingChoice` (``λ`` and how it was
            chosen).
        setup: diagnostics of the fit (spectral estimates, costs), as data.
        facts: what the solver used that the results record should say (e.g. ``{"fisher": "sampled"}``).
        hvp_calls: batched Hessian-vector products spent so far (fit and solves).
    """

    def __init__(self, problem: "InfluenceProblem", damping: Union[float, DampingChoice]) -> None:
        self.problem = problem
        self.choice = damping if isinstance(damping, DampingChoice) else DampingChoice(float(damping), "fixed")
        self.setup: List[Diagnostic] = []
        self.facts: Dict[str, Any] = {}

    @property
    def damping(self) -> float:
        """``λ`` (Hessian units)."""
        return float(self.choice.value)

    @property
    def damping_record(self) -> Dict[str, Any]:
        """How ``λ`` was chosen, as the flat keys of the results' settings (``damping``, ``damping_mode``, …)."""
        return self.choice.flat()

    @property
    def hvp_calls(self) -> int:
        op = self.problem.__dict__.get("operator")  # only if built
        return int(op.hvp_calls) if op is not None else 0

    @abstractmethod
    def solve(self, rhs: Tensor) -> SolveResult:
        """Return ``(H + λI)⁻¹ rhs`` for every row of ``rhs`` ``[Q, P]``."""

    def quadratic(self, grads: Tensor) -> Tuple[Tensor, List[Diagnostic]]:
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
    eigendecomposition), symmetric positive definite."""

    @abstractmethod
    def apply(self, vectors: Tensor) -> Tensor:
        """``(Ĥ + λI)⁻¹ V`` for every row of ``vectors`` ``[Q, P]``."""

    @abstractmethod
    def apply_inverse_sqrt(self, vectors: Tensor) -> Tensor:
        """``(Ĥ + λI)^{-1/2} V`` (the symmetric square root) for every row of ``vectors`` ``[Q, P]``."""

    def solve(self, rhs: Tensor) -> SolveResult:
        return SolveResult(self.apply(rhs), [])

    def quadratic(self, grads: Tensor) -> Tuple[Tensor, List[Diagnostic]]:
        """``‖(Ĥ + λI)^{-1/2} g_i‖²`` per row: no solve, one application."""
        return self.apply_inverse_sqrt(grads).square().sum(dim=1), []


@dataclass(frozen=True)
class SolverSettings(ABC):
    """Base of every solver's settings: frozen dataclasses, registered by subclassing with ``name=`` and
    ``kind=`` (see the module docstring)."""

    name: ClassVar[str] = ""
    kind: ClassVar[SolverKind] = SolverKind.ITERATIVE

    def __init_subclass__(cls, name: Optional[str] = None, kind: Optional[Union[SolverKind, str]] = None,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if kind is not None:
            cls.kind = SolverKind(kind)
        if name is not None:
            if name in _REGISTRY and _REGISTRY[name].__qualname__ != cls.__qualname__:
                raise TypeError(f"solver name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
            cls.name = name
            _REGISTRY[name] = cls

    # ------------------------------------------------------------------ the one fitting shape
    def fit(self, problem: "InfluenceProblem", damping: Union[float, str, AutoDamping] = "auto") -> InverseHVP:
        """Fit ``(H + λI)⁻¹`` to ``problem``: :meth:`estimate`, then the damping rule (once), then
        :meth:`build`. ``damping``: a fixed ``λ ≥ 0`` (Hessian units), ``"auto"`` or an
        :class:`~lightning_influence.curvature.damping.AutoDamping`."""
        plan = self.composed()
        if plan is not self:
            return plan.fit(problem, damping)
        spec = resolve_damping(damping)
        self.check_size(problem.num_params, problem.dtype)  # before any pass over the data
        curvature = self.estimate(problem, spec)
        choice = self.damping_rule.choose(spec, curvature.spectrum, self.name)
        inverse = self.build(problem, choice, curvature)  # keeps ``choice`` (or the rule's refinement of it)
        inverse.setup = list(curvature.diagnostics) + inverse.setup
        return inverse

    def estimate(self, problem: "InfluenceProblem", damping: DampingSpec) -> Curvature:
        """Step 1: what the damping rule needs, measured before ``λ`` is known. Default (solvers that
        invert ``H``): for automatic damping, Lanczos on the Hessian (``AutoDamping.iters`` full-data
        products on at most ``AutoDamping.max_examples`` examples); nothing for a fixed damping."""
        if isinstance(damping, AutoDamping):
            return hessian_curvature(problem, damping.iters, damping.seed, damping.max_examples, damping.settled)
        return Curvature()

    @property
    def damping_rule(self) -> DampingRule:
        """The rule that turns ``"auto"`` into ``λ`` (and checks a fixed ``λ``) for this solver."""
        return SpectrumRule() if self.kind.sees_hessian else FactoredRule()

    @abstractmethod
    def build(self, problem: "InfluenceProblem", damping: DampingChoice, curvature: Curvature) -> InverseHVP:
        """Step 3: the inverse at the chosen damping, from the curvature of step 1."""

    def composed(self) -> "SolverSettings":
        """The settings actually fitted: ``self``, or a composition (an iterative solver with a
        ``preconditioner`` becomes ``Preconditioned(self without it, by=that preconditioner)``)."""
        pre = getattr(self, "preconditioner", None)
        if pre is None:
            return self
        from .preconditioned import Preconditioned

        return Preconditioned(dataclasses.replace(self, preconditioner=None), resolve_solver(pre, preconditioner=True))

    def check_size(self, num_params: int, dtype: torch.dtype) -> None:
        """Raise :class:`~lightning_influence.errors.InfluenceConfigError` if ``num_params`` attributed
        parameters in ``dtype`` are too many for this solver. Cheap: run before any pass over the data
        (the callback runs it before training). Default: no limit."""

    @classmethod
    def as_preconditioner(cls) -> "SolverSettings":
        """The settings used when this solver is named as another's preconditioner (``preconditioner=
        "arnoldi"``): by default its defaults; a solver may tune them for that role."""
        return cls()

    def for_preconditioning(self) -> "SolverSettings":
        """These settings as another solver's preconditioner uses them (default: unchanged; K-FAC/EK-FAC keep
        one calibration scale, so that the preconditioner stays positive definite)."""
        return self

    def to_dict(self) -> Dict[str, Any]:
        """Settings as a flat, JSON-serialisable dict, including the solver's name and kind."""
        out: Dict[str, Any] = {"solver": self.name, "kind": self.kind.value}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, SolverSettings) else v
        json.dumps(out)  # raises for a field that is not plain data
        return out


def registered_solvers() -> Dict[str, Type[SolverSettings]]:
    """``{name: settings class}`` of every registered solver (the built-in ones register when the package
    ``lightning_influence.solvers`` is imported, which importing this module does first)."""
    return dict(_REGISTRY)


def solver_names(closed_form: Optional[bool] = None) -> List[str]:
    """The registered solver names (sorted), optionally only the closed-form (or only the other) ones."""
    return sorted(n for n, c in registered_solvers().items() if closed_form is None or c.kind.closed_form == closed_form)


def resolve_solver(solver: Union[str, SolverSettings], preconditioner: bool = False) -> SolverSettings:
    """Settings from a registered solver name (its defaults; :meth:`SolverSettings.as_preconditioner`'s
    with ``preconditioner=True``) or a settings object.

    Raises:
        InfluenceConfigError: an unknown name, naming the registered ones.
    """
    if isinstance(solver, SolverSettings):
        return solver
    known = registered_solvers()
    if isinstance(solver, str) and solver in known:
        return known[solver].as_preconditioner() if preconditioner else known[solver]()
    what = "preconditioner" if preconditioner else "solver"
    raise InfluenceConfigError(
        f"{what}={solver!r} is not a known solver; use one of {sorted(known)} or a settings object such as "
        "LissaSettings(depth=..., scale=...)."
    )


def hessian_curvature(problem: "InfluenceProblem", iters: int, seed: int, max_examples: Optional[int],
                      stop: Any = None) -> Curvature:
    """A Lanczos estimate of ``H``'s extreme eigenvalues as a :class:`Curvature` (the run in ``state``;
    ``stop(lo, hi)``: an early stop, e.g. :meth:`AutoDamping.settled`)."""
    from ..curvature.damping import estimate_spectrum

    krylov = estimate_spectrum(problem, iters, seed, max_examples, stop)
    sp = krylov.spectrum
    seen = f" on {sp.examples} of {problem.num_examples} examples" if sp.examples is not None else ""
    return Curvature(sp, krylov, diagnostics=[
        Diagnostic("spectrum_passes", sp.passes, "Lanczos passes (spectrum)",
                   f"full-data Hessian-vector products spent estimating λ_min(H) and λ_max(H){seen}")])


def check_finite(x: Tensor, what: str, step: int, history: Any = None, fix: str = "") -> None:
    """Raise :class:`SolverDivergedError` if ``x`` holds NaN or inf."""
    if bool(nonfinite_rows(x.reshape(1, -1)).any()):
        hist = f" Norm history: {history}." if history else ""
        raise SolverDivergedError(f"{what} became NaN/inf at step {step}.{hist} {fix}".strip())
