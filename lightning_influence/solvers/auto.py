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

5. **A time budget** (``time_budget``, seconds; the callback's default is the training run's own length, at
   least a minute): the Hessian solvers' cost is estimated before any pass (:func:`product_seconds` times
   two Hessian-vector products on a few training examples; the rule's products as above, plus
   :data:`DAMPING_PRODUCTS` for the automatic damping) and when it exceeds the budget ``"ekfac"`` is picked
   instead (a few passes of per-example gradients, then a closed-form solve per query: lower accuracy, a
   bounded cost), and the reason gives the estimate and how to insist (``solver="cg"``). On a 109k-parameter
   transformer trained on 4,000 sequences in 12 s, CG was estimated at 2,194 s and EK-FAC's whole influence
   phase took 22 s (``benchmarks/bench_phase.py``). LiSSA's cost (beyond ``full_pass_examples``) is not
   estimated.

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

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch

from ..checks import is_int, is_real
from ..curvature.damping import DampingChoice, DampingSpec
from ..curvature.operator import DENSE_BLOCK
from ..errors import InfluenceConfigError
from .base import Curvature, InverseHVP, SolverKind, SolverSettings, resolve_solver

if TYPE_CHECKING:  # pragma: no cover
    from ..problem import InfluenceProblem

__all__ = ["AutoSettings", "Choice", "DAMPING_PRODUCTS", "HVPS_PER_PRECONDITIONED_SOLVE", "HVPS_PER_SOLVE",
           "PRECONDITIONER_PRODUCTS", "choose_solver", "cg_products", "product_seconds"]

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
#: single-vector full-data products the automatic damping's Lanczos may spend (it stops when its damping has
#: settled: 20-60 passes on the zoo)
DAMPING_PRODUCTS = 60


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
                  memory_bytes: int = 2 * 2**30, cg_tol: float = 1e-3, time_budget: Optional[float] = None,
                  seconds_per_product: Optional[float] = None) -> Choice:
    """The rule of the module docstring, for ``P`` parameters, ``n`` training examples and ``Q`` queries.

    ``time_budget`` (seconds) applies rule 5 when ``seconds_per_product`` (one full-data Hessian-vector
    product with one right-hand side, :func:`product_seconds`) is given: an exact or CG choice whose
    estimated cost exceeds the budget becomes EK-FAC.

    Example:
        >>> choose_solver(21546, 1347, 10, time_budget=60.0, seconds_per_product=0.05).name
        'cg'
        >>> choose_solver(108883, 4000, 16, time_budget=60.0, seconds_per_product=4.0).name
        'ekfac'
    """
    choice, products = _rule(num_params, num_examples, num_queries, self_influence, exact_hvp, dtype, exact_params,
                             full_pass_examples, precondition_queries, memory_bytes, cg_tol)
    return _budgeted(choice, products, time_budget, seconds_per_product)


def _budgeted(choice: Choice, products: Optional[int], time_budget: Optional[float],
              seconds_per_product: Optional[float]) -> Choice:
    """Rule 5 on the choice of rules 1-4 that spends ``products`` full-data products (``None``: not estimated)."""
    if time_budget is None or seconds_per_product is None or products is None:
        return choice
    from .ekfac import EKFACSettings

    estimate = products * seconds_per_product
    if estimate <= time_budget:
        return Choice(choice.settings, f"{choice.reason}; estimated {estimate:,.0f} s, within the time budget of "
                                       f"{time_budget:,.0f} s")
    return Choice(EKFACSettings(), f"{choice.describe()} would take ≈ {estimate:,.0f} s ({products:,} full-data "
                                   f"Hessian-vector products at {seconds_per_product:.3g} s each), over the time "
                                   f"budget of {time_budget:,.0f} s: EK-FAC instead (a few passes of per-example "
                                   f"gradients; lower accuracy than {choice.name}). Pass solver='{choice.name}' for "
                                   "its scores, or a larger time_budget")


