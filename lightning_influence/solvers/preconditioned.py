"""Preconditioning as composition: ``Preconditioned(inner, by)`` fits the closed-form solver ``by`` at the
inner solver's damping and hands its inverse to ``inner`` (LiSSA, CG), so no solver imports another.

``LissaSettings(preconditioner="arnoldi")`` and ``CGSettings(preconditioner=EKFACSettings())`` are this
composition written as a setting (:meth:`~lightning_influence.solvers.base.SolverSettings.composed`).

Sharing the curvature estimate: a low-rank preconditioner (Arnoldi) runs Lanczos on ``H`` itself, so its
first Lanczos steps also give the extreme eigenvalues the damping rule needs. The composition then asks
``by`` for the estimate (one Krylov space for the damping, the curvature check and the preconditioner: no
separate spectrum pass), and ``by`` extends that same Lanczos run when it is built. A Fisher
approximation (EK-FAC, K-FAC) does not see ``H``: the inner solver's own estimate serves the damping, and
``by`` is fitted afterwards at the chosen ``λ``.

The preconditioner's diagnostics keep their names, with ``source="preconditioner"``
(``preconditioner/rank`` in the logs).

Example:
    >>> from lightning_influence import ArnoldiSettings, LissaSettings
    >>> p = Preconditioned(LissaSettings(preconditioner=None), by=ArnoldiSettings(max_rank=20))
    >>> p.name, p.to_dict()["preconditioner"]["solver"]
    ('lissa', 'arnoldi')
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict

from ..curvature.damping import DampingChoice, DampingRule, DampingSpec
from ..diagnostics import Diagnostic
from ..errors import InfluenceConfigError, NegativeCurvatureError
from .base import Curvature, FactoredInverse, InverseHVP, SolverKind, SolverSettings

if TYPE_CHECKING:  # pragma: no cover
    from ..problem import InfluenceProblem

__all__ = ["Preconditioned", "check_preconditioner"]

_SOURCE = "preconditioner"

#: inner solvers whose steps grow like the condition number κ of the preconditioned system (LiSSA's
#: Neumann recursion), not like √κ (CG): a named low-rank preconditioner keeps growing its Krylov space to
#: its convergence rule or cap for them, without the early stop on a small gain in κ (``gain_tol``).
#: Measured on the digits demo's MLP (``benchmarks/bench_lanczos.py``): with the gain stop at 75 Lanczos
#: passes LiSSA's solve took 2.4 s against 1.3 s after 200 passes, a net loss; CG's 0.5 s either way.
_STEPS_GROW_WITH_KAPPA = ("lissa",)


def check_preconditioner(owner: str, preconditioner: Any) -> None:
    """Raise :class:`~lightning_influence.errors.InfluenceConfigError` unless ``preconditioner`` is ``None``
    or names (or is the settings of) a closed-form solver; ``owner`` names the settings class."""
    if preconditioner is None:
        return
    from .base import resolve_solver, solver_names

    try:
        by = resolve_solver(preconditioner, preconditioner=True)
    except InfluenceConfigError:
        by = None
    if by is None or not by.kind.closed_form:
        names = ", ".join(repr(n) for n in solver_names(closed_form=True))
        raise InfluenceConfigError(
            f"{owner}.preconditioner={preconditioner!r} must be None or a closed-form solver ({names}, or its "
            "settings object)."
        )


@dataclass(frozen=True)
class _SharedRule(DampingRule):
    """The inner solver's rule reading the preconditioner's Krylov space: its errors say where it looked."""

    rule: DampingRule
    by: str

    def choose(self, spec: DampingSpec, spectrum: Any, solver: str = "") -> DampingChoice:
        try:
            return self.rule.choose(spec, spectrum, solver)
        except NegativeCurvatureError as err:
            raise NegativeCurvatureError(f"(found by the {self.by} preconditioner's Krylov space) {err}") from err


@dataclass(frozen=True)
class Preconditioned(SolverSettings):
    """``inner`` (an iterative solver) preconditioned by the closed-form solver ``by``."""

    inner: SolverSettings
    by: SolverSettings

    def __post_init__(self) -> None:
        if not isinstance(self.by, SolverSettings):  # a name: checked, then its settings as a preconditioner
            check_preconditioner(type(self.inner).__name__, self.by)
            from .base import resolve_solver

            object.__setattr__(self, "by", resolve_solver(self.by, preconditioner=True))
        if (self.inner.name in _STEPS_GROW_WITH_KAPPA and getattr(self.by, "gain_tol", None) is not None
                and self.by == type(self.by).as_preconditioner()):  # the named default ("arnoldi")
            object.__setattr__(self, "by", dataclasses.replace(self.by, gain_tol=None))
        if not self.by.kind.closed_form:
            check_preconditioner(type(self.inner).__name__, self.by)
        if getattr(self.inner, "preconditioner", None) is not None:
            raise InfluenceConfigError("Preconditioned(inner=...) takes the inner solver without a preconditioner.")

    @property  # type: ignore[override]
    def name(self) -> str:
        return self.inner.name

    @property  # type: ignore[override]
    def kind(self) -> SolverKind:
        return self.inner.kind

    @property
    def damping_rule(self) -> DampingRule:
        return _SharedRule(self.inner.damping_rule, self.by.name) if self._shares_krylov else self.inner.damping_rule

    @property
    def _shares_krylov(self) -> bool:
        return self.by.kind is SolverKind.LOW_RANK

    def check_size(self, num_params: int, dtype: Any) -> None:
        self.inner.check_size(num_params, dtype)
        self.by.check_size(num_params, dtype)

    def estimate(self, problem: "InfluenceProblem", damping: DampingSpec) -> Curvature:
        if not self._shares_krylov:
            return self.inner.estimate(problem, damping)
        try:
            cur = self.by.estimate(problem, damping)
        except NegativeCurvatureError as err:
            raise NegativeCurvatureError(f"(found by the {self.by.name} preconditioner's Krylov space) {err}") from err
        return Curvature(cur.spectrum, state=cur, diagnostics=[d.from_source(_SOURCE) for d in cur.diagnostics])

    def build(self, problem: "InfluenceProblem", damping: DampingChoice, curvature: Curvature) -> InverseHVP:
        t0 = time.perf_counter()
        notes = []
        pre = None
        if self._shares_krylov and damping.value <= 0:
            # a low-rank inverse needs λ > 0 on its complement: the plain solver, its own checks
            notes.append(Diagnostic("preconditioner", "none", "preconditioner",
                                    f"{self.by.name} was skipped: at damping λ = {damping.value:g} its complement (1/λ) is "
                                    "singular"))
        else:
            with warnings.catch_warnings():  # a preconditioner needs no converged eigenpairs: any SPD P serves
                warnings.filterwarnings("ignore", message=".*before the .* kept Ritz pairs converged")
                try:
                    if self._shares_krylov:
                        pre = self.by.build(problem, damping, curvature.state)
                    else:
                        at = DampingChoice(damping.value, "fixed", "fixed", f"the {self.inner.name} damping")
                        by = self.by.for_preconditioning()
                        by_cur = by.estimate(problem, damping.value)
                        pre = by.build(problem, by.damping_rule.choose(damping.value, by_cur.spectrum, by.name)
                                       if by_cur.spectrum is not None else at, by_cur)
                        pre.setup = list(by_cur.diagnostics) + pre.setup
                except NegativeCurvatureError as err:
                    raise NegativeCurvatureError(f"(found by the {self.by.name} preconditioner) {err}") from err
            if not isinstance(pre, FactoredInverse):  # pragma: no cover - closed_form kinds return one
                raise InfluenceConfigError(f"preconditioner {self.by.name!r} did not return a closed-form inverse.")
            damping = pre.choice if self._shares_krylov else damping
            notes.append(Diagnostic("preconditioner", self.by.name, "preconditioner",
                                    "closed-form approximation P ≈ H + λI fitted once; the solve is preconditioned by it"))
            notes.append(Diagnostic("preconditioner_seconds", time.perf_counter() - t0, "preconditioner fit (s)",
                                    "seconds spent fitting the preconditioner", reduce="sum"))
            notes += [d.from_source(_SOURCE) for d in pre.setup if not self._shares_krylov or d not in
                      curvature.state.diagnostics]
        inner_curvature = Curvature(curvature.spectrum, preconditioner=pre)
        inverse = self.inner.build(problem, damping, inner_curvature)
        inverse.setup = notes + inverse.setup
        inverse.facts.update({f"preconditioner_{k}": v for k, v in (pre.facts if pre is not None else {}).items()})
        return inverse

    def to_dict(self) -> Dict[str, Any]:
        out = self.inner.to_dict()
        out["preconditioner"] = self.by.to_dict()
        return out
