"""Regression needs its own per-example loss: the default cross-entropy is refused with an error that says
so and shows the fix, and the loss it suggests gives the closed-form least-squares influence."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import InfluenceConfigError, compute_influence

SUGGESTED = "loss_fn=lambda out, y: ((out - y.view_as(out)) ** 2).reshape(len(out), -1).sum(1)"


def regression_data(n: int = 40, d: int = 3, flat: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return TensorDataset(x, y if flat else y[:, None])


class Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).squeeze(-1)


@pytest.mark.parametrize("flat", [False, True], ids=["outputs [B, 1]", "outputs [B]"])
def test_default_loss_refuses_regression_and_names_the_fix(flat):
    model = Flat() if flat else nn.Linear(3, 1).double()
    with pytest.raises(InfluenceConfigError) as err:
        compute_influence(model, regression_data(flat=flat), num_queries=2, solver="exact", dtype=torch.float64)
    msg = str(err.value)
    assert "the default loss_fn is per-example cross-entropy for classification" in msg
    assert "outputs [4" in msg and "targets [4" in msg  # the shapes it saw
    assert SUGGESTED in msg and "influence_loss(self, batch)" in msg


def test_soft_label_classification_still_takes_the_default_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=g)
    soft = torch.softmax(torch.randn(30, 3, generator=g), dim=1)  # floating targets, 3 classes
    res = compute_influence(nn.Linear(4, 3), TensorDataset(x, soft), num_queries=2, solver="exact")
    assert bool(torch.isfinite(res.scores).all()) and res.settings["loss"] == "default_loss_fn"


def test_the_suggested_loss_gives_least_squares_influence():
    data = regression_data()
    model = nn.Linear(3, 1).double()
    lam = 0.1
    res = compute_influence(model, data, query_indices=[0, 5], solver="exact", damping=lam, dtype=torch.float64,
                            loss_fn=lambda out, y: ((out - y) ** 2).reshape(len(out), -1).sum(1))
    x, y = data.tensors
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # weight then bias, the parameter order
    w = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    grads = 2 * (xt @ w - y[:, 0])[:, None] * xt  # ∇ (w·x̃ − y)²
    hessian = 2 * xt.T @ xt / len(x) + lam * torch.eye(4, dtype=x.dtype)
    expected = -grads[[0, 5]] @ torch.linalg.solve(hessian, grads.T)
    torch.testing.assert_close(res.scores, expected)
    assert res.settings["loss"] == "<lambda>"  # a custom loss is recorded by name
