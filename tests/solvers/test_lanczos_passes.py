"""How many Lanczos passes the Arnoldi solver and the Arnoldi preconditioner spend: they stop as soon as
their criterion is met (float64, explicit Hessians, tolerances on every comparison)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import ArnoldiSettings, CGSettings
from lightning_influence.curvature.spectral import Lanczos
from lightning_influence.data import ExampleSource
from lightning_influence.objective import Objective
from lightning_influence.problem import InfluenceProblem

from .test_arnoldi import exact_inverse, rhs, small_logreg

F64 = torch.float64


def few_large_eigenvalues(n: int = 400, d: int = 40, seed: int = 0) -> InfluenceProblem:
    """Least squares ``½(wᵀx + b − y)²`` with inputs whose covariance has four large directions (variances
    100, 64, 36, 16) and 36 tiny ones (1e-4): ``H = E[x̃x̃ᵀ]`` has five eigenvalues ≥ ~0.5 (with the bias)
    and 36 ≤ ~1e-4."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.cat([torch.tensor([10.0, 8.0, 6.0, 4.0], dtype=F64), torch.full((d - 4,), 1e-2, dtype=F64)])
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    x = (torch.randn(n, d, generator=g, dtype=F64) * scales) @ basis.T
    y = torch.randn(n, 1, generator=g, dtype=F64)
    model = nn.Linear(d, 1).double()
    obj = Objective(model, loss_fn=lambda out, t: 0.5 * (out - t).square().sum(1), dtype=F64)
    return InfluenceProblem(obj, ExampleSource(TensorDataset(x, y), None, obj.prepare_batch), chunk_size=512)


def test_ritz_of_an_earlier_step_is_that_steps_ritz():
    a = torch.randn(50, 50, generator=torch.Generator().manual_seed(1), dtype=F64)
    h = a @ a.T / 50
    mv = lambda v: v @ h  # noqa: E731
    long, short = (Lanczos(mv, 50, dtype=F64, device=torch.device("cpu"), seed=2) for _ in range(2))
    long.extend(30)
    short.extend(12)
    for got, want in zip(long.ritz(12), short.ritz()):
        assert torch.allclose(got.abs(), want.abs(), rtol=1e-9, atol=1e-12)  # eigenvector signs are free
    assert torch.allclose(long.tridiagonal(12), short.tridiagonal(), atol=1e-12)


def test_automatic_rank_stops_once_met_with_the_right_eigenvalues():
    prob = few_large_eigenvalues()
    ev = torch.linalg.eigvalsh(prob.operator.dense()).flip(0)
    lam = 0.1
    want = int((ev / (ev + lam) > 0.05).sum())
    assert want == 5 and float(ev[want]) < 1e-3  # the problem is what it says
    st = ArnoldiSettings()
    inv = st.fit(prob, lam)
    diag = {d.name: d.value for d in inv.setup}
    old_cap = min(prob.num_params, int(st.krylov_factor * st.max_rank))  # what the product cap allows: 41
    # the first check (20 products) meets the rule and the rank is the same 5 products earlier: stop there
    # (it took 40 before: two blocks of 20, the rank compared between them)
    assert inv.converged and diag["lanczos_stop"] == "converged"
    assert diag["lanczos_passes"] <= 25 < old_cap
    assert inv.rank == want
    assert torch.allclose(inv.eigenvalues.sort(descending=True).values, ev[:want], rtol=1e-8, atol=1e-10)
    v = rhs(prob.num_params)
    h = prob.operator.dense()
    err = (inv.apply(v) - exact_inverse(h, lam, v)).norm(dim=1) / exact_inverse(h, lam, v).norm(dim=1)
    assert float(err.max()) < 0.05


@pytest.fixture(scope="module")
def logreg():
    prob = small_logreg()
    return prob, prob.operator.dense()


def test_preconditioner_stops_early_and_the_solve_stays_exact(logreg):
    """The preconditioner's gain test stops Lanczos before the old rule did; preconditioned CG's answer is
    the exact damped solve either way (the same as with the old, longer Lanczos run)."""
    prob, h = logreg
    lam = 0.01
    v = rhs(prob.num_params, q=5)
    want = exact_inverse(h, lam, v)
    new = ArnoldiSettings.as_preconditioner()
    old = ArnoldiSettings(tol=0.2, max_rank=100, ritz_tol=1e-2, max_examples=4096, check_every=20)  # no gain test
    out = {}
    for label, pre in (("new", new), ("old", old)):
        before = prob.operator.hvp_calls
        inv = CGSettings(tol=1e-10, preconditioner=pre).fit(prob, lam)
        res = inv.solve(v)
        d = {x.name: x.value for x in inv.setup if x.source == "preconditioner"}
        it = {x.name: x.value for x in res.diagnostics}["iterations"]
        out[label] = (d["lanczos_passes"], d["lanczos_stop"], it, prob.operator.hvp_calls - before)
        err = (res.solution - want).norm(dim=1) / want.norm(dim=1)
        assert float(err.max()) < 1e-7, (label, err)
    (p_new, stop_new, _, h_new), (p_old, stop_old, _, h_old) = out["new"], out["old"]
    assert stop_old != "gain" and p_old >= 100  # the old run went to its cap or to full convergence
    # measured: 140 passes against 160, 9 CG iterations against 8, 150 batched HVPs against 169
    assert stop_new == "gain" and p_new < p_old, out
    assert h_new < h_old, out  # fewer products over the whole fit and solve


def test_named_preconditioner_stops_on_gain_for_cg_not_for_lissa():
    from lightning_influence import LissaSettings

    assert CGSettings(preconditioner="arnoldi").composed().by.gain_tol == 0.25
    assert LissaSettings().composed().by.gain_tol is None  # LiSSA's steps grow with κ, not √κ
    own = ArnoldiSettings(max_rank=50, gain_tol=0.1)
    assert LissaSettings(preconditioner=own).composed().by == own  # a user's settings are kept as given
