"""``solver="auto"``: the documented rule on a few sizes, its settings, and an explicit solver winning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_influence import InfluenceConfigError, compute_influence
from lightning_influence.solvers.auto import AutoSettings, choose_solver

from ..problems import digits


@pytest.mark.parametrize(
    "kw, name, preconditioner",
    [
        (dict(num_params=1_000, num_examples=10**6, num_queries=1), "exact", None),  # the boundary is inclusive
        (dict(num_params=1_500, num_examples=1_347, num_queries=31), "cg", None),
        (dict(num_params=1_500, num_examples=1_347, num_queries=32), "cg", "arnoldi"),
        # forming H (P HVPs) costs less than ≈ 32 HVPs per right-hand side: the explicit Hessian
        (dict(num_params=1_500, num_examples=1_347, num_queries=47), "exact", None),
        (dict(num_params=4_810, num_examples=1_347, num_queries=8, self_influence=True), "exact", None),  # the demo
        (dict(num_params=10_001, num_examples=1_347, num_queries=1000), "cg", "arnoldi"),  # over its size limit
        (dict(num_params=50_000, num_examples=50_000, num_queries=1, self_influence=True), "cg", "arnoldi"),
        (dict(num_params=50_000, num_examples=50_001, num_queries=1), "lissa", "arnoldi"),  # LiSSA is preconditioned by default
        (dict(num_params=500, num_examples=100, num_queries=1, exact_hvp=False), "ekfac", None),
        # the explicit Hessian does not fit the memory budget: the next rule
        (dict(num_params=900, num_examples=100, num_queries=1, memory_bytes=3 * 900**2 * 4 - 1), "cg", None),
        (dict(num_params=900, num_examples=100, num_queries=1, dtype=torch.float64, memory_bytes=3 * 900**2 * 4), "cg", None),
    ],
)
def test_the_rule_on_a_few_sizes(kw, name, preconditioner):
    choice = choose_solver(**kw)
    assert choice.name == name
    assert getattr(choice.settings, "preconditioner", None) == preconditioner
    assert choice.describe().startswith(name)


def test_thresholds_move_the_rule_and_are_validated():
    assert choose_solver(5_000, 100, 1, exact_params=5_000).name == "exact"
    assert choose_solver(5_000, 100, 1, full_pass_examples=50).name == "lissa"
    assert choose_solver(5_000, 100, 4, precondition_queries=4).settings.preconditioner == "arnoldi"
    with pytest.raises(InfluenceConfigError, match=r"AutoSettings.exact_params=-1 must be an integer"):
        AutoSettings(exact_params=-1)


def test_the_choice_is_recorded_and_an_explicit_solver_wins():
    train, val = digits(torch.float32, n_train=120)
    torch.manual_seed(0)
    model = nn.Linear(64, 10)  # 650 parameters: the rule says exact
    auto = compute_influence(model, train, val, num_queries=2, damping=0.1)
    assert auto.settings["auto_choice"] == "exact" and auto.solver == "exact"
    assert "P = 650 ≤ 1,000" in auto.settings["auto_reason"]
    explicit = compute_influence(model, train, val, num_queries=2, damping=0.1, solver="cg")
    assert explicit.solver == "cg" and "auto_choice" not in explicit.settings
    torch.testing.assert_close(explicit.scores, auto.scores, rtol=1e-3, atol=1e-4)
    moved = compute_influence(model, train, val, num_queries=2, damping=0.1, solver=AutoSettings(exact_params=100))
    assert moved.settings["auto_choice"] == "cg"