def _rule(num_params: int, num_examples: int, num_queries: int, self_influence: bool, exact_hvp: bool,
          dtype: torch.dtype, exact_params: int, full_pass_examples: int, precondition_queries: int,
          memory_bytes: int, cg_tol: float) -> "tuple[Choice, Optional[int]]":
    """Rules 1-4, and the single-vector full-data products the choice is expected to spend (``None``
    where it is not estimated: EK-FAC, LiSSA)."""
    from .cg import CGSettings
    from .ekfac import EKFACSettings
    from .exact import ExactSettings
    from .lissa import LissaSettings

    if not exact_hvp:
        return Choice(EKFACSettings(), "the model has no exact Hessian-vector products (finite differences only); "
                                       "EK-FAC needs per-example gradients only"), None
    itemsize = torch.empty((), dtype=dtype).element_size()
    fits = num_params <= ExactSettings().max_params and 3 * num_params**2 * itemsize <= memory_bytes
    if fits and num_params <= exact_params:
        return Choice(ExactSettings(), f"P = {num_params:,} ≤ {exact_params:,}: the explicit Hessian, solved to "
                                       "round-off"), num_params + DAMPING_PRODUCTS
    solves = num_queries + (num_examples if self_influence else 0)
    many = num_queries >= precondition_queries or self_influence
    products = cg_products(solves, many)
    if fits and num_params <= products:
        what = f"{num_queries} queries" + (f" and {num_examples:,} self-influence solves" if self_influence else "")
        return Choice(ExactSettings(), f"P = {num_params:,} HVPs form the explicit Hessian, fewer than the ≈ "
                                       f"{products:,} conjugate gradient would spend for {what}"), \
            num_params + DAMPING_PRODUCTS
    if num_examples <= full_pass_examples:
        why = (f"n = {num_examples:,} ≤ {full_pass_examples:,}: conjugate gradient on full-data products, to a "
               f"relative residual of {cg_tol:g}")
        if solves >= MANY_SOLVES:
            why += (f"; ≈ {products:,} full-data products for {solves:,} right-hand sides: solver='arnoldi' or "
                    "'ekfac' is many times faster at lower accuracy")
        if many:
            what = "self-influence" if self_influence else f"Q = {num_queries} ≥ {precondition_queries}"
            return Choice(CGSettings(tol=cg_tol, preconditioner="arnoldi"),
                          f"{why}; {what}: preconditioned by Arnoldi"), products + DAMPING_PRODUCTS
        return Choice(CGSettings(tol=cg_tol), why), products + DAMPING_PRODUCTS
    return Choice(LissaSettings(), f"n = {num_examples:,} > {full_pass_examples:,}: LiSSA's steps cost a minibatch, "
                                   "not a pass over the training set"), None


def _batched_width(name: str, num_params: int, num_queries: int) -> int:
    """How many right-hand sides the chosen solver's products batch: the explicit Hessian's identity blocks
    (:meth:`~lightning_influence.curvature.operator.HessianOperator.dense`, 512 columns), CG's queries (at
    most 32 timed); a product's cost per vector falls with the width (on the digits demo's MLP 4 vectors
    overstated the explicit Hessian's cost 6.5×: 171 s estimated, 26 s measured)."""
    if name == "exact":
        return max(1, min(num_params, DENSE_BLOCK))
    return max(1, min(num_queries, 32))


