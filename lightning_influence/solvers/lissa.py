"""LiSSA: the stochastic Neumann recursion of Agarwal et al. (2017), batched over right-hand sides, with
automatic scale, batch size and depth, and a check for negative curvature.

Damping semantics: the solver targets ``(H + λI)⁻¹ v`` with ``H`` the Hessian of the *mean* training
loss and ``λ`` in the same units as ``H``, independent of the scale (unlike Koh & Liang's code, where the
damping is multiplied by the scale). With ``A = H + λI`` and ``A_B = H_B + λI`` on a minibatch ``B``:

    x_0 = v / s,    x_t = x_{t−1} + (v − A_{B_t} x_{t−1}) / s,

which is ``h_t / s`` for the classic recursion ``h_t = v + (I − A_{B_t}/s) h_{t−1}`` (``Σ_k (I − A/s)^k =
s A⁻¹``), i.e. SGD with step ``1/s`` on ``½ xᵀAx − vᵀx``. Each step is a contraction whenever every
eigenvalue of ``A_B`` lies in ``(0, 2s)``; the expected error shrinks by ``1 − λ_min(A)/s`` per step.

* ``scale="auto"``: ``s = scale_margin · max_b λ̂_max(A_b)`` over ``power_batches`` minibatches of the
  chosen size (Lanczos, ``power_iters`` HVPs each). Minibatch Hessians have larger top eigenvalues
  than the full one (fewer examples average less), so the full-batch ``λ_max`` is the wrong yardstick.
  Since a step contracts for any batch with ``λ_max(A_B) < 2s``, the default margin ``1`` tolerates
  unseen minibatches whose top eigenvalue is up to twice the largest one sampled (a Ritz value never
  overestimates). Lanczos, not power iteration: a preconditioned system is close to the identity on
  almost all of its dimensions, so a power iteration's Rayleigh quotient hardly moves between its first
  products and stops at ``≈ 1`` before the few larger eigenvalues show (the measurement that showed it is
  in ``benchmarks/README.md``).
* ``batch_size="auto"``: minibatch noise is small once ``B ≳ tr(H)/λ_max(H)`` (Klochkov & Liu, 2024);
  ``tr(H)`` is estimated with Hutchinson probes and ``λ_max(H)`` by Lanczos (the curvature check) or by
  power iteration on the full Hessian;
  ``B = batch_factor · tr/λ_max`` rounded up to a multiple of 32, within ``[64, 512]`` and ``≤ n``.
* Iterate averaging (``average=True``): the estimate is the mean of ``x_t`` over the last half of the
  iterations (Polyak–Ruppert tail averaging), which removes most of the minibatch noise that a single
  iterate carries; ``average=False`` returns the classic last iterate ``h_T / s``.
* ``depth="auto"``: iterations run in segments of doubling length (``4·check_every``, then ×2); at the
  end of each segment a query's estimate (the mean over that segment, the last half) is compared with
  the previous segment's; when the relative change of the query's *scores* on the training set,
  ``‖G(x̄_k − x̄_{k−1})‖ / ‖G x̄_k‖`` with ``G [n, P]`` the training gradients, is below ``tol`` the
  query is converged and frozen (later steps skip it). ``‖G d‖`` is estimated through a sketch
  ``S = EᵀG/√n`` of ``score_probes`` random ±1 combinations of the training gradients (built in one
  pass; ``‖S d‖² ≈ ‖G d‖²/n``). Measuring what the scores see matters: along near-flat
  directions of ``H + λI`` the recursion converges (and its noise random-walks) on time scales of
  ``s/λ_min`` steps, which the scores barely notice and a Euclidean criterion would wait for. Each
  query converges on its own, so results do not depend on which queries are solved together.
  ``max_depth`` caps the steps; ending unconverged warns.
* ``repeats`` independent recursions (own minibatch streams) are averaged; their spread gives a
  per-query relative standard error of its scores, ``‖std_r(S x_r)‖ / (√R ‖mean_r(S x_r)‖)`` (the
  spread of the sketched scores over the repeats, signs kept). It measures the sampling spread only,
  not the bias of stopping early (which lies along the Hessian's flattest directions and can be an
  order of magnitude larger: benchmarks/README.md).
* Divergence: a contracting recursion satisfies ``‖h_t‖ ≤ min(t + 1, s/λ)·‖v‖``; an estimate that exceeds
  ten times that (geometric growth from too small a scale or negative curvature) or becomes NaN/inf
  stops the solve at once with :class:`SolverDivergedError` naming the step, the norm history and the
  fix (a scale or damping estimated from the spectrum).
* Negative curvature: the recursion diverges along any direction where ``H + λI`` is negative, but only
  by a factor ``1 + |μ|/s`` per step, slowly enough to pass the norm check for thousands of steps while
  the scores drift. So before solving at a fixed damping (``check_curvature=True``), ``λ_min(H)`` is
  estimated by Lanczos (``3·power_iters`` full-data HVPs) and :class:`NegativeCurvatureError` names the
  damping needed. With ``damping="auto"`` (:mod:`lightning_influence.curvature.damping`, for every solver) the
  damping is chosen from the same estimate, which the solver reuses.

* Preconditioning (``preconditioner="ekfac"``, ``"kfac"``, ``"arnoldi"`` or their settings): a factored
  approximation ``P ≈ H + λI`` (:class:`~lightning_influence.solvers.base.FactoredInverse`) is fitted
  once, and the same recursion runs on the symmetrically preconditioned system ``M y = S v`` with
  ``S = P^{-1/2}``, ``M_B = S (H_B + λI) S`` and ``x = S y``. The target stays the exact
  ``(H + λI)⁻¹ v``; the preconditioner only changes how fast the recursion gets there (the rate is
  ``1 − λ_min(M)/s`` with ``s ≈ λ_max(M_B)``: about the condition number of ``P⁻¹(H + λI)`` instead of
  that of ``H + λI``). The preconditioner's own answer ``y_0 = S v`` (i.e. ``x_0 = P⁻¹ v``) serves as a
  control variate: one full-data pass gives its exact residual ``r_0 = S v − M y_0``, and the recursion
  solves ``M δ = r_0`` for the correction, ``y = y_0 + δ``. Its minibatch noise ``(M_B − M) δ`` is
  proportional to the correction, not to the whole solution, so the averaged estimate settles as soon as
  the correction is resolved (variance reduction as in SVRG, with one anchor). The scale is the top
  eigenvalue of ``M_B``, the score sketch is read through ``S`` and the convergence test measures the
  change of the whole estimate ``y_0 + δ``. Every safeguard below applies unchanged to the recursion on
  ``δ``.

Diagnostics are typed data (:class:`~lightning_influence.diagnostics.Diagnostic`): the spectral
estimates and HVPs they cost, the scale, batch size and damping used, per-repeat norm history, per-query
depth and relative standard error.
"""

