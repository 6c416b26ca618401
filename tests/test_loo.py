"""Leave-one-out retraining: predicted change in query loss (−score/n) against actual retraining."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from lightning_influence import ExactSettings, compute_influence

from .problems import Problem


def retrain_without(p: Problem, drop: int) -> torch.nn.Module:
    """Minimise (1/n) Σ_{i≠drop} L_i + λ/2‖θ‖² (same 1/n as the full risk), warm-started at θ̂."""
    model = copy.deepcopy(p.model)
    x, y = p.train.tensors
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[drop] = False
    n = len(x)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x[keep]), y[keep], reduction="sum") / n
        loss = loss + 0.5 * p.damping * sum((q * q).sum() for q in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model


def test_leave_one_out_correlation(logreg):
    p = logreg
    res = compute_influence(p.model, p.train, p.val, num_queries=1, solver=ExactSettings(), damping=p.damping,
                            dtype=torch.float64)
    q = int(res.query_indices[0])
    xq, yq = p.val.tensors[0][q : q + 1], p.val.tensors[1][q : q + 1]
    base = float(F.cross_entropy(p.model(xq), yq).detach())
    assert abs(base - float(res.query_losses[0])) < 1e-10

    predicted = res.predicted_loss_change()[0]
    top = torch.argsort(res.scores[0].abs(), descending=True)[:30]
    actual = []
    for i in top.tolist():
        m = retrain_without(p, i)
        actual.append(float(F.cross_entropy(m(xq), yq).detach()) - base)
    actual_t = torch.tensor(actual, dtype=torch.float64)
    pred_t = predicted[top]
    r = torch.corrcoef(torch.stack([pred_t, actual_t]))[0, 1]
    assert r >= 0.95, f"Pearson {float(r):.4f} between predicted and actual leave-one-out changes"
    # same sign for the clear cases, and the right order of magnitude
    assert float((torch.sign(pred_t) == torch.sign(actual_t)).double().mean()) >= 0.9
    assert 0.5 < float(actual_t.abs().sum() / pred_t.abs().sum()) < 2.0
