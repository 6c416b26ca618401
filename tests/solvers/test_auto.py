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
        # forming H (P HVPs) costs no more than preconditioned CG's ≈ 300 + 6 HVPs per right-hand side
        (dict(num_params=1_200, num_examples=1_347, num_queries=149), "cg", "arnoldi"),
        (dict(num_params=1_200, num_examples=1_347, num_queries=150), "exact", None),
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


def test_cg_gets_the_auto_tolerance_and_many_right_hand_sides_are_named():
    few = choose_solver(21_546, 1_347, 10)
    assert few.settings.tol == 1e-3 and "relative residual of 0.001" in few.reason
    assert "arnoldi" not in few.reason.split(":", 1)[1]
    many = choose_solver(50_698, 1_347, 2_000)
    assert many.settings.preconditioner == "arnoldi" and many.settings.tol == 1e-3
    # 300 + 6 · 2,000 products: the reason points to the closed-form solvers
    assert "≈ 12,300 full-data products for 2,000 right-hand sides" in many.reason
    assert "solver='arnoldi' or 'ekfac'" in many.reason
    assert choose_solver(21_546, 1_347, 10, cg_tol=1e-5).settings.tol == 1e-5
    for bad in (0, 1, -1e-3, "1e-3"):
        with pytest.raises(InfluenceConfigError, match=r"AutoSettings.cg_tol=.* must be a number in \(0, 1\)"):
            AutoSettings(cg_tol=bad)


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
    assert moved.settings["auto_choice"] == "cg" and moved.settings["tol"] == 1e-3
    tight = compute_influence(model, train, val, num_queries=2, damping=0.1,
                              solver=AutoSettings(exact_params=100, cg_tol=1e-8))
    assert tight.settings["tol"] == 1e-8
    torch.testing.assert_close(tight.scores, auto.scores, rtol=1e-4, atol=1e-5)
    # relative residual 1e-3: not elementwise round-off, but the same ranking and size (measured: Pearson 0.9999999, norms within 1e-4)
    for got, want in zip(moved.scores.double(), auto.scores.double()):
        assert torch.corrcoef(torch.stack([got, want]))[0, 1] > 0.9995
        assert abs(float(got.norm() / want.norm()) - 1) < 1e-2


# ------------------------------------------------------------------ rule 5: the time budget
@pytest.mark.parametrize(
    "kw, seconds, name",
    [
        # 16 queries, plain CG: 32·16 + 60 = 572 products; 572 × 0.1 s = 57.2 s within 60 s, 572 × 0.11 s over
        (dict(num_params=21_546, num_examples=1_347, num_queries=16), 0.1, "cg"),
        (dict(num_params=21_546, num_examples=1_347, num_queries=16), 0.11, "ekfac"),
        # exact: P + 60 products (650 + 60 = 710; 710 × 0.08 = 56.8 s)
        (dict(num_params=650, num_examples=1_347, num_queries=16), 0.08, "exact"),
        (dict(num_params=650, num_examples=1_347, num_queries=16), 0.09, "ekfac"),
        # preconditioned CG for 100 queries: 300 + 6·100 + 60 = 960 products
        (dict(num_params=21_546, num_examples=1_347, num_queries=100), 0.06, "cg"),
        (dict(num_params=21_546, num_examples=1_347, num_queries=100), 0.07, "ekfac"),
        # LiSSA (n > 50,000) is not estimated: no budget applies
        (dict(num_params=21_546, num_examples=60_000, num_queries=16), 100.0, "lissa"),
    ],
)
def test_the_time_budget_turns_a_too_slow_hessian_solver_into_ekfac(kw, seconds, name):
    choice = choose_solver(**kw, time_budget=60.0, seconds_per_product=seconds)
    assert choice.name == name
    if name == "ekfac":
        assert "over the time budget of 60 s: EK-FAC instead" in choice.reason
        assert "Pass solver='" in choice.reason  # how to insist on the accurate solver
    elif name in ("cg", "exact"):
        assert "within the time budget of 60 s" in choice.reason
    # no budget, or no estimate: rules 1-4 alone, which pick the Hessian solver (or LiSSA) here
    base = choose_solver(**kw)
    assert base.name in ("exact", "cg", "lissa") and (name == "ekfac" or base.name == name)
    assert choose_solver(**kw, time_budget=60.0).reason == base.reason
    assert choose_solver(**kw, seconds_per_product=seconds).reason == base.reason


def test_product_seconds_scales_one_timed_product_to_the_training_set():
    from lightning_influence.pipeline import bind
    from lightning_influence.solvers.auto import product_seconds

    train, _ = digits(torch.float32, n_train=512)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    problem = bind(model, train)
    small = product_seconds(problem, examples=64, vectors=4)
    assert 0 < small < 5.0  # one 2,410-parameter product over 512 digits: milliseconds
    # the same product timed on every example is the same order: the estimate is per example, scaled
    whole = product_seconds(problem, examples=512, vectors=4)
    assert 0.05 < small / whole < 20


def test_a_budget_the_hessian_solvers_cannot_meet_picks_ekfac_and_says_why():
    train, val = digits(torch.float32, n_train=120)
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    res = compute_influence(model, train, val, num_queries=2, damping=0.1, solver=AutoSettings(time_budget=1e-9))
    assert res.settings["auto_choice"] == "ekfac" and res.solver == "ekfac"
    assert "EK-FAC instead" in res.settings["auto_reason"] and "Pass solver='exact'" in res.settings["auto_reason"]
    roomy = compute_influence(model, train, val, num_queries=2, damping=0.1, solver=AutoSettings(time_budget=1e6))
    assert roomy.settings["auto_choice"] == "exact" and "within the time budget" in roomy.settings["auto_reason"]
    with pytest.raises(InfluenceConfigError, match=r"AutoSettings.time_budget=0 must be a number of seconds > 0"):
        AutoSettings(time_budget=0)


def test_the_estimate_times_as_many_right_hand_sides_as_the_choice_batches():
    from lightning_influence.solvers.auto import _batched_width

    assert _batched_width("exact", 4_810, 8) == 512 and _batched_width("exact", 300, 8) == 300  # identity blocks
    assert _batched_width("cg", 21_546, 10) == 10 and _batched_width("cg", 21_546, 100) == 32  # the queries
