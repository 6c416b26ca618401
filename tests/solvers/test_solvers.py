"""Numbers against exact answers: closed-form logistic-regression Hessian, CG and LiSSA against exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_influence import CGSettings, ExactSettings, LissaSettings, compute_influence

from ..problems import Problem, diag, trained_logreg


def closed_form_scores(p: Problem, query_indices) -> torch.Tensor:
    """I_up,loss for multinomial logistic regression from closed forms, independent of the package:
    H = (1/n) Σ_i (diag(p_i) − p_i p_iᵀ) ⊗ x̃_i x̃_iᵀ + λI with x̃ = [x, 1]; ∇L = (p − e_y) ⊗ x̃."""
    w, b = p.model.weight.detach(), p.model.bias.detach()
    x, y = p.train.tensors
    xq, yq = p.val.tensors[0][query_indices], p.val.tensors[1][query_indices]

    def grads(x, y):
        r = torch.softmax(x @ w.T + b, 1) - F.one_hot(y, 10).double()  # [B, 10]
        xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # [B, 65]
        g = r[:, :, None] * xt[:, None, :]  # [B, 10, 65]
        return torch.cat([g[:, :, :64].reshape(len(x), -1), g[:, :, 64]], 1)  # package order: W row-major, b

    prob = torch.softmax(x @ w.T + b, 1)
    a = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]  # [n, 10, 10]
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    h4 = torch.einsum("icd,ij,ik->cjdk", a, xt, xt) / len(x)  # [10, 65, 10, 65]
    perm = torch.cat([torch.arange(10)[:, None] * 65 + torch.arange(64), (torch.arange(10) * 65 + 64)[:, None]], 1)
    order = torch.cat([perm[:, :64].reshape(-1), perm[:, 64]])
    h = h4.reshape(650, 650)[order][:, order] + p.damping * torch.eye(650, dtype=torch.float64)
    s = torch.linalg.solve(h, grads(xq, yq).T).T
    return -(s @ grads(x, y).T)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def rowwise(a: torch.Tensor, b: torch.Tensor):
    """Per-row cosine and Pearson correlation."""
    cos = F.cosine_similarity(a, b, dim=1)
    ac, bc = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return cos, F.cosine_similarity(ac, bc, dim=1)


QUERIES = list(range(0, 450, 45))


def run(p: Problem, solver, **kw):
    return compute_influence(p.model, p.train, p.val, query_indices=QUERIES, solver=solver, damping=p.damping,
                             dtype=torch.float64, **kw)


@pytest.fixture(scope="module")
def exact_logreg(logreg):
    return run(logreg, ExactSettings())


def test_exact_matches_closed_form_hessian(logreg, exact_logreg):
    expected = closed_form_scores(logreg, QUERIES)
    assert rel_err(exact_logreg.scores, expected) < 1e-8


def test_cg_matches_exact(logreg, exact_logreg):
    res = run(logreg, CGSettings(tol=1e-10))
    assert rel_err(res.scores, exact_logreg.scores) < 1e-5
    assert diag(res, "converged") and diag(res, "max_relative_residual") <= 1e-10


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_lissa_matches_exact_logreg(logreg, exact_logreg):
    res = run(logreg, LissaSettings(depth=3000, batch_size=128, scale=3.0, repeats=2, seed=1, preconditioner=None))
    cos, r = rowwise(res.scores, exact_logreg.scores)
    assert cos.median() >= 0.99 and r.median() >= 0.99, (cos, r)


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_lissa_matches_exact_tanh_mlp(mlp):
    exact = run(mlp, ExactSettings())
    res = run(mlp, LissaSettings(depth=3000, batch_size=128, scale=10.0, repeats=2, seed=1, preconditioner=None))
    cos, r = rowwise(res.scores, exact.scores)
    assert cos.median() >= 0.99 and r.median() >= 0.99, (cos, r)


@pytest.fixture(scope="module")
def small_logreg() -> Problem:
    return trained_logreg(n_train=300)


def test_solvers_agree_on_self_influence(small_logreg):
    p = small_logreg
    exact = run(p, ExactSettings(), self_influence=True)
    cg = run(p, CGSettings(tol=1e-10), self_influence=True)
    assert rel_err(cg.self_influence, exact.self_influence) < 1e-5
    assert (exact.self_influence <= 0).all()  # −gᵀ(H+λI)⁻¹g with a positive definite H + λI
    # self-influence of example i equals the diagonal of the score matrix when queries = training examples
    sub = compute_influence(p.model, p.train, None, query_indices=[3, 17, 200], solver=ExactSettings(),
                            damping=p.damping, dtype=torch.float64)
    torch.testing.assert_close(sub.scores[[0, 1, 2], [3, 17, 200]], exact.self_influence[[3, 17, 200]])


@pytest.mark.parametrize("solver", [ExactSettings(), LissaSettings(depth=200, scale=5.0, seed=3)])
@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_chunk_and_query_batch_size_do_not_change_scores(small_logreg, solver):
    a = run(small_logreg, solver, chunk_size=1000, query_batch_size=None)
    b = run(small_logreg, solver, chunk_size=97, query_batch_size=3)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-9, atol=1e-9)


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_lissa_same_seed_identical_other_seed_different(logreg):
    s = LissaSettings(depth=100, scale=5.0, batch_size=32, seed=7)
    a, b = run(logreg, s), run(logreg, s)
    assert torch.equal(a.scores, b.scores)
    c = run(logreg, LissaSettings(depth=100, scale=5.0, batch_size=32, seed=8))
    assert not torch.equal(a.scores, c.scores)


def test_float32_default_close_to_float64(logreg, exact_logreg):
    model32 = type(logreg.model)(64, 10)
    model32.load_state_dict({k: v.float() for k, v in logreg.model.state_dict().items()})
    res = compute_influence(model32, logreg.train, logreg.val, query_indices=QUERIES, solver="exact",
                            damping=logreg.damping)
    assert res.scores.dtype == torch.float32
    assert rel_err(res.scores.double(), exact_logreg.scores) < 1e-4


def test_cg_stopped_unconverged_warns_with_the_residual(small_logreg):
    with pytest.warns(RuntimeWarning, match=r"CG stopped at max_iter=2 before converging: the largest relative "
                                            r"residual ‖\(H\+λI\)x − v‖/‖v‖ is [0-9.e-]+ > tol=1e-06"):
        res = run(small_logreg, CGSettings(max_iter=2))
    assert not diag(res, "converged") and diag(res, "max_relative_residual") > 1e-6


def test_preconditioned_cg_matches_exact_in_fewer_iterations(logreg, exact_logreg):
    plain = run(logreg, CGSettings(tol=1e-8))
    pre = run(logreg, CGSettings(tol=1e-8, preconditioner="arnoldi"))
    assert rel_err(pre.scores, exact_logreg.scores) < 1e-6
    assert diag(pre, "iterations") < diag(plain, "iterations") / 2, (diag(pre, "iterations"), diag(plain, "iterations"))
