"""``solver="auto"``: the solver picked from the problem, by a rule measured on this package's benchmarks.

What decides (:func:`choose_solver`, the rule; ``benchmarks/README.md`` has the measurements behind it):

1. **No exact Hessian-vector product.** When the model's second derivatives exist only as finite
   differences (the probe of :mod:`~lightning_influence.autodiff` found none exact), ``"ekfac"``: it needs
   per-example gradients only.
2. **Small models: the explicit Hessian.** ``P ≤ exact_params`` (1,000) attributed parameters (and its
   ``P × P`` Hessian within ``memory_bytes``): ``"exact"`` forms ``H`` with ``P`` Hessian-vector products per
   training example and solves every query (and self-influence) by one factorisation, to round-off.
   Measured on the zoo (``benchmarks/bench_zoo.py``, 8 queries): at 650 parameters exact and CG take the
   same 0.4 s; at 1,810 (tanh MLP) exact takes 3.0 s against CG's 1.3 s, at 1,946 (BatchNorm CNN) 96 s
   against 22 s. Larger models, up to the explicit solver's size limit, get it too when forming ``H`` (``P``
   full-data products) costs less than the iterative solve would (:func:`cg_products`: per right-hand side
   :data:`HVPS_PER_SOLVE` products, or :data:`HVPS_PER_PRECONDITIONED_SOLVE` plus the preconditioner's
   :data:`PRECONDITIONER_PRODUCTS` once; the right-hand sides are the queries, plus every training example
   with self-influence), e.g. the digits demo's 4,810-parameter MLP with self-influence of 1,347 examples.
3. **Every other model trained on up to** ``full_pass_examples`` **examples: conjugate gradient on full-data
   products**, batched over the queries, never stochastic: ``"cg"``; with many right-hand sides
   (``Q ≥ precondition_queries``, or self-influence) preconditioned by the low-rank Arnoldi approximation of
   ``H`` (its Lanczos passes then cost less than the CG iterations they save). Its tolerance is
   ``cg_tol = 1e-3`` (relative residual), not ``CGSettings``' 1e-6: on every zoo family (11 models, 8
   queries, float32 against CG to 1e-10 in float64) 1e-3 kept the per-query Pearson at ≥ 0.99997 (minimum
   over queries and models) with half the iterations (plain: 12-115 against 24-221; preconditioned: 1-36
   against 5-73), and on a 50,698-parameter MLP with 100 queries 7 preconditioned iterations against 16
   (Pearson 0.999999). At 1e-2 the minimum fell to 0.993 (regression MLP). The cost of CG grows with the
   number of right-hand sides (each iteration is one full-data product per query); with thousands of
   queries the closed-form solvers (``"arnoldi"``, ``"ekfac"``: one fit, then a cheap application per
   query) are many times faster at lower accuracy, and the reason says so.
4. **More training examples: LiSSA** (``"lissa"``, preconditioned by Arnoldi on at most 4,096 of them),
   whose steps cost a minibatch, not a pass over the whole set.

Self-influence (``self_influence=True``) with an iterative solver solves every training gradient as a
right-hand side; the rule accounts for it by preconditioning (step 3). ``res.settings["auto_choice"]``
records the choice and ``res.settings["auto_reason"]`` the rule that made it; the callback logs both in one
line. An explicit ``solver=`` always wins.

Example:
    >>> choose_solver(num_params=650, num_examples=1347, num_queries=10).name
    'exact'
    >>> pick = choose_solver(num_params=21546, num_examples=1347, num_queries=10)
    >>> pick.name, pick.settings.preconditioner
    ('cg', None)
    >>> choose_solver(num_params=21546, num_examples=1347, num_queries=100).settings.preconditioner
    'arnoldi'
    >>> choose_solver(num_params=4810, num_examples=1347, num_queries=8, self_influence=True).name
    'exact'
    >>> choose_solver(num_params=21546, num_examples=200_000, num_queries=10).name
    'lissa'
    >>> choose_solver(num_params=10**6, num_examples=10**4, num_queries=10, exact_hvp=False).name
    'ekfac'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch

from ..checks import is_int, is_real
from ..curvature.damping import DampingChoice, DampingSpec
from ..errors import InfluenceConfigError
from .base import Curvature, InverseHVP, SolverKind, SolverSettings, resolve_solver

if TYPE_CHECKING:  # pragma: no cover
    from ..problem import InfluenceProblem

__all__ = ["AutoSettings", "Choice", "HVPS_PER_PRECONDITIONED_SOLVE", "HVPS_PER_SOLVE", "PRECONDITIONER_PRODUCTS",
           "choose_solver", "cg_products"]

#: full-data Hessian-vector products plain CG spends per right-hand side at ``cg_tol = 1e-3`` (its iterations
#: on the zoo: 12-115, median 34); the explicit Hessian costs ``P`` of them for any number of right-hand sides
HVPS_PER_SOLVE = 32
#: the same with the Arnoldi preconditioner (its iterations on the zoo at 1e-3: 1-36, median 3)
HVPS_PER_PRECONDITIONED_SOLVE = 6
#: the Arnoldi preconditioner's Lanczos passes, in batched-product units (75-200 single-vector passes, each
#: about twice a batched product's time per vector on the 50k-parameter MLP: 49 ms against 27 ms)
PRECONDITIONER_PRODUCTS = 300
#: right-hand sides from which the reason points to the closed-form solvers (CG then costs thousands of passes)
MANY_SOLVES = 1_000


def cg_products(solves: int, preconditioned: bool) -> int:
    """Full-data Hessian-vector products (one right-hand side each) CG is expected to spend on ``solves``
    right-hand sides: ``HVPS_PER_SOLVE · solves`` plain, ``PRECONDITIONER_PRODUCTS + HVPS_PER_PRECONDITIONED_SOLVE ·
    solves`` preconditioned."""
    if preconditioned:
        return PRECONDITIONER_PRODUCTS + HVPS_PER_PRECONDITIONED_SOLVE * solves
    return HVPS_PER_SOLVE * solves


@dataclass(frozen=True)
class Choice:
    """The solver the rule picked and why."""

    settings: SolverSettings
    reason: str

    @property
    def name(self) -> str:
        return self.settings.name

    def describe(self) -> str:
        """``"cg preconditioned by arnoldi: <why>"``: one line for the logs."""
        pre = getattr(self.settings, "preconditioner", None)
        head = self.name + (f" preconditioned by {pre if isinstance(pre, str) else pre.name}" if pre else "")
        return f"{head} ({self.reason})"


def choose_solver(num_params: int, num_examples: int, num_queries: int, *, self_influence: bool = False,
                  exact_hvp: bool = True, dtype: torch.dtype = torch.float32, exact_params: int = 1_000,
                  full_pass_examples: int = 50_000, precondition_queries: int = 32,
                  memory_bytes: int = 2 * 2**30, cg_tol: float = 1e-3) -> Choice:
    """The rule of the module docstring, for ``P`` parameters, ``n`` training examples and ``Q`` queries."""
    from .cg import CGSettings
    from .ekfac import EKFACSettings
    from .exact import ExactSettings
    from .lissa import LissaSettings

    if not exact_hvp:
        return Choice(EKFACSettings(), "the model has no exact Hessian-vector products (finite differences only); "
                                       "EK-FAC needs per-example gradients only")
    itemsize = torch.empty((), dtype=dtype).element_size()
    fits = num_params <= ExactSettings().max_params and 3 * num_params**2 * itemsize <= memory_bytes
    if fits and num_params <= exact_params:
        return Choice(ExactSettings(), f"P = {num_params:,} ≤ {exact_params:,}: the explicit Hessian, solved to "
                                       "round-off")
    solves = num_queries + (num_examples if self_influence else 0)
    many = num_queries >= precondition_queries or self_influence
    products = cg_products(solves, many)
    if fits and num_params <= products:
        what = f"{num_queries} queries" + (f" and {num_examples:,} self-influence solves" if self_influence else "")
        return Choice(ExactSettings(), f"P = {num_params:,} HVPs form the explicit Hessian, fewer than the ≈ "
                                       f"{products:,} conjugate gradient would spend for {what}")
    if num_examples <= full_pass_examples:
        why = (f"n = {num_examples:,} ≤ {full_pass_examples:,}: conjugate gradient on full-data products, to a "
               f"relative residual of {cg_tol:g}")
        if solves >= MANY_SOLVES:
            why += (f"; ≈ {products:,} full-data products for {solves:,} right-hand sides: solver='arnoldi' or "
                    "'ekfac' is many times faster at lower accuracy")
        if many:
            what = "self-influence" if self_influence else f"Q = {num_queries} ≥ {precondition_queries}"
            return Choice(CGSettings(tol=cg_tol, preconditioner="arnoldi"), f"{why}; {what}: preconditioned by Arnoldi")
        return Choice(CGSettings(tol=cg_tol), why)
    return Choice(LissaSettings(), f"n = {num_examples:,} > {full_pass_examples:,}: LiSSA's steps cost a minibatch, "
                                   "not a pass over the training set")


@dataclass(frozen=True)
class AutoSettings(SolverSettings, name="auto", kind=SolverKind.AUTO):
    """``solver="auto"`` (the default): a registered solver chosen by :func:`choose_solver` from the problem.

    Args:
        exact_params: largest ``P`` for the explicit Hessian.
        full_pass_examples: largest ``n`` for conjugate gradient on full-data products (beyond: LiSSA).
        precondition_queries: ``Q`` from which CG is preconditioned by Arnoldi.
        memory_bytes: memory the explicit Hessian may take (three ``P × P`` copies while factorising).
        cg_tol: relative residual at which the chosen conjugate gradient stops (module docstring, rule 3).
    """

    exact_params: int = 1_000
    full_pass_examples: int = 50_000
    precondition_queries: int = 32
    memory_bytes: int = 2 * 2**30
    cg_tol: float = 1e-3

    def __post_init__(self) -> None:
        for arg in ("exact_params", "full_pass_examples", "precondition_queries", "memory_bytes"):
            v = getattr(self, arg)
            if not (is_int(v) and v >= 0):
                raise InfluenceConfigError(f"AutoSettings.{arg}={v!r} must be an integer ≥ 0.")
        if not (is_real(self.cg_tol) and 0 < self.cg_tol < 1):
            raise InfluenceConfigError(f"AutoSettings.cg_tol={self.cg_tol!r} must be a number in (0, 1), e.g. 1e-3.")

    def choose(self, problem: "InfluenceProblem", num_queries: int = 16, self_influence: bool = False) -> Choice:
        """The choice for ``problem`` (its sizes, and whether its differentiation has exact HVPs)."""
        plan = problem.objective.differentiation
        return choose_solver(problem.num_params, problem.num_examples, num_queries, self_influence=self_influence,
                             exact_hvp=plan.hvp is not None and plan.exact, dtype=problem.dtype,
                             exact_params=self.exact_params, full_pass_examples=self.full_pass_examples,
                             precondition_queries=self.precondition_queries, memory_bytes=self.memory_bytes,
                             cg_tol=self.cg_tol)

    def fit(self, problem: "InfluenceProblem", damping: Any = "auto") -> InverseHVP:
        """Fit the solver :meth:`choose` picks for 16 queries without self-influence; the pipeline asks
        :meth:`choose` itself with the run's numbers and fits that choice."""
        return self.choose(problem).settings.fit(problem, damping)

    def estimate(self, problem: "InfluenceProblem", damping: DampingSpec) -> Curvature:  # pragma: no cover
        raise InfluenceConfigError("AutoSettings picks another solver; fit that one (AutoSettings.choose).")

    def build(self, problem: "InfluenceProblem", damping: DampingChoice, curvature: Curvature) -> InverseHVP:  # pragma: no cover
        raise InfluenceConfigError("AutoSettings picks another solver; fit that one (AutoSettings.choose).")


def is_auto(solver: Any) -> bool:
    """Whether ``solver`` asks for the automatic choice."""
    return isinstance(solver, AutoSettings) or solver == "auto"


def chosen(solver: Any, problem: "InfluenceProblem", num_queries: int, self_influence: bool) -> Optional[Choice]:
    """The automatic choice for ``solver="auto"`` (or an :class:`AutoSettings`), else ``None``."""
    if not is_auto(solver):
        return None
    settings = resolve_solver(solver)
    assert isinstance(settings, AutoSettings)
    return settings.choose(problem, num_queries, self_influence)


def record_of(choice: Optional[Choice]) -> Dict[str, Any]:
    """What the results record says of an automatic choice (empty for an explicit solver)."""
    return {} if choice is None else {"auto_choice": choice.name, "auto_reason": choice.describe()}