def product_seconds(problem: "InfluenceProblem", examples: int = 64, vectors: int = 4) -> float:
    """Seconds one Hessian-vector product of the whole training set with one right-hand side takes,
    estimated from a timed product of ``vectors`` fixed random directions on the first ``examples``
    training examples of each process's shard (after one untimed product: first-call costs excluded),
    scaled to the shard's size and averaged over the processes (every process gets the same number).
    Small batches overstate the per-example cost a little (fixed per-call overhead): the estimate errs
    towards the cheaper solver."""
    from ..autodiff import batch_hvp

    op, shard = problem.operator, problem.shard
    b = min(int(examples), len(shard))
    seconds = 0.0
    if b:
        _, batch = next(iter(shard.chunks(b)))
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(int(vectors), problem.num_params, generator=gen, dtype=problem.dtype).to(problem.device)
        sync = (lambda: torch.cuda.synchronize(problem.device)) if problem.device.type == "cuda" else (lambda: None)
        batch_hvp(op.plan, op.loss, op.space, op.theta, batch, v)
        sync()
        t0 = time.perf_counter()
        batch_hvp(op.plan, op.loss, op.space, op.theta, batch, v)
        sync()
        seconds = (time.perf_counter() - t0) / (b * int(vectors)) * len(shard)
    return agreed(problem, seconds)


def agreed(problem: "InfluenceProblem", value: float) -> float:
    """The mean of ``value`` over the processes (itself on one): a number every process decides on alike."""
    if not problem.comm.distributed:
        return float(value)
    total = problem.all_reduce(torch.tensor([float(value)], dtype=torch.float64, device=problem.device))
    return float(total[0]) / problem.comm.world_size


@dataclass(frozen=True)
class AutoSettings(SolverSettings, name="auto", kind=SolverKind.AUTO):
    """``solver="auto"`` (the default): a registered solver chosen by :func:`choose_solver` from the problem.

    Args:
        exact_params: largest ``P`` for the explicit Hessian.
        full_pass_examples: largest ``n`` for conjugate gradient on full-data products (beyond: LiSSA).
        precondition_queries: ``Q`` from which CG is preconditioned by Arnoldi.
        memory_bytes: memory the explicit Hessian may take (three ``P × P`` copies while factorising).
        cg_tol: relative residual at which the chosen conjugate gradient stops (module docstring, rule 3).
        time_budget: seconds the Hessian solvers may be estimated to take before EK-FAC is picked instead
            (rule 5; ``None``: no limit, accuracy first). ``InfluenceCallback`` sets it from the training
            run's length (its ``time_budget`` argument).
    """

    exact_params: int = 1_000
    full_pass_examples: int = 50_000
    precondition_queries: int = 32
    memory_bytes: int = 2 * 2**30
    cg_tol: float = 1e-3
    time_budget: Optional[float] = None

    def __post_init__(self) -> None:
        for arg in ("exact_params", "full_pass_examples", "precondition_queries", "memory_bytes"):
            v = getattr(self, arg)
            if not (is_int(v) and v >= 0):
                raise InfluenceConfigError(f"AutoSettings.{arg}={v!r} must be an integer ≥ 0.")
        if not (is_real(self.cg_tol) and 0 < self.cg_tol < 1):
            raise InfluenceConfigError(f"AutoSettings.cg_tol={self.cg_tol!r} must be a number in (0, 1), e.g. 1e-3.")
        if self.time_budget is not None and not (is_real(self.time_budget) and self.time_budget > 0):
            raise InfluenceConfigError(f"AutoSettings.time_budget={self.time_budget!r} must be a number of seconds > 0, "
                                       "or None for no limit.")

    def choose(self, problem: "InfluenceProblem", num_queries: int = 16, self_influence: bool = False) -> Choice:
        """The choice for ``problem`` (its sizes, and whether its differentiation has exact HVPs)."""
        plan = problem.objective.differentiation
        choice, products = _rule(problem.num_params, problem.num_examples, num_queries, self_influence,
                                 plan.hvp is not None and plan.exact, problem.dtype, self.exact_params,
                                 self.full_pass_examples, self.precondition_queries, self.memory_bytes, self.cg_tol)
        if self.time_budget is None or products is None:
            return choice
        # timed at the width the choice batches; each process's clock: decide on the mean of all
        spp = product_seconds(problem, vectors=_batched_width(choice.name, problem.num_params, num_queries))
        return _budgeted(choice, products, agreed(problem, self.time_budget), spp)

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
