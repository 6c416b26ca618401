"""The linear datamodeling score on problems with known answers: synthetic outputs that are (or are not) the
sum of the scores, and ridge regression retrained in closed form on random halves, where influence is the
exact first-order answer and the LDS is near 1."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_influence import InfluenceConfigError, compute_influence
from lightning_influence.index.lds import linear_datamodeling_score, predicted_outputs, spearman, subset_masks


def test_spearman_against_hand_computed_ranks():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 2.0, 5.0]])
    b = torch.tensor([[10.0, 30.0, 20.0, 40.0], [4.0, 3.0, 2.0, 1.0]])
    # row 0: ranks (0,1,2,3) vs (0,2,1,3): 1 - 6·2/(4·15) = 0.8; row 1 with a tie: ranks (0,1.5,1.5,3) vs (3,2,1,0)
    r1 = torch.tensor([0, 1.5, 1.5, 3], dtype=torch.float64) - 1.5
    r2 = torch.tensor([3.0, 2, 1, 0], dtype=torch.float64) - 1.5
    expected = float((r1 * r2).sum() / (r1.norm() * r2.norm()))
    got = spearman(a, b)
    assert abs(float(got[0]) - 0.8) < 1e-12 and abs(float(got[1]) - expected) < 1e-12


def test_subsets_have_the_fraction_and_depend_on_the_seed_only():
    m = subset_masks(30, 7, 0.5, seed=1)
    assert m.shape == (7, 30) and m.sum(1).tolist() == [15] * 7
    assert torch.equal(m, subset_masks(30, 7, 0.5, seed=1)) and not torch.equal(m, subset_masks(30, 7, 0.5, seed=2))
    with pytest.raises(InfluenceConfigError, match="fraction=0 must be in"):
        subset_masks(30, 7, 0)


def test_lds_is_one_for_outputs_that_are_the_sum_and_near_zero_for_unrelated_ones():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=gen, dtype=torch.float64)
    masks = subset_masks(50, 40, 0.5, seed=0)
    outputs = 3.0 + 0.02 * predicted_outputs(scores, masks).T  # the predicted loss itself (positive scale)
    lds, per_query = linear_datamodeling_score(scores, masks, outputs)
    assert abs(lds - 1.0) < 1e-12 and per_query.shape == (4,)
    lds_flipped, _ = linear_datamodeling_score(-scores, masks, outputs)  # the wrong sign: -1
    assert abs(lds_flipped + 1.0) < 1e-12
    unrelated = torch.randn(40, 4, generator=gen, dtype=torch.float64)
    assert abs(linear_datamodeling_score(scores, masks, unrelated)[0]) < 0.3


def test_lds_of_exact_influence_on_ridge_regression_is_near_one():
    """Ridge regression: the retrained model on each half in closed form, the influence scores from
    compute_influence (exact solver, damping = the ridge weight). The loss of a test point is a smooth function of
    the subset weights, so the first-order prediction ranks the subsets almost as retraining does, for test points
    whose residual is not near zero: at a residual r the loss change is r·Δf + ½Δf², and for r ≈ 0 the
    second-order term the scores leave out dominates (one such point here has a per-query LDS of 0.08). So the
    queries are the 5 highest-loss test points."""
    gen = torch.Generator().manual_seed(0)
    n, d, lam = 80, 5, 0.1
    x = torch.randn(n + 10, d, generator=gen, dtype=torch.float64)
    w_true = torch.randn(d, 1, generator=gen, dtype=torch.float64)
    y = x @ w_true + 0.5 * torch.randn(n + 10, 1, generator=gen, dtype=torch.float64)
    train = torch.utils.data.TensorDataset(x[:n], y[:n])
    test = torch.utils.data.TensorDataset(x[n:], y[n:])

    def fit(rows):  # argmin (1/|S|) Σ_S ½(xᵀw − y)² + ½λ‖w‖²
        xs, ys = x[rows], y[rows]
        gram = xs.T @ xs / len(rows) + lam * torch.eye(d, dtype=torch.float64)
        return torch.linalg.solve(gram, xs.T @ ys / len(rows))

    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(fit(torch.arange(n)).T)

    def loss_fn(out, target):
        return 0.5 * (out - target).squeeze(-1) ** 2

    res = compute_influence(model, train, test, num_queries=5, loss_fn=loss_fn, solver="exact",
                            damping=lam, dtype=torch.float64)
    masks = subset_masks(n, 30, 0.5, seed=0)
    q = n + res.query_indices
    outputs = torch.stack([(0.5 * (x[q] @ fit(m.nonzero().squeeze(1)) - y[q]) ** 2).squeeze(1) for m in masks])
    lds, per_query = linear_datamodeling_score(res.scores, masks, outputs)
    assert lds > 0.9, per_query  # measured: 0.961 (per query 0.935..0.983)
