"""Arnoldi (low-rank Lanczos) inverse against exact answers in float64: full rank equals the dense solve,
partial rank obeys the documented error bound, automatic damping from the same Krylov space, accuracy of
scores and self-influence on digits, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence.curvature.damping import AutoDamping
from lightning_influence.data import ExampleSource
from lightning_influence.errors import InfluenceConfigError, NegativeCurvatureError
from lightning_influence.objective import Objective
from lightning_influence.problem import InfluenceProblem
from lightning_influence.solvers.arnoldi import ArnoldiInverse, ArnoldiSettings
from lightning_influence.curvature.spectral import Lanczos

from .. import problems
from ..problems import pearson_rows as pearson

F64 = torch.float64


def make_problem(model: nn.Module, train: TensorDataset) -> InfluenceProblem:
    obj = Objective(model, dtype=F64)
    return InfluenceProblem(obj, ExampleSource(train, None, obj.prepare_batch), chunk_size=512)


def saddle_problem(n: int = 256, seed: int = 0) -> InfluenceProblem:
    """A tanh MLP (83 parameters) at its random initial weights: indefinite Hessian (λ_min ≈ −0.17)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(n, 6, dtype=F64), torch.randint(0, 3, (n,))
    return make_problem(model, TensorDataset(x, y))


def small_logreg(n: int = 200) -> InfluenceProblem:
    """Logistic regression on 200 digits (650 parameters), a few L-BFGS steps: PSD Hessian."""
    torch.manual_seed(0)
    train, _ = problems.digits(F64, n)
    model = problems.fit_lbfgs(problems.logistic_regression().double(), train, 1e-2, max_iter=50)
    return make_problem(model, train)


@pytest.fixture(scope="module")
def saddle():
    prob = saddle_problem()
    h = prob.operator.dense()
    return prob, h, torch.linalg.eigvalsh(h)


@pytest.fixture(scope="module")
def logreg():
    prob = small_logreg()
    h = prob.operator.dense()
    return prob, h, torch.linalg.eigvalsh(h)