from __future__ import annotations

import collections
import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from ..checks import is_int, is_real
from ..curvature.damping import AutoDamping, DampingChoice, DampingRule, DampingSpec, SpectrumRule, estimate_spectrum
from ..curvature.spectral import hutchinson_trace, lanczos_extremes, power_iteration, rademacher
from ..diagnostics import Diagnostic
from ..errors import InfluenceConfigError, InfluenceRuntimeError, SolverDivergedError
from ..seeds import Stream, derive_seed
from .base import Curvature, InverseHVP, SolveResult, SolverKind, SolverSettings, hessian_curvature
from .preconditioned import check_preconditioner

if TYPE_CHECKING:  # pragma: no cover
    from ..problem import InfluenceProblem

__all__ = ["LissaSettings", "LissaSolver"]

_MIN_BATCH, _MAX_BATCH = 64, 512
#: an estimate more than this many times the contracting-recursion bound counts as divergence
_DIVERGENCE_SLACK = 10.0


class _Diverged(Exception):
    """A recursion that grew (internal: the solve restarts with a corrected scale, or raises
    :class:`SolverDivergedError`). ``recent``: the minibatches of its last steps."""

    def __init__(self, t: int, ratio: float, steps: List[int], hist: List[float], why: str, recent: List[Any]) -> None:
        super().__init__(why)
        self.t, self.ratio, self.steps, self.hist, self.why, self.recent = t, ratio, steps, hist, why, recent


def op_batches(operator: Any, batch_size: int, seed: int, count: int) -> List[Any]:
    """``count`` minibatches of ``batch_size`` drawn from ``seed`` (this process's parts of them)."""
    it = operator.minibatches(batch_size, seed)
    return [next(it) for _ in range(count)]


def _repeat_seed(seed: int, r: int) -> int:
    """Seed of repeat ``r``'s minibatch stream: a function of ``(seed, r)`` only."""
    return derive_seed(seed, Stream.REPEAT, r)


def _setup_seed(seed: int, what: int) -> int:
    """Seed of one setup estimate (``what``: 1 curvature check, 2 trace, 3 scale, 4 sketch, 5 tuning, …)."""
    return derive_seed(seed, Stream.SETUP, what)


