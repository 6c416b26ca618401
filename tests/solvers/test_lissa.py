"""LiSSA with no tuning: accuracy of the defaults against exact solves, divergence and negative-curvature
errors, automatic damping, standard errors, invariances, settings validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import (
    ArnoldiSettings,
    AutoDamping,
    CGSettings,
    ExactSettings,
    InfluenceConfigError,
    LissaSettings,
    NegativeCurvatureError,
    SolverDivergedError,
    compute_influence,
)
from lightning_influence.data import ExampleSource
from lightning_influence.objective import Objective
from lightning_influence.curvature.operator import HessianOperator
from lightning_influence.curvature.spectral import hutchinson_trace, lanczos_extremes, power_iteration

from .. import problems
from ..problems import diag, diag_names
from ..problems import pearson_rows as pearson

QUERIES = list(range(0, 450, 45))  # 10 validation queries


def run(p, solver, damping=None, queries=QUERIES, **kw):
    return compute_influence(p.model, p.train, p.val, query_indices=queries, solver=solver,
                             damping=p.damping if damping is None else damping, dtype=torch.float64, **kw)


# --------------------------------------------------------------------------- a small saddle problem
def saddle_problem(n: int = 256, seed: int = 0) -> problems.Problem:
    """A tanh MLP (83 parameters) at its random initial weights: far from a minimum, its Hessian has
    eigenvalues down to −0.172 (checked against the explicit Hessian in the tests)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(2 * n, 6, dtype=torch.float64), torch.randint(0, 3, (2 * n,))
    return problems.Problem(model, TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:]), 0.0)


def dense_hessian(p: problems.Problem) -> torch.Tensor:
    obj = Objective(p.model, params=None, loss_fn=None, dtype=torch.float64)
    op = HessianOperator(obj.loss, obj.space, obj.theta, ExampleSource(p.train, None, obj.prepare_batch), 512)
    return op.dense()


@pytest.fixture(scope="module")
def saddle() -> problems.Problem:
    return saddle_problem()


# --------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "kw, field",
    [({"depth": 0}, "depth"), ({"depth": "deep"}, "depth"), ({"batch_size": "big"}, "batch_size"),
     ({"scale": -1.0}, "scale"), ({"scale": "x"}, "scale"), ({"tol": 0}, "tol"), ({"repeats": 0}, "repeats"),
     ({"max_depth": 2.5}, "max_depth"), ({"scale_margin": float("nan")}, "scale_margin"), ({"seed": 1.5}, "seed"),
     ({"check_curvature": 1}, "check_curvature"), ({"tangent_chunk": 0}, "tangent_chunk"),
     ({"score_probes": 0}, "score_probes")],
)
def test_settings_are_validated_naming_the_field(kw, field):
    with pytest.raises(InfluenceConfigError, match=rf"LissaSettings\.{field}="):
        LissaSettings(**kw)


def test_defaults_are_automatic_and_serialisable():
    s = LissaSettings()
    assert (s.depth, s.batch_size, s.scale) == ("auto", "auto", "auto")
    d = s.to_dict()
    assert d["solver"] == "lissa" and d["scale"] == "auto"


def test_auto_damping_works_for_every_solver(saddle):
    # "auto" is resolved before the solver (Lanczos on the full Hessian), so exact and CG take it too
    ev = torch.linalg.eigvalsh(dense_hessian(saddle))
    exact = run(saddle, ExactSettings(), damping="auto", queries=[0, 1, 2])
    cg = run(saddle, CGSettings(tol=1e-10), damping="auto", queries=[0, 1, 2])
    lam = exact.settings["damping"]
    # Lanczos on 81 parameters stops once the damping settles (AutoDamping.settle_tol): 2e-9 apart here
    assert cg.settings["damping"] == pytest.approx(lam, rel=1e-7)
    assert exact.settings["lambda_min_estimate"] == pytest.approx(float(ev[0]), rel=1e-6)
    # base 0: λ = −λ_min + max(0.5·|λ_min|, 1e-3·λ_max) = 1.5·|λ_min| here
    assert 0.5 * -float(ev[0]) > 1e-3 * float(ev[-1])
    assert lam == pytest.approx(1.5 * -float(ev[0]), rel=1e-6)
    torch.testing.assert_close(cg.scores, exact.scores, rtol=1e-6, atol=1e-8)