def exact_inverse(h: torch.Tensor, lam: float, v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(h + lam * torch.eye(len(h), dtype=h.dtype), v.T).T


def rhs(p: int, q: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randn(q, p, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --------------------------------------------------------------------------- the shared Lanczos routine
def test_lanczos_ritz_residuals_are_the_true_residuals():
    a = torch.randn(60, 60, generator=torch.Generator().manual_seed(0), dtype=F64)
    h = a @ a.T / 60
    lz = Lanczos(lambda v: v @ h, 60, dtype=F64, device=torch.device("cpu"), seed=3)
    assert lz.extend(25) == 25 and lz.steps == 25
    q = lz.basis
    assert torch.allclose(q @ q.T, torch.eye(25, dtype=F64), atol=1e-12)
    assert torch.allclose(q @ h @ q.T, lz.tridiagonal(), atol=1e-10)
    theta, s, res = lz.ritz()
    y = s.T @ q
    true = (y @ h - theta[:, None] * y).norm(dim=1)
    assert torch.allclose(res, true, atol=1e-9)
    # extremes never overshoot (up to round-off: a converged extreme Ritz value equals the eigenvalue)
    ev = torch.linalg.eigvalsh(h)
    slack = 1e-10 * float(ev.abs().max())
    assert float(ev[0]) <= float(theta[0]) + slack and float(theta[-1]) <= float(ev[-1]) + slack


# --------------------------------------------------------------------------- exactness
def test_full_rank_equals_dense_solve(saddle):
    prob, h, ev = saddle
    p = prob.num_params
    lam = 0.5  # > |λ_min| ≈ 0.17: H + λI positive definite
    inv = ArnoldiSettings(rank=p, max_rank=p).fit(prob, lam)
    assert isinstance(inv, ArnoldiInverse) and inv.rank == p and inv.converged
    v = rhs(p)
    assert torch.allclose(inv.apply(v), exact_inverse(h, lam, v), rtol=1e-8, atol=1e-9)
    assert torch.allclose(inv.eigenvalues.sort().values, ev, atol=1e-9)
    # the 9 null directions of the softmax layer (eigenvalue 0, multiplicity 9) need restarts
    assert inv.damping_record["spectrum_passes"] == p
    assert inv.damping == lam and inv.damping_record["damping_mode"] == "fixed"


def test_max_examples_fits_the_subset_hessian(saddle):
    prob, h, _ = saddle
    p = prob.num_params
    st = ArnoldiSettings(rank=p, max_rank=p, max_examples=100, seed=3)
    sub = prob.subsample(100, seed=3)
    assert sub.num_examples == 100 and bool((sub.train.indices.diff() > 0).all())  # dataset order, no repeats
    assert prob.subsample(10_000, seed=3) is prob  # nothing to drop
    h_sub = sub.operator.dense()
    assert not torch.allclose(h_sub, h, atol=1e-3)  # a different Hessian: the test can tell them apart
    inv = st.fit(prob, 0.5)
    v = rhs(p)
    assert torch.allclose(inv.apply(v), exact_inverse(h_sub, 0.5, v), rtol=1e-8, atol=1e-9)
    seen = {d.name: d.value for d in inv.setup}["lanczos_examples"]
    assert seen == 100


def test_partial_rank_obeys_the_bound_psd(logreg):
    prob, h, ev = logreg
    lam, k = 0.01, 40
    inv = ArnoldiSettings(rank=k).fit(prob, lam)
    assert inv.rank == k and inv.converged
    mu_next = float(ev.flip(0)[k])  # (k+1)-th largest eigenvalue
    bound = mu_next / (lam * (mu_next + lam))
    v = rhs(prob.num_params)
    err = (inv.apply(v) - exact_inverse(h, lam, v)).norm(dim=1)
    assert (err <= bound * v.norm(dim=1) * (1 + 1e-6) + 1e-8).all()
    # the reported estimate is the same number here (the pairs have converged)
    assert inv.error_bound == pytest.approx(bound, rel=1e-3)
    # spectral norm of the error: the bound is attained
    eye = torch.eye(prob.num_params, dtype=F64)
    full = torch.linalg.matrix_norm(inv.apply(eye) - exact_inverse(h, lam, eye), ord=2)
    assert float(full) == pytest.approx(bound, rel=1e-6)
    assert bound < 1 / lam


def test_partial_rank_bound_indefinite(saddle):
    """With negative curvature the pairs are ranked by |μ|/|μ + λ| and the bound is the largest
    discarded one over λ."""
    prob, h, ev = saddle
    lam, k = 0.3, 20
    inv = ArnoldiSettings(rank=k).fit(prob, lam)
    impact = ev.abs() / (ev + lam).abs()
    bound = float(impact.sort(descending=True).values[k]) / lam
    eye = torch.eye(prob.num_params, dtype=F64)
    full = float(torch.linalg.matrix_norm(inv.apply(eye) - exact_inverse(h, lam, eye), ord=2))
    assert full <= bound * (1 + 1e-6) + 1e-8
    assert full == pytest.approx(bound, rel=1e-4)
    assert float(inv.eigenvalues.min()) < 0  # a negative eigenvalue near −λ was kept


def test_inverse_sqrt_and_quadratic(logreg):
    prob, _, _ = logreg
    inv = ArnoldiSettings(rank=30).fit(prob, 0.05)
    v = rhs(prob.num_params)
    assert torch.allclose(inv.apply_inverse_sqrt(inv.apply_inverse_sqrt(v)), inv.apply(v), rtol=1e-9, atol=1e-9)
    q, diags = inv.quadratic(v)
    assert torch.allclose(q, (v * inv.apply(v)).sum(1), rtol=1e-9)
    assert diags == []
    assert torch.allclose(inv.solve(v).solution, inv.apply(v))


def test_same_seed_same_inverse_memory_k_by_p(saddle):
    prob, _, _ = saddle
    a = ArnoldiSettings(rank=10, seed=4).fit(prob, 0.5)
    b = ArnoldiSettings(rank=10, seed=4).fit(prob, 0.5)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)
    assert a.eigenvectors.shape == (10, prob.num_params)


# --------------------------------------------------------------------------- damping and the automatic rank
def test_auto_damping_from_the_krylov_extremes(saddle):
    prob, _, ev = saddle
    rule = AutoDamping()
    before = prob.operator.hvp_calls
    inv = ArnoldiSettings(rank=10).fit(prob, rule)
    passes = inv.damping_record["spectrum_passes"]
    assert prob.operator.hvp_calls - before == passes  # one sweep (one chunk here) per Lanczos step, no more
    assert passes >= rule.iters
    want = rule.choose(float(ev[0]), float(ev[-1]))
    assert inv.damping == pytest.approx(want, rel=1e-6)
    rec = inv.damping_record
    assert rec["damping_mode"] == "auto" and rec["damping"] == inv.damping
    # Ritz extremes never overshoot
    assert rec["lambda_min_estimate"] >= float(ev[0]) - 1e-12 and rec["lambda_max_estimate"] <= float(ev[-1]) + 1e-12
    assert ev[0] < 0 and float((inv.eigenvalues + inv.damping).min()) > 0
    names = {d.name for d in inv.setup}
    assert {"rank", "eigenvalue_largest", "eigenvalue_smallest", "lanczos_passes", "error_bound", "fit_seconds"} <= names
    assert not names & {"damping", "damping_mode", "lambda_min_estimate"}  # the damping is in the record, once


def test_auto_rank_meets_its_tolerance(logreg):
    prob, h, ev = logreg
    lam, tol = 0.05, 0.1
    inv = ArnoldiSettings(tol=tol).fit(prob, lam)
    want = int((ev / (ev + lam) > tol).sum())
    assert inv.converged and abs(inv.rank - want) <= 2
    eye = torch.eye(prob.num_params, dtype=F64)
    err = float(torch.linalg.matrix_norm(inv.apply(eye) - exact_inverse(h, lam, eye), ord=2))
    assert err * lam <= tol * 1.05  # error relative to 1/λ within tol (up to the rank's ±2)


def test_max_rank_caps_the_automatic_rank(logreg):
    prob, _, _ = logreg
    with pytest.warns(RuntimeWarning, match="after 30 Lanczos steps"):  # the 15th pair is interior: slow
        inv = ArnoldiSettings(tol=1e-3, max_rank=15).fit(prob, 0.01)
    assert inv.rank == 15 and not inv.converged
    diag = {d.name: d.value for d in inv.setup}
    assert diag["lanczos_passes"] == 30 and diag["converged"] is False
    assert diag["rank_capped"] is True


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kw, field",
    [({"rank": 0}, "rank"), ({"rank": "big"}, "rank"), ({"rank": 2.5}, "rank"), ({"max_rank": 0}, "max_rank"),
     ({"rank": 300}, "rank"), ({"tol": 0}, "tol"), ({"tol": 1.0}, "tol"), ({"tol": float("nan")}, "tol"),
     ({"krylov_factor": 0.5}, "krylov_factor"), ({"block": 0}, "block"), ({"ritz_tol": -1.0}, "ritz_tol"),
     ({"seed": 1.5}, "seed"), ({"rank": True}, "rank"), ({"max_examples": 0}, "max_examples"),
     ({"max_examples": 2.5}, "max_examples")],
)
def test_settings_are_validated_naming_the_field(kw, field):
    with pytest.raises(InfluenceConfigError, match=rf"ArnoldiSettings\.{field}="):
        ArnoldiSettings(**kw)


def test_settings_serialise():
    d = ArnoldiSettings().to_dict()
    assert d["solver"] == "arnoldi" and d["rank"] == "auto" and d["max_rank"] == 200


def test_fixed_damping_with_negative_curvature_names_the_fix(saddle):
    prob, _, ev = saddle
    with pytest.raises(NegativeCurvatureError, match=r"damping ≥ [0-9.]+") as info:
        ArnoldiSettings(rank=10).fit(prob, 0.01)
    need = float(str(info.value).split("damping ≥ ")[1].split(",")[0])
    assert need > -float(ev[0])


def test_zero_damping_needs_full_rank(logreg, saddle):
    prob, _, _ = logreg
    before = prob.operator.hvp_calls
    with pytest.raises(InfluenceConfigError, match="damping=0 .* needs λ > 0"):
        ArnoldiSettings(rank=5).fit(prob, 0.0)
    assert prob.operator.hvp_calls == before  # raised before any product
    # at full rank there is no complement: λ = 0 is fine for a positive definite H (here H + 0.5·I)
    sp, h, _ = saddle
    p = sp.num_params

    class Shifted:  # the saddle problem's Hessian plus 0.5·I, as an operator
        def __getattr__(self, name):
            return getattr(sp, name)

        @property
        def operator(self):
            class Op:
                hvp_calls = 0

                @staticmethod
                def full_hvp(v):
                    return sp.operator.full_hvp(v) + 0.5 * v
            return Op()

    inv = ArnoldiSettings(rank=p, max_rank=p).fit(Shifted(), 0.0)  # type: ignore[arg-type]
    v = rhs(p)
    assert torch.allclose(inv.apply(v), exact_inverse(h, 0.5, v), rtol=1e-8, atol=1e-9)


# --------------------------------------------------------------------------- accuracy on digits
def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().to(F64), b.argsort().argsort().to(F64)
    return float(pearson(ra[None], rb[None])[0])


@pytest.mark.slow
def test_digits_logreg_scores_and_self_influence_match_exact():
    """Defaults (automatic rank, here capped at max_rank=200 of 650) at λ = 0.01: measured Pearson of the
    scores ≥ 0.9997 per query, Spearman of self-influence 0.99999 (340 Lanczos passes, ≈ 20 s)."""
    p = problems.trained_logreg()
    prob = make_problem(p.model, p.train)
    lam = 0.01
    h = prob.operator.dense()
    inv = ArnoldiSettings().fit(prob, lam)
    obj = prob.objective
    val = ExampleSource(p.val, None, obj.prepare_batch)
    gq = torch.cat([prob.example_grads(b) for _, b in val.chunks(512)])[list(range(0, 450, 45))]
    gt = torch.cat([g for _, _, g in prob.grad_chunks()])
    exact, approx = -(exact_inverse(h, lam, gq) @ gt.T), -(inv.apply(gq) @ gt.T)
    r = pearson(exact, approx)
    self_exact = -(gt * exact_inverse(h, lam, gt)).sum(1)
    self_approx = -inv.quadratic(gt)[0]
    rho = spearman(self_exact, self_approx)
    print(f"rank {inv.rank}, passes {inv.damping_record['spectrum_passes']}, pearson min {float(r.min()):.5f}, "
          f"self-influence spearman {rho:.5f}")
    assert float(r.min()) >= 0.99 and rho >= 0.99
    assert not math.isnan(inv.error_bound)