@dataclass(frozen=True)
class LissaSettings(SolverSettings, name="lissa", kind=SolverKind.ITERATIVE):
    """Settings of the LiSSA recursion; every default works without tuning.

    Args:
        depth: ``"auto"`` (stop each query when converged, see ``tol``) or a fixed number of steps.
        max_depth: step cap for ``depth="auto"``.
        tol: relative change of a query's training scores (measured through the sketch, see
            ``score_probes``) between successive segment averages, below which the query is converged.
        check_every: steps between divergence checkpoints (norm history); the first convergence
            segment is ``4·check_every`` steps (``check_every`` with a preconditioner, whose recursion
            only resolves a correction).
        batch_size: ``"auto"`` (from ``tr(H)/λ_max(H)``) or training examples per minibatch HVP.
        batch_factor: ``B = batch_factor · tr(H)/λ_max(H)`` for ``batch_size="auto"``.
        scale: ``"auto"`` or a fixed ``s``; must exceed half the top eigenvalue of every ``H_B + λI``.
        scale_margin: ``s = scale_margin · max sampled λ_max(H_B + λI)`` for ``scale="auto"``.
        repeats: independent recursions averaged (≥ 2 gives a standard error).
        seed: seed of all sampling; the same seed gives the same result.
        power_iters: HVPs per eigenvalue estimate (power iteration for the full Hessian's ``λ_max`` when
            no Lanczos spectrum is at hand, Lanczos steps for each minibatch's ``λ_max``).
        power_batches: minibatches sampled for the automatic scale (their systems' spectral radius).
        max_restarts: with ``scale="auto"``, how many times a detected divergence restarts the solve with
            a corrected scale (the spectral radius of the minibatch systems the recursion had just used, at
            least twice the old scale) before :class:`SolverDivergedError` is raised. Each restart is
            recorded (``restarts``, ``scale_history``).
        trace_probes: Hutchinson probes for ``tr(H)``.
        average: tail-average the iterates (``False``: the classic last iterate).
        score_probes: random ±1 combinations of all training gradients that sketch the score vector
            for the convergence test and the standard error (``score_probes × P`` numbers in memory,
            one pass of per-example gradients to build).
        tangent_chunk: right-hand sides vmapped together in one HVP: ``"auto"`` (time all-at-once and
            chunks of 64/32/16/8 on the first solve with more than 8 queries, keep the fastest), an
            integer, or ``None`` (all at once). Only speed and memory depend on it.
        check_curvature: before solving at a fixed damping, estimate ``λ_min(H)`` by Lanczos
            (``3·power_iters`` full-data HVPs) and raise :class:`NegativeCurvatureError` naming the damping
            needed when ``H + λI`` is not positive definite. Skipped when automatic damping already
            estimated the spectrum.
        preconditioner: a closed-form solver's name (``"arnoldi"``, ``"ekfac"``, ``"kfac"``) or settings
            object, fitted once at the same damping (see the module docstring), or ``None`` for plain
            LiSSA. Default ``"arnoldi"``: :meth:`ArnoldiSettings.as_preconditioner
            <lightning_influence.solvers.arnoldi.ArnoldiSettings.as_preconditioner>`, a low-rank
            eigendecomposition of ``H`` of rank ≤ 100 whose Krylov space also gives the damping and the
            curvature check.
    """

    depth: Union[int, str] = "auto"
    max_depth: int = 5000
    tol: float = 0.05
    check_every: int = 10
    batch_size: Union[int, str] = "auto"
    batch_factor: float = 4.0
    scale: Union[float, str] = "auto"
    scale_margin: float = 1.0
    repeats: int = 2
    seed: int = 0
    power_iters: int = 20
    power_batches: int = 8
    max_restarts: int = 3
    trace_probes: int = 8
    average: bool = True
    check_curvature: bool = True
    score_probes: int = 64
    tangent_chunk: Union[int, str, None] = "auto"
    preconditioner: Union[str, SolverSettings, None] = "arnoldi"

    def __post_init__(self) -> None:
        def bad(arg: str, what: str) -> InfluenceConfigError:
            return InfluenceConfigError(f"LissaSettings.{arg}={getattr(self, arg)!r} must be {what}.")

        def pos_int(v: Any) -> bool:
            return is_int(v) and v >= 1

        def pos_num(v: Any) -> bool:
            return is_real(v) and 0 < float(v) < math.inf

        if not (self.depth == "auto" or pos_int(self.depth)):
            raise bad("depth", 'a positive integer or "auto"')
        if not (self.batch_size == "auto" or pos_int(self.batch_size)):
            raise bad("batch_size", 'a positive integer or "auto"')
        if not (self.scale == "auto" or pos_num(self.scale)):
            raise bad("scale", 'a positive number or "auto"')
        for arg in ("max_depth", "check_every", "repeats", "power_iters", "power_batches", "trace_probes",
                    "score_probes"):
            if not pos_int(getattr(self, arg)):
                raise bad(arg, "a positive integer")
        if not (is_int(self.max_restarts) and self.max_restarts >= 0):
            raise bad("max_restarts", "an integer ≥ 0")
        for arg in ("tol", "scale_margin", "batch_factor"):
            if not pos_num(getattr(self, arg)):
                raise bad(arg, "a positive number")
        if not (self.tangent_chunk is None or self.tangent_chunk == "auto" or pos_int(self.tangent_chunk)):
            raise bad("tangent_chunk", 'a positive integer, "auto" or None')
        if not is_int(self.seed):
            raise bad("seed", "an integer")
        check_preconditioner("LissaSettings", self.preconditioner)
        for arg in ("average", "check_curvature"):
            if not isinstance(getattr(self, arg), bool):
                raise bad(arg, "True or False")

    @property
    def damping_rule(self) -> DampingRule:
        return SpectrumRule(check=self.check_curvature)

    def estimate(self, problem: "InfluenceProblem", damping: DampingSpec) -> Curvature:
        """Lanczos on ``H`` for automatic damping (``AutoDamping.iters`` products) and, at a fixed damping
        with ``check_curvature``, for the negative-curvature check (``3·power_iters`` products): the
        Neumann series diverges along any negative direction of ``H + λI``, but slowly enough (a factor
        ``1 + |μ|/s`` per step) to pass every norm check."""
        if isinstance(damping, AutoDamping):
            return hessian_curvature(problem, damping.iters, damping.seed, damping.max_examples, damping.settled)
        if self.check_curvature:
            cur = hessian_curvature(problem, 3 * self.power_iters, _setup_seed(self.seed, 1), None)
            cur.diagnostics = [Diagnostic("curvature_check_passes", cur.spectrum.passes, "curvature-check passes",
                                          "full-data HVPs of the Lanczos check for negative curvature at the fixed damping")]
            return cur
        return Curvature()

    def build(self, problem: "InfluenceProblem", damping: DampingChoice, curvature: Curvature) -> "LissaSolver":
        return LissaSolver(problem, damping, self, curvature)