def test_auto_damping_starts_from_the_base(saddle):
    ev = torch.linalg.eigvalsh(dense_hessian(saddle))
    # base 0.15 nearly cancels λ_min = −0.172; the margin still keeps H + λI a third of |λ_min| positive
    res = run(saddle, ExactSettings(), damping=AutoDamping(base=0.15), queries=[0])
    assert res.settings["damping"] == pytest.approx(1.5 * -float(ev[0]), rel=1e-6)
    assert res.settings["damping_base"] == 0.15
    assert diag(res, "min_eigenvalue") == pytest.approx(0.5 * -float(ev[0]), rel=1e-6)
    big = run(saddle, ExactSettings(), damping=AutoDamping(base=1.0), queries=[0])
    assert big.settings["damping"] == 1.0  # already positive definite with margin: the base is kept
    flat = AutoDamping(floor=0.01).choose(lambda_min=0.001, lambda_max=10.0)
    assert flat == pytest.approx(0.099)  # λ_min(H + λI) = 0.01·λ_max: condition number ≤ 100


@pytest.mark.parametrize("kw, field", [({"safety": 1.0}, "safety"), ({"floor": 0.0}, "floor"),
                                       ({"base": -1.0}, "base"), ({"iters": 1}, "iters"), ({"seed": 0.5}, "seed")])
def test_auto_damping_arguments_are_validated(kw, field):
    with pytest.raises(InfluenceConfigError, match=rf"AutoDamping\.{field}="):
        AutoDamping(**kw)


def test_exact_warns_on_an_indefinite_system(saddle):
    with pytest.warns(RuntimeWarning, match=r"not positive definite.*damping ≥ [0-9.]+ or damping='auto'"):
        run(saddle, ExactSettings(), damping=0.0, queries=[0])


# --------------------------------------------------------------------------- spectral estimates
def test_power_iteration_and_trace_match_the_explicit_spectrum(saddle):
    h = dense_hessian(saddle)
    ev = torch.linalg.eigvalsh(h)
    a = h + 0.5 * torch.eye(len(h), dtype=h.dtype)  # positive definite
    mv = lambda v: v @ a  # noqa: E731  (rows)
    kw = dict(dtype=h.dtype, device=h.device)
    top = power_iteration(mv, len(h), iters=200, tol=1e-10, **kw)
    assert top.value == pytest.approx(float(ev[-1]) + 0.5, rel=1e-3)
    low = power_iteration(lambda v: v @ h, len(h), iters=500, tol=1e-12, shift=1.1 * float(ev[-1]), **kw)
    assert low.value == pytest.approx(float(ev[0]), rel=2e-2)
    lo, hi = lanczos_extremes(lambda v: v @ h, len(h), iters=40, **kw)
    assert lo.value == pytest.approx(float(ev[0]), rel=1e-3) and hi.value == pytest.approx(float(ev[-1]), rel=1e-3)
    tr = hutchinson_trace(mv, len(h), probes=256, **kw)
    assert abs(tr.value - float(a.trace())) < 4 * tr.stderr


