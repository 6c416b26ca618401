"""Self-influence from every solver against the exact one, and the Fisher-label contract of the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from torchmetrics.functional import spearman_corrcoef

from lightning_influence import EKFACSettings, compute_influence
from lightning_influence.data import ExampleSource
from lightning_influence.objective import Objective
from lightning_influence.problem import InfluenceProblem


def self_influence(p, solver, dtype=torch.float64):
    return compute_influence(p.model, p.train, p.val, query_indices=[0], solver=solver, damping=p.damping,
                             dtype=dtype, self_influence=True)


@pytest.fixture(scope="module")
def exact_self(logreg):
    return self_influence(logreg, "exact")


@pytest.mark.parametrize("solver", ["lissa", "ekfac", "kfac", "arnoldi"])
@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_self_influence_ranks_like_exact(logreg, exact_self, solver):
    res = self_influence(logreg, solver)
    rho = float(spearman_corrcoef(res.self_influence, exact_self.self_influence))
    assert rho >= 0.99, (solver, rho)
    assert bool((res.self_influence <= 0).all())  # −gᵀ(Ĥ + λI)⁻¹g with a positive definite approximation
    if solver == "lissa":  # an iterative solver solves the training gradients as right-hand sides
        assert "self_influence" in res.timings and res.self_influence_diagnostics()
    else:  # a factored inverse gives gᵀ(Ĥ + λI)⁻¹g in the scoring pass: no phase of its own, no solve
        assert "self_influence" not in res.timings and not res.self_influence_diagnostics()


def test_factored_self_influence_is_the_diagonal_of_its_scores(logreg):
    # with the training examples themselves as queries, the streamed self-influence is the diagonal
    res = compute_influence(logreg.model, logreg.train, None, query_indices=[3, 17, 200], solver="ekfac",
                            damping=logreg.damping, dtype=torch.float64, self_influence=True)
    torch.testing.assert_close(res.scores[[0, 1, 2], [3, 17, 200]], res.self_influence[[3, 17, 200]])


# --------------------------------------------------------------------------- Fisher labels
class _Net(nn.Module):
    """Logits fixed by the bias only: p = softmax([log 0.9, log 0.1]) for every input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.bias.copy_(torch.log(torch.tensor([0.9, 0.1])))

    def forward(self, x):
        return self.lin(x)


def test_default_cross_entropy_draws_the_true_fisher_of_the_logits():
    """The default cross-entropy's Fisher batch carries δ with E[δδᵀ] = diag(p) − ppᵀ (the true Fisher of
    the logits, the same as for labels drawn from p), whatever the training labels, and its Fisher loss has
    logit gradient δ."""
    model = _Net().double()
    x, y = torch.randn(4000, 2, dtype=torch.float64), torch.ones(4000, dtype=torch.long)  # every label 1
    obj = Objective(model, dtype=torch.float64)
    assert obj.fisher == "sampled"
    problem = InfluenceProblem(obj, ExampleSource(TensorDataset(x, y), None, obj.prepare_batch), chunk_size=1000)
    deltas = torch.cat([b[1] for _, b in problem.fisher_chunks(seed=0)])
    p = torch.tensor([0.9, 0.1], dtype=torch.float64)  # the model's predictive distribution for every input
    second = deltas.T @ deltas / len(deltas)
    assert torch.allclose(second, torch.diag(p) - torch.outer(p, p), atol=0.01)  # 0.09 on the diagonal
    assert torch.allclose(deltas.sum(1), torch.zeros(len(deltas), dtype=torch.float64), atol=1e-12)  # ⟂ 1
    again = torch.cat([b[1] for _, b in problem.fisher_chunks(seed=0)])
    assert torch.equal(deltas, again)  # same seed, same draws
    # the Fisher loss's gradient with respect to the logits is δ: per-example gradient of the bias = δ
    batch = next(problem.fisher_chunks(seed=1))[1]
    grads = problem.fisher_grads(batch)  # [B, P]; the bias is the last 2 parameters
    assert torch.allclose(grads[:, -2:], batch[1], atol=1e-12)
    assert Objective(model, loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none")).fisher == "empirical"


class _HookNet(nn.Module):
    """``influence_loss(batch, sample=False)``: with ``sample=True`` the labels come from the model."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.calls = {True: 0, False: 0}

    def forward(self, x):
        return self.lin(x)

    def influence_loss(self, batch, sample=False):
        self.calls[bool(sample)] += 1
        logits = self(batch["x"])
        y = torch.distributions.Categorical(logits=logits).sample() if sample else batch["y"]
        return F.cross_entropy(logits, y, reduction="none")


class _Dicts(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def test_influence_loss_with_a_sample_flag_gives_the_true_fisher():
    model = _HookNet()
    data = _Dicts(64)
    res = compute_influence(model, data, None, query_indices=[0, 1], solver=EKFACSettings(), damping=0.1)
    assert res.settings["fisher"] == "sampled" and model.calls[True] > 0  # the curvature passes sampled
    assert torch.isfinite(res.scores).all()
    # the same model without the flag: its hook is only ever called as influence_loss(batch)
    class NoFlag(_HookNet):
        def influence_loss(self, batch):  # noqa: D401 - same loss, training labels only
            return super().influence_loss(batch)

    plain = NoFlag()
    res = compute_influence(plain, data, None, query_indices=[0, 1], solver=EKFACSettings(), damping=0.1)
    assert res.settings["fisher"] == "empirical" and plain.calls[True] == 0