def _d(name: str, value: Any, label: str, meaning: str = "", reduce: str = "first", kind: str = "scalar") -> Diagnostic:
    return Diagnostic(name, value, label, meaning, reduce=reduce, kind=kind)


class LissaSolver(InverseHVP):
    """Runs the recursion for a batch of right-hand sides. Setup (damping, curvature check, spectral
    estimates, preconditioner, automatic batch size and scale, the score sketch) happens once here, so
    every query chunk is solved with the same settings.

    Args:
        problem: the influence problem (its Hessian operator is used).
        damping: the damping choice (``λ``, Hessian units), made before the solver is built.
        settings: :class:`LissaSettings`.
        curvature: the spectrum estimate of the fit (reused for the automatic batch size) and the fitted
            preconditioner, if any.
    """

    def __init__(self, problem: "InfluenceProblem", damping: DampingChoice, settings: LissaSettings,
                 curvature: Optional[Curvature] = None) -> None:
        super().__init__(problem, damping)
        curvature = curvature or Curvature()
        self.preconditioner = curvature.preconditioner
        self.settings = settings
        operator = self.operator = problem.operator
        hvp0 = operator.hvp_calls
        kw = dict(dtype=operator.dtype, device=operator.device)
        p = operator.num_params
        st = settings
        setup: List[Diagnostic] = []

        spectrum = curvature.spectrum
        lam_max_full: Optional[float] = None if spectrum is None else spectrum.lambda_max
        if st.batch_size == "auto" and lam_max_full is None:
            lam_max_full = power_iteration(operator.full_hvp, p, iters=st.power_iters, tol=1e-3,
                                           seed=_setup_seed(st.seed, 0), **kw).value
        if st.batch_size == "auto":
            assert lam_max_full is not None
            tr = hutchinson_trace(operator.full_hvp, p, probes=st.trace_probes, seed=_setup_seed(st.seed, 2), **kw)
            setup.append(_d("trace", tr.value, "tr(H) estimate", f"Hutchinson, {st.trace_probes} probes "
                            f"(std. error {tr.stderr:.3g}); sets the automatic batch size with λ_max(H)"))
            ratio = tr.value / max(lam_max_full, 1e-30)
            b = int(math.ceil(st.batch_factor * max(ratio, 1.0) / 32.0)) * 32
            self.batch_size = int(min(max(b, _MIN_BATCH), _MAX_BATCH, operator.num_examples))
        else:
            self.batch_size = int(min(int(st.batch_size), operator.num_examples))
        setup.append(_d("batch_size", self.batch_size, "minibatch size", "training examples per minibatch HVP"))

        self.scale_history: List[float] = []
        if st.scale == "auto":
            tops, radii = self._minibatch_extremes(op_batches(operator, self.batch_size, _setup_seed(st.seed, 3),
                                                              st.power_batches))
            setup.append(_d("lambda_max_minibatch", max(tops), "λ_max of the minibatch system (max sampled)",
                            f"top eigenvalue of {'S(H_B + λI)S' if self.preconditioner else 'H_B + λI'} over "
                            f"{len(tops)} sampled minibatches (Lanczos)", "max"))
            setup.append(_d("radius_minibatch", max(radii), "spectral radius of the minibatch system (max sampled)",
                            "largest |eigenvalue| of the sampled minibatch systems (their negative curvature "
                            "counts too); sets the automatic scale", "max"))
            if not max(tops) > 0:
                raise SolverDivergedError(
                    f"the top eigenvalue of the minibatch Hessians plus damping is estimated as {max(tops):.3g} ≤ 0; "
                    f"the Hessian has no positive curvature at damping λ={self.damping:g}. Fix: damping > "
                    f"{self.damping - max(tops):.3g}, or damping='auto'."
                )
            self.scale = float(st.scale_margin * max(radii))
        else:
            self.scale = float(st.scale)
        self.scale_history.append(self.scale)
        setup.append(_d("scale", self.scale, "scale s",
                        "each step divides the residual by s; contracts while every eigenvalue of the minibatch "
                        "system is below 2s"))
        setup.append(_d("setup_hvps", operator.hvp_calls - hvp0, "setup HVPs",
                        "batched Hessian-vector products spent on the spectrum, scale, batch size and trace"))
        # the score sketch serves the convergence test and the standard error only
        self.sketch: Optional[Tensor] = None
        if st.depth == "auto" or st.repeats > 1:
            t0 = time.perf_counter()
            self.sketch = self._precondition(self._score_sketch(_setup_seed(st.seed, 4)))
            setup.append(_d("score_sketch_seconds", time.perf_counter() - t0, "score sketch (s)",
                            f"one pass of per-example gradients into {st.score_probes} random ±1 combinations"))
        self.setup = setup

    # ------------------------------------------------------------------ the (preconditioned) system
    def _precondition(self, v: Tensor) -> Tensor:
        """``S v`` per row, ``S = P^{-1/2}`` (identity without a preconditioner)."""
        return v if self.preconditioner is None else self.preconditioner.apply_inverse_sqrt(v)

    def _system(self, batch: Any, y: Tensor) -> Tensor:
        """``M_B y = S (H_B + λI) S y`` per row (``(H_B + λI) y`` without a preconditioner)."""
        x = self._precondition(y)
        return self._precondition(self.operator.minibatch_hvp(batch, x) + self.damping * x)

    def _full_system(self, y: Tensor) -> Tensor:
        """``M y = S (H + λI) S y`` per row on the whole training set (one full-data pass)."""
        x = self._precondition(y)
        return self._precondition(self.operator.full_hvp(x) + self.damping * x)

    def _score_sketch(self, seed: int) -> Tensor:
        """``S = EᵀG / √n`` ``[K, P]``: ``K = score_probes`` random ±1 combinations of all ``n`` training
        gradients ``G [n, P]`` (one pass of per-example gradients). ``‖S x‖² ≈ ‖G x‖² / n`` for any ``x``
        (Johnson–Lindenstrauss), i.e. the size of what ``x`` does to *every* training example's score."""
        op, k = self.operator, self.settings.score_probes
        n = op.num_examples
        signs = rademacher(n, k, seed, op.dtype, op.device)  # [n, K]
        sketch = self.problem.grad_sum(lambda start, g: signs[start : start + g.shape[0]].T @ g,
                                       lambda: torch.zeros(k, op.num_params, dtype=op.dtype, device=op.device))
        if not bool(torch.isfinite(sketch).all()):
            raise InfluenceRuntimeError("a training example has a NaN/inf gradient at the trained weights; check the data.")
        return sketch / math.sqrt(n)

    def _score_norm(self, y: Tensor) -> Tensor:
        """``‖S x_q‖ ≈ ‖G x_q‖/√n`` per row (``x = P^{-1/2} y``): what the estimate does to the training
        scores."""
        assert self.sketch is not None
        return (y @ self.sketch.T).norm(dim=1)

    def _minibatch_extremes(self, batches: List[Any]) -> Tuple[List[float], List[float]]:
        """Top eigenvalue and spectral radius of the damped (preconditioned) system of each minibatch, from
        ``power_iters`` Lanczos steps each (see the module docstring for why not power iteration)."""
        st, op = self.settings, self.operator
        tops, radii = [], []
        for i, b in enumerate(batches):
            lo, hi = lanczos_extremes(lambda v: self._system(b, v), op.num_params, iters=st.power_iters,
                                      seed=derive_seed(st.seed, Stream.SETUP, 100 + i), dtype=op.dtype, device=op.device)
            tops.append(hi.value)
            radii.append(max(abs(hi.value), abs(lo.value)))
        return tops, radii

    def _restart_scale(self, diverged: "_Diverged") -> float:
        """The scale after a divergence: the spectral radius of the minibatch systems the recursion used
        just before it (the batches where it grew), with the margin, and at least twice the old scale."""
        _, radii = self._minibatch_extremes(diverged.recent)
        return float(max(2.0 * self.scale, 1.25 * self.settings.scale_margin * max(radii, default=0.0)))

    # ------------------------------------------------------------------ solve
    def solve(self, rhs: Tensor) -> SolveResult:
        """``(H + λI)⁻¹ rhs`` for every row of ``rhs`` ``[Q, P]``; see the module docstring."""
        return self._solve(rhs, self.settings.repeats)

    def quadratic(self, grads: Tensor) -> tuple[Tensor, List[Diagnostic]]:
        """``g_iᵀ (H + λI)⁻¹ g_i`` per row, the rows solved as one batch with a single repeat (the standard
        error of every training example's self-influence is not reported, so a second repeat would only
        double the cost), each row converged when the relative change of its own ``g_iᵀ x_i`` between
        segments is below ``tol`` (rather than the change of all its training scores)."""
        res = self._solve(grads, 1, quadratic=True)
        return (res.solution * grads).sum(dim=1), res.diagnostics

    def _solve(self, rhs: Tensor, repeats: int, quadratic: bool = False) -> SolveResult:
        st = self.settings
        q = rhs.shape[0]
        if st.tangent_chunk == "auto":
            if not any(d.name == "tangent_chunk" for d in self.setup) and q > 8:  # once, on the first chunk
                tune0 = self.operator.hvp_calls
                batch = next(self.operator.minibatches(self.batch_size, _setup_seed(st.seed, 5)))
                # all-at-once is only a candidate for a moderate Q: its tangent activations grow with Q;
                # timed on this process's part of a minibatch (none: an empty shard), so ranks may differ
                chosen = (q if batch is None else
                          self.operator.tune_tangent_chunk(batch, rhs[:64], allow_all=q <= 64))
                self.setup.append(_d("tangent_chunk", chosen, "right-hand sides per vmap",
                                     "the fastest chunk timed on the first solve (speed and memory only)"))
                self.setup.append(_d("tuning_hvps", self.operator.hvp_calls - tune0, "tuning HVPs",
                                     "HVPs spent timing tangent chunks"))
        else:
            self.operator.tangent_chunk = st.tangent_chunk
        hvp0 = self.operator.hvp_calls
        v = self._precondition(rhs)
        # with a preconditioner: solve for the correction to its answer y0 = S v (control variate)
        y0 = v if self.preconditioner is not None else None
        target = v if y0 is None else v - self._full_system(y0)
        estimates: List[Tensor] = []
        per_repeat: List[Dict[str, Any]] = []
        restarts = 0
        r = 0
        while r < repeats:
            try:
                y, info = self._one_repeat(target, _repeat_seed(st.seed, r), y0, probe=v if quadratic else None)
            except _Diverged as d:
                if st.scale != "auto" or len(self.scale_history) > st.max_restarts:
                    raise self._diverged(d) from None
                self.scale = self._restart_scale(d)
                self.scale_history.append(self.scale)
                restarts += 1
                estimates, per_repeat, r = [], [], 0  # every repeat at the same scale: start again
                continue
            estimates.append(y if y0 is None else y0 + y)
            per_repeat.append(info)
            r += 1
        stack = torch.stack(estimates)  # [R, Q, P]
        mean = stack.mean(0)
        if repeats > 1:
            # measured on the score sketch, like convergence: the spread along near-flat directions (a slow
            # random walk, large in the Euclidean norm) barely moves the scores and must not dominate
            assert self.sketch is not None
            sk = stack @ self.sketch.T  # [R, Q, K]: each repeat's sketched scores, signs kept
            sd = sk.std(0, unbiased=True).norm(dim=-1) / math.sqrt(repeats)
            rel_se = (sd / sk.mean(0).norm(dim=-1).clamp_min(torch.finfo(mean.dtype).tiny)).tolist()
        else:
            rel_se = [float("nan")] * q
        depth_per_query = [max(info["depth_per_query"][i] for info in per_repeat) for i in range(q)]
        converged = all(info["converged"] for info in per_repeat)
        diagnostics = [
            _d("converged", converged, "converged", "every query met the depth criterion (tol) in every repeat", "all"),
            _d("restarts", restarts, "restarts after divergence",
               "times a diverging recursion was restarted with a corrected automatic scale", "sum"),
            _d("scale_used", self.scale, "scale s used", "the scale of the recursion that converged (the setup's, or a "
               "restart's)", "max"),
            _d("steps_max", max(info["depth"] for info in per_repeat), "LiSSA steps (most)",
               "recursion steps of the longest-running query", "max"),
            _d("hvp_calls", self.operator.hvp_calls - hvp0, "solve HVPs",
               "batched minibatch Hessian-vector products of the recursion", "sum"),
            _d("relative_stderr", rel_se, "relative std. error of the scores",
               "spread of the query's training scores over the repeats (sampling noise, not the bias of "
               "stopping early); NaN with one repeat", kind="per_query"),
            _d("depth", depth_per_query, "LiSSA steps", "recursion steps run for the query (most over repeats)",
               kind="per_query"),
            _d("norm_history", [{"label": f"repeat {r}", "x": info["checkpoint_steps"], "y": info["norm_history"]}
                                for r, info in enumerate(per_repeat)],
               "‖h_t‖/‖v‖ (max over the chunk's queries)",
               "LiSSA norm history at checkpoint steps t: levels off when the recursion converges; a contracting "
               "recursion stays below its bound, geometric growth means divergence", kind="series"),
            _d("segment_change", [{"label": f"repeat {r}", "x": info["segment_steps"], "y": info["segment_change"]}
                                  for r, info in enumerate(per_repeat)],
               "relative change of the scores per segment",
               f"largest relative change of the running queries' (sketched) training scores at the end of each "
               f"depth segment; a query stops below tol={st.tol:g}", kind="series"),
        ]
        return SolveResult(self._precondition(mean), diagnostics)

    def _diverged(self, d: "_Diverged") -> SolverDivergedError:
        """The divergence error for the settings in use, with fixes estimated from the spectrum (a few more
        HVPs): every hint names a setting that was in effect."""
        st = self.settings
        _, radii = self._minibatch_extremes(d.recent or op_batches(self.operator, self.batch_size,
                                                                   _setup_seed(st.seed, 6), st.power_batches))
        radius = max(radii, default=math.nan)
        spec = estimate_spectrum(self.problem, 3 * st.power_iters, seed=_setup_seed(st.seed, 7)).spectrum
        lam_min, lam_max = spec.lambda_min, spec.lambda_max
        history = ", ".join(f"{s}: {h:.3g}" for s, h in list(zip(d.steps, d.hist))[-8:])
        fixes = []
        if lam_min + self.damping <= 0:
            need = AutoDamping().choose(lam_min, lam_max)
            fixes.append(f"H + λI has negative curvature: the smallest Hessian eigenvalue is estimated at "
                         f"{lam_min:.3g} with damping λ={self.damping:g}; use damping ≥ {need:.3g} "
                         "(or damping='auto')")
        if st.scale != "auto" and self.scale < 0.5 * radius:
            fixes.append(f"scale={self.scale:g} is below half the spectral radius of the minibatch systems it met "
                         f"(estimated {radius:.3g}); raise scale to at least {radius:.3g}, or use scale='auto'")
        elif st.scale == "auto" and math.isfinite(d.ratio):
            tried = ", ".join(f"{x:.3g}" for x in self.scale_history)
            fixes.append(f"the automatic scale was raised {len(self.scale_history) - 1} time(s) (scales {tried}; "
                         f"LissaSettings(max_restarts={st.max_restarts})) and the recursion still grew: its minibatch "
                         f"systems' spectral radius reaches {radius:.3g}. Use solver='cg' (full-data products, no "
                         "minibatch noise), a larger LissaSettings(batch_size=...) than "
                         f"{self.batch_size}, or more damping than λ={self.damping:g}")
        if not fixes and math.isfinite(d.ratio):
            fixes.append(f"raise damping above {self.damping:g} or scale above {self.scale:g} (smallest Hessian "
                         f"eigenvalue estimate {lam_min:.3g}, minibatch spectral radius estimate {radius:.3g})")
        elif not fixes:  # scale and curvature are fine: the product itself was not finite
            fixes.append(f"the spectrum estimates show a contracting recursion (smallest Hessian eigenvalue "
                         f"{lam_min:.3g} with damping λ={self.damping:g}, minibatch spectral radius {radius:.3g} "
                         f"within 2·scale={2 * self.scale:g}), so a Hessian-vector product returned NaN/inf: look "
                         "for overflow in the model or NaN in the training data (try dtype=torch.float64)")
        return SolverDivergedError(
            f"LiSSA diverged at step {d.t}: {d.why} (‖h_t‖/‖v‖ = {d.ratio:.3g}). Norm history (step: max ‖h‖/‖v‖): "
            f"{history}. Fix: " + "; ".join(fixes) + "."
        )

    def _one_repeat(self, rhs: Tensor, seed: int, offset: Optional[Tensor] = None, probe: Optional[Tensor] = None):
        """One recursion on ``M y = rhs`` from ``rhs / s``; ``offset`` (the control variate's ``y_0``) is
        added to the estimate wherever the convergence test measures the scores. With ``probe`` ``[Q, P]``
        the test measures ``probe_q · y_q`` (a quadratic form such as ``g_iᵀ(H + λI)⁻¹g_i``) instead of the
        score sketch."""
        st, s, lam = self.settings, self.scale, self.damping
        auto = st.depth == "auto"
        depth = st.max_depth if auto else int(st.depth)
        q = rhs.shape[0]
        tiny = torch.finfo(rhs.dtype).tiny
        vnorm = rhs.norm(dim=1).clamp_min(tiny)
        batches = self.operator.minibatches(self.batch_size, seed)
        recent: Deque[Any] = collections.deque(maxlen=st.check_every)  # the minibatches a divergence came from
        x = rhs / s
        active = torch.ones(q, dtype=torch.bool, device=rhs.device)
        depth_q = [depth] * q
        # segment bookkeeping: the estimate is the mean of x over the current segment
        # a control-variate recursion starts near the answer: its first segment is short
        seg_end = (st.check_every if offset is not None else 4 * st.check_every) if auto else depth
        seg_start = 0 if auto else (depth // 2 if st.average else depth - 1)
        acc = torch.zeros_like(rhs)
        prev: Optional[Tensor] = None
        final = torch.zeros_like(rhs)
        hist: List[float] = []
        steps: List[int] = []
        changes: List[float] = []
        seg_steps: List[int] = []
        # ‖h_t‖/‖v‖ ≤ t + 1 for a contraction; ≤ s/λ as well without a preconditioner (λ_min(A) ≥ λ)
        bound_cap = s / lam if lam > 0 and self.preconditioner is None else math.inf
        t = 0
        for t in range(1, depth + 1):
            idx = active.nonzero().squeeze(1)
            xa = x[idx]
            batch = next(batches)
            recent.append(batch)
            step = (rhs[idx] - self._system(batch, xa)) / s
            xa = xa + step
            x[idx] = xa
            ratio_q = xa.norm(dim=1) * s / vnorm[idx]
            ratio = float(ratio_q.max())
            if not math.isfinite(ratio):
                bad_q = int(idx[~torch.isfinite(ratio_q)][0])
                raise _Diverged(t, ratio, steps + [t], hist + [ratio], f"the estimate for query {bad_q} became NaN/inf",
                                list(recent))
            if ratio > _DIVERGENCE_SLACK * min(t + 1, bound_cap):
                raise _Diverged(t, ratio, steps + [t], hist + [ratio], "the norm grows geometrically, beyond the bound "
                                "min(t + 1, s/λ) of a contracting recursion", list(recent))
            if t % st.check_every == 0:
                steps.append(t)
                hist.append(ratio)
            if t > seg_start:
                acc[idx] += xa
            if t == seg_end or t == depth:
                n_avg = t - seg_start
                est = acc / n_avg if (st.average or not auto) else x.clone()
                if auto and prev is not None:
                    # relative change of the query's training scores (through the sketch)
                    rel = torch.zeros(q, dtype=rhs.dtype, device=rhs.device)
                    whole = est[idx] if offset is None else est[idx] + offset[idx]
                    if probe is None:
                        rel[idx] = self._score_norm((est - prev)[idx]) / self._score_norm(whole).clamp_min(tiny)
                    else:
                        pr = probe[idx]
                        rel[idx] = (pr * (est - prev)[idx]).sum(1).abs() / (pr * whole).sum(1).abs().clamp_min(tiny)
                    changes.append(float(rel[active].max()))
                    seg_steps.append(t)
                    done = active & (rel < st.tol)
                else:
                    done = torch.zeros_like(active)
                if t == depth:
                    done = active.clone()
                for i in done.nonzero().squeeze(1).tolist():
                    depth_q[i] = t
                final[done] = est[done]
                active &= ~done
                if not bool(active.any()):
                    break
                prev = est
                acc = torch.zeros_like(rhs)
                seg_start, seg_end = t, min(2 * t, depth)
        converged = True
        if auto and max(depth_q) >= depth:
            last_change = changes[-1] if changes else float("nan")
            converged = bool(changes) and last_change < st.tol
            if not converged:
                warnings.warn(
                    f"LiSSA reached max_depth={depth} before converging (relative change {last_change:.3g} > "
                    f"tol={st.tol:g}); the scores may be inaccurate. Raise max_depth, raise the damping, or "
                    "loosen tol.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return final, {
            "depth": t,
            "depth_per_query": depth_q,
            "converged": converged,
            "norm_history": hist,
            "checkpoint_steps": steps,
            "segment_change": changes,
            "segment_steps": seg_steps,
        }