# --------------------------------------------------------------------------- accuracy with defaults
@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_defaults_match_exact_on_logistic_regression(logreg):
    exact = run(logreg, ExactSettings())
    res = run(logreg, LissaSettings())  # the default: preconditioned by a low-rank Arnoldi approximation
    r = pearson(res.scores, exact.scores)
    assert r.median() >= 0.995, r
    assert diag(res, "preconditioner") == "arnoldi" and 0 < diag(res, "preconditioner/rank") <= 100
    assert diag(res, "converged") and diag(res, "scale") > 0 and diag(res, "batch_size") >= 64
    assert all(math.isfinite(v) and v < 0.05 for v in diag(res, "relative_stderr"))
    # Arnoldi's Krylov space checked the curvature: no Lanczos pass of LiSSA's own
    assert "curvature_check_passes" not in diag_names(res) and res.settings["lambda_min_estimate"] > 0
    assert res.settings["damping"] == logreg.damping and res.settings["damping_mode"] == "fixed"

    plain = run(logreg, LissaSettings(preconditioner=None))
    assert pearson(plain.scores, exact.scores).median() >= 0.995
    # reported setup cost of plain LiSSA: ≤ 60 Lanczos sweeps of the curvature check over 6 chunks of 256
    # examples, plus a few dozen minibatch power-iteration HVPs and one batched Hutchinson sweep
    assert diag(plain, "curvature_check_passes") <= 60 and diag(plain, "setup_hvps") <= 6 * 60 + 100
    assert plain.settings["lambda_min_estimate"] > 0  # logistic regression is convex
    # the preconditioned recursion resolves only a correction: a small fraction of the plain one's
    # minibatch HVPs (each carries all the queries), and fewer HVPs over the whole run as well
    assert diag(res, "steps_max") * 5 <= diag(plain, "steps_max"), (diag(res, "steps_max"), diag(plain, "steps_max"))
    assert diag(res, "hvp_calls") * 5 <= diag(plain, "hvp_calls")
    assert res.total_diagnostics()[0].value < plain.total_diagnostics()[0].value


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_a_preconditioner_fitted_on_a_subset_keeps_the_solve_exact(logreg):
    # Lanczos on 300 of the 1,347 examples: a rougher preconditioner, the same target (H + λI)⁻¹ v
    exact = run(logreg, ExactSettings())
    pre = ArnoldiSettings(tol=0.2, max_rank=100, ritz_tol=1e-2, max_examples=300)
    res = run(logreg, LissaSettings(preconditioner=pre))
    assert diag(res, "preconditioner/lanczos_examples") == 300
    assert pearson(res.scores, exact.scores).min() >= 0.995
    rel = (res.scores - exact.scores).norm(dim=1) / exact.scores.norm(dim=1)
    assert float(rel.max()) < 0.05, rel


@pytest.mark.slow
def test_defaults_match_exact_on_tanh_mlp(mlp):
    # nearly singular: the smallest eigenvalue of H + λI is ≈ 0.0003 (a cluster at λ_min(H) ≈ −0.0097)
    exact = run(mlp, ExactSettings())
    res = run(mlp, LissaSettings())
    r = pearson(res.scores, exact.scores)
    assert r.median() >= 0.995 and r.min() >= 0.99, r
    plain = run(mlp, LissaSettings(preconditioner=None))
    assert diag(res, "hvp_calls") < diag(plain, "hvp_calls")  # fewer minibatch HVPs than plain LiSSA


@pytest.fixture(scope="module")
def deep_tanh_mlp():
    """A 64-64-32-10 tanh MLP (6,570 parameters) trained the way users train (minibatch Adam with L2 1e-2,
    30 epochs): not at a minimum. Measured: λ_min(H) ≈ −0.054, automatic damping 0.083."""
    train, val = problems.digits(torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    problems.fit_adam(model, train, 1e-2, epochs=30)
    return problems.Problem(model, train, val, "auto")


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_unconverged_tanh_mlp_with_too_little_damping_is_refused_before_solving(deep_tanh_mlp):
    """The default LiSSA diverged here (damping = the L2 of 1e-2 plus 1e-2): now the preconditioner's Krylov
    space finds the negative curvature and the error names the damping that fixes it."""
    p = deep_tanh_mlp
    with pytest.raises(NegativeCurvatureError, match=r"damping ≥ 0\.0[5-9]|damping ≥ 0\.1"):
        compute_influence(p.model, p.train, p.val, query_indices=list(range(5)), solver=LissaSettings(), damping=0.02)


@pytest.mark.slow
def test_unconverged_tanh_mlp_default_damping_lissa_and_auto_match_cg(deep_tanh_mlp):
    """Measured: LiSSA vs CG Pearson min 0.9997 over 30 queries (13 s), auto (picks CG) 0.99999 (6 s)."""
    p, q = deep_tanh_mlp, list(range(30))
    lissa = compute_influence(p.model, p.train, p.val, query_indices=q, solver=LissaSettings())
    assert 0.04 < lissa.damping < 0.2 and torch.isfinite(lissa.scores).all()
    ref = compute_influence(p.model, p.train, p.val, query_indices=q, solver=CGSettings(tol=1e-6),
                            damping=lissa.damping)
    auto = compute_influence(p.model, p.train, p.val, query_indices=q)
    assert auto.settings["auto_choice"] == "cg"
    assert pearson(lissa.scores, ref.scores).min() >= 0.995
    assert pearson(auto.scores, ref.scores).min() >= 0.999


@pytest.mark.slow
def test_defaults_match_cg_on_relu_cnn():
    # 21,546 parameters, ReLU + max-pool, damping 0.1 (H + 0.1·I positive definite after the L-BFGS
    # polish, which the default curvature check confirms); CG to 1e-6 is the reference.
    p = problems.trained_cnn()
    queries = QUERIES[:8]
    res = run(p, LissaSettings(), queries=queries)
    assert res.settings["lambda_min_estimate"] + p.damping > 0
    ref = run(p, CGSettings(tol=1e-6), queries=queries)
    assert diag(ref, "converged")
    r = pearson(res.scores, ref.scores)
    assert r.median() >= 0.99, r


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_auto_scale_does_not_diverge_across_seeds(saddle, seed):
    # positive definite at λ = 0.5, with minibatches of 64 out of 256: the minibatch spectra vary a lot
    res = run(saddle, LissaSettings(seed=seed, batch_size=64, depth=100, repeats=1), damping=0.5, queries=list(range(6)))
    assert torch.isfinite(res.scores).all()
    assert max(max(h["y"]) for h in diag(res, "norm_history")) < 100


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_auto_scale_reaches_the_top_of_a_preconditioned_minibatch_system():
    """With the default (Arnoldi) preconditioner the minibatch system ``S(H_B + λI)S`` is the identity on
    almost all of its 40,010 dimensions (a linear classifier on 384 examples), with a few eigenvalues up to
    ≈ 1.3 from the minibatch's own curvature. A power iteration's Rayleigh quotient barely moves there and
    stopped at 1.003 after two products on every minibatch; the automatic scale must reach the top
    eigenvalue that 60 Lanczos steps find on fresh minibatches (else steps along those directions stop
    contracting, as on a 1M-parameter CNN: benchmarks/README.md)."""
    from lightning_influence.pipeline import bind, check_run_arguments, fit_inverse, frozen_module

    torch.manual_seed(0)
    d, n = 4000, 384
    model = nn.Linear(d, 10).double()
    x, y = torch.randn(n, d, dtype=torch.float64) / math.sqrt(d), torch.randint(0, 10, (n,))
    with frozen_module(model):
        problem = bind(model, TensorDataset(x, y), check_run_arguments(dtype=torch.float64))
        inverse = fit_inverse(problem, LissaSettings(), 0.01)
        op = problem.operator
        tops = []
        for i, batch in zip(range(3), op.minibatches(inverse.batch_size, seed=12345)):
            _, top = lanczos_extremes(lambda v: inverse._system(batch, v), op.num_params, iters=60, seed=i,
                                      dtype=op.dtype, device=op.device)
            tops.append(top.value)
    assert max(tops) > 1.2  # the outliers exist
    assert inverse.scale >= 0.95 * max(tops), (inverse.scale, tops)


# --------------------------------------------------------------------------- divergence
def test_bad_fixed_scale_raises_within_a_few_steps(logreg):
    with pytest.raises(SolverDivergedError, match=r"diverged at step \d:.*raise scale to at least") as err:
        run(logreg, LissaSettings(scale=0.05, depth=5000, repeats=1), queries=QUERIES[:2])
    assert "Norm history" in str(err.value)


def _undersized_setup(monkeypatch, factor: float):
    """Make the automatic scale's setup see minibatch spectra ``factor`` times too small (the first call of
    ``_minibatch_extremes``: an unlucky draw of sampled minibatches); later calls (the restarts) see the truth."""
    from lightning_influence.solvers.lissa import LissaSolver

    real, calls = LissaSolver._minibatch_extremes, [0]

    def once_too_small(self, batches):
        calls[0] += 1
        tops, radii = real(self, batches)
        return ([t * factor for t in tops], [r * factor for r in radii]) if calls[0] == 1 else (tops, radii)

    monkeypatch.setattr(LissaSolver, "_minibatch_extremes", once_too_small)
    return calls


def test_divergence_restarts_with_a_corrected_scale_and_matches_cg(saddle, monkeypatch):
    """A setup that underestimated the minibatch spectra by 20× gives a scale far below half their radius:
    the recursion grows, the solve restarts with the radius of the minibatches it grew on, records the
    restart and the scale it used, and converges to CG's answer."""
    calls = _undersized_setup(monkeypatch, 0.05)
    s = LissaSettings(batch_size=64, repeats=1, depth=3000, preconditioner=None)
    res = run(saddle, s, damping=0.5, queries=list(range(4)))
    assert calls[0] >= 2  # the restart measured the minibatches again
    assert diag(res, "restarts") >= 1
    first = diag(res, "scale")
    assert diag(res, "scale_used") >= 2 * first
    ref = run(saddle, CGSettings(tol=1e-8), damping=0.5, queries=list(range(4)))
    torch.testing.assert_close(res.scores, ref.scores, rtol=0.05, atol=0.05 * float(ref.scores.abs().max()))


def test_no_restarts_allowed_raises_naming_max_restarts(saddle, monkeypatch):
    _undersized_setup(monkeypatch, 0.05)
    s = LissaSettings(batch_size=64, repeats=1, depth=3000, preconditioner=None, max_restarts=0)
    with pytest.raises(SolverDivergedError, match=r"raised 0 time\(s\).*max_restarts=0.*solver='cg'"):
        run(saddle, s, damping=0.5, queries=list(range(4)))


def test_a_fixed_scale_never_restarts(logreg):
    with pytest.raises(SolverDivergedError, match="raise scale to at least"):
        run(logreg, LissaSettings(scale=0.05, depth=5000, repeats=1, max_restarts=3), queries=QUERIES[:2])


def test_nan_in_the_recursion_stops_at_that_step(saddle, monkeypatch):
    # an HVP that turns NaN at its 57th call (e.g. an overflow inside the model): the solve stops at step
    # 57 with the step, the query, the norm history and the likely cause, and no scores come back
    calls, real = [0], HessianOperator.batch_hvp

    def flaky(self, batch, vectors):
        calls[0] += 1
        out = real(self, batch, vectors)
        return out * float("nan") if calls[0] == 57 else out

    monkeypatch.setattr(HessianOperator, "batch_hvp", flaky)
    s = LissaSettings(scale=10.0, batch_size=64, depth=100, repeats=1, check_curvature=False, preconditioner=None)
    with pytest.raises(SolverDivergedError, match=r"diverged at step 57: the estimate for query 0 became NaN/inf"
                                                  r".*Norm history \(step: max ‖h‖/‖v‖\): .*, 57: nan\. Fix: "
                                                  r".*a Hessian-vector product returned NaN/inf.*float64"):
        run(saddle, s, damping=0.5, queries=[0, 1])


def test_negative_curvature_raises_naming_the_damping_and_auto_damping_converges(saddle):
    ev = torch.linalg.eigvalsh(dense_hessian(saddle))
    assert ev[0] < -0.1  # the problem really has negative curvature
    queries = list(range(8))
    with pytest.raises(NegativeCurvatureError, match=r"smallest Hessian eigenvalue is estimated at -0\.17.*"
                                                     r"Fix: damping ≥ ([0-9.]+)") as err:
        run(saddle, LissaSettings(repeats=1, preconditioner=None), damping=0.0, queries=queries)
    needed = float(err.value.args[0].split("damping ≥ ")[1].split(",")[0])
    assert needed >= 1.49 * -float(ev[0])  # a margin beyond |λ_min|, which Lanczos can understate

    res = run(saddle, LissaSettings(), damping="auto", queries=queries)
    lam = res.settings["damping"]
    assert res.settings["damping_mode"] == "auto" and lam > -float(ev[0]) and lam < 3 * -float(ev[0])
    assert res.record.damping.value == lam and "damping" not in diag_names(res)  # recorded once, in the record
    assert "curvature_check_passes" not in diag_names(res)  # reused the auto estimate
    exact = run(saddle, ExactSettings(), damping=lam, queries=queries)
    assert pearson(res.scores, exact.scores).median() >= 0.99


def test_negative_curvature_is_found_at_a_damping_that_hides_it(saddle):
    # λ = 0.97·|λ_min| leaves H + λI slightly indefinite (λ_min = −0.172): the recursion grows only by
    # ≈ 0.5 % per step along that direction, so without the check LiSSA returns numbers (as it did on the
    # Adam-trained CNN at λ = 0.1); with the check (the default) it refuses before solving.
    ev = torch.linalg.eigvalsh(dense_hessian(saddle))
    lam = -0.97 * float(ev[0])
    s = LissaSettings(repeats=1, depth=200, check_curvature=False, preconditioner=None)
    assert torch.isfinite(run(saddle, s, damping=lam, queries=[0, 1]).scores).all()
    with pytest.raises(NegativeCurvatureError, match=rf"with damping λ={lam:g}"):
        run(saddle, LissaSettings(repeats=1, depth=200, preconditioner=None), damping=lam, queries=[0, 1])
    # the default preconditioner's Krylov space finds it too, before any recursion step
    with pytest.raises(NegativeCurvatureError, match=rf"preconditioner's Krylov space.*with damping λ={lam:g}"):
        run(saddle, LissaSettings(repeats=1, depth=200), damping=lam, queries=[0, 1])


def test_divergence_without_the_check_is_diagnosed_as_negative_curvature(saddle):
    with pytest.raises(SolverDivergedError, match=r"diverged at step \d+:.*negative curvature.*use damping ≥"):
        run(saddle, LissaSettings(repeats=1, check_curvature=False, preconditioner=None), damping=0.0,
            queries=list(range(8)))


# --------------------------------------------------------------------------- repeats, seeds, chunks
def test_standard_error_shrinks_as_repeats_grow(saddle):
    def median_se(repeats):
        res = run(saddle, LissaSettings(depth=30, repeats=repeats, batch_size=64), damping=0.5,
                  queries=list(range(8)))
        return float(torch.tensor(diag(res, "relative_stderr")).median())

    se2, se8 = median_se(2), median_se(8)  # 8 repeats: 4× the samples
    assert se8 < 0.75 * se2, (se2, se8)  # ≈ 1/2 expected from 1/√R


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_standard_error_predicts_the_spread_of_the_scores(saddle):
    # eight independent one-repeat runs (seeds 0–7) give the actual spread of each query's score vector;
    # the standard error reported by one run with 8 repeats, times √8, must estimate it
    queries, s = list(range(8)), dict(depth=30, batch_size=64)
    single = torch.stack([run(saddle, LissaSettings(**s, repeats=1, seed=k), damping=0.5, queries=queries).scores
                          for k in range(8)])  # [runs, Q, N]
    actual = single.std(0).norm(dim=1) / single.mean(0).norm(dim=1)
    res = run(saddle, LissaSettings(**s, repeats=8, seed=100), damping=0.5, queries=queries)
    predicted = torch.tensor(diag(res, "relative_stderr"), dtype=torch.float64) * math.sqrt(8)
    ratio = predicted / actual
    assert 0.6 < float(ratio.median()) < 1.6 and bool(((ratio > 0.4) & (ratio < 2.5)).all()), (predicted, actual)


def test_results_do_not_depend_on_query_chunking_and_seed_reproduces(saddle):
    s = LissaSettings(repeats=2, max_depth=80, tol=0.1)  # per-query stopping: some queries stop early
    a = run(saddle, s, damping=0.5, queries=list(range(6)))
    b = run(saddle, s, damping=0.5, queries=list(range(6)), query_batch_size=2)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-9, atol=1e-12)
    assert torch.equal(a.scores, run(saddle, s, damping=0.5, queries=list(range(6))).scores)
    c = run(saddle, LissaSettings(repeats=2, max_depth=80, tol=0.1, seed=1), damping=0.5, queries=list(range(6)))
    assert not torch.equal(a.scores, c.scores)


def test_tangent_chunking_changes_only_speed(saddle):
    s = dict(repeats=1, depth=40, batch_size=64)
    a = run(saddle, LissaSettings(**s, tangent_chunk=None), damping=0.5, queries=list(range(12)))
    b = run(saddle, LissaSettings(**s, tangent_chunk=5), damping=0.5, queries=list(range(12)))
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-10, atol=1e-12)
    c = run(saddle, LissaSettings(**s), damping=0.5, queries=list(range(12)))  # "auto": timed, recorded
    assert diag(c, "tangent_chunk") in (12, 8)
    torch.testing.assert_close(a.scores, c.scores, rtol=1e-10, atol=1e-12)


def test_unconverged_depth_budget_warns(saddle):
    with pytest.warns(RuntimeWarning, match="max_depth=50 before converging"):
        run(saddle, LissaSettings(max_depth=50, tol=1e-6, repeats=1), damping=0.5, queries=[0, 1])
