"""The factored solvers' magnitude calibration: the Galerkin scale against a closed form, believable sizes on
the zoo (against CG), the ranking untouched, and the models where it cannot be measured."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import InfluenceConfigError, compute_influence
from lightning_influence.curvature.damping import AutoDamping
from lightning_influence.pipeline import bind
from lightning_influence.solvers.calibration import group_scales, magnitude_scale
from lightning_influence.solvers.ekfac import EKFACSettings, KFACSettings
from lightning_influence.solvers.cg import CGSettings
from lightning_influence.solvers.exact import ExactSettings
from lightning_influence.validation import check_run_arguments

from .. import zoo
from ..custom_ops import CustomNet, DetachedBackward

D = torch.float64


class _Scaled:
    """An inverse that is ``c (H + λI)⁻¹``: the calibration must return ``α = 1/c``."""

    def __init__(self, inner, c: float) -> None:
        self.inner, self.c, self.damping = inner, c, inner.damping

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        return self.c * self.inner.solve(v).solution


def test_the_scale_is_the_galerkin_ratio_of_a_closed_form():
    torch.manual_seed(0)
    x, y = torch.randn(60, 5, dtype=D), torch.randint(0, 3, (60,))
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)
    problem = bind(model, TensorDataset(x, y), check_run_arguments(dtype=D))
    exact = ExactSettings().fit(problem, 0.3)
    for c in (7.0, 0.05):
        alpha, diags = magnitude_scale(problem, _Scaled(exact, c))
        assert alpha == pytest.approx(1 / c, rel=1e-9)
        found = {d.name: d.value for d in diags}
        assert found["magnitude_probes"] == 16 and "magnitude_scale_note" not in found


class _GroupScaled:
    """An inverse that is ``c_K (H + λI)⁻¹`` on the first group's coordinates and ``c_D (H + λI)⁻¹`` on ``rest``."""

    def __init__(self, inner, c_fact: float, c_rest: float, rest: torch.Tensor) -> None:
        self.inner, self.c_fact, self.c_rest, self.rest, self.damping = inner, c_fact, c_rest, rest, inner.damping

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        out = self.c_fact * self.inner.solve(v).solution
        out[:, self.rest] *= self.c_rest / self.c_fact
        return out


def _tanh_problem():
    torch.manual_seed(0)
    x, y = torch.randn(60, 5, dtype=D), torch.randint(0, 3, (60,))
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)
    problem = bind(model, TensorDataset(x, y), check_run_arguments(dtype=D))
    return problem, ExactSettings().fit(problem, 0.3), torch.arange(36, 57)  # rest: the second layer


def test_two_group_scales_are_the_galerkin_solution_of_a_closed_form():
    """Each group scaled by its own constant: the two-dimensional Galerkin fit returns both reciprocals."""
    problem, exact, rest = _tanh_problem()
    for c_fact, c_rest in ((7.0, 0.05), (0.3, 4.0)):
        a_fact, a_rest, diags = group_scales(problem, _GroupScaled(exact, c_fact, c_rest, rest), rest,
                                             rest_names=("2.weight", "2.bias"), rest_share=0.37)
        assert a_fact == pytest.approx(1 / c_fact, rel=1e-8) and a_rest == pytest.approx(1 / c_rest, rel=1e-8)
        found = {d.name: (d.value, d.meaning) for d in diags}
        assert found["magnitude_scale"][0] == pytest.approx(a_fact)
        assert found["magnitude_scale_rest"][0] == pytest.approx(a_rest)
        assert "2.weight, 2.bias (37.0% of the attributed parameters)" in found["magnitude_scale_rest"][1]
    # no second group: one scale for both, the one-group rule
    a_fact, a_rest, _ = group_scales(problem, _GroupScaled(exact, 2.0, 2.0, rest), rest[:0])
    assert a_fact == a_rest == pytest.approx(0.5, rel=1e-9)


def test_a_group_pointing_away_from_the_hessian_solve_is_excluded_and_named():
    problem, exact, rest = _tanh_problem()
    a_fact, a_rest, diags = group_scales(problem, _GroupScaled(exact, 2.0, -1.0, rest), rest,
                                         rest_names=("2.weight", "2.bias"), rest_share=0.37)
    assert a_rest == 0.0 and 0.0 < a_fact < 1.0
    found = {d.name: (d.value, d.meaning) for d in diags}
    assert found["magnitude_scale"][0] == pytest.approx(a_fact) and "magnitude_scale_note" not in found
    assert "excluded: 2.weight, 2.bias (37.0% of the attributed parameters)" in found["magnitude_scale_rest"][1]


def test_a_preconditioner_keeps_one_scale():
    """A zero block would make the preconditioner singular: it is given the one-scale rule."""
    assert EKFACSettings().for_preconditioning().calibrate == "scalar"
    assert KFACSettings(calibrate=False).for_preconditioning().calibrate is False
    assert ExactSettings().for_preconditioning() == ExactSettings()
    torch.manual_seed(0)
    x, y = torch.randn(60, 5, dtype=D), torch.randint(0, 3, (60,))
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(D)  # a diagonal group
    data = TensorDataset(x, y)
    alone = compute_influence(model, data, data, solver="ekfac", damping=0.1, num_queries=2, dtype=D)
    assert "magnitude_scale_rest" in {d.name for d in alone.setup_diagnostics()}
    res = compute_influence(model, data, data, solver=CGSettings(preconditioner="ekfac"), damping=5.0, num_queries=2,
                            dtype=D)
    keys = {d.key for d in res.setup_diagnostics()}
    assert "preconditioner/magnitude_scale" in keys and "preconditioner/magnitude_scale_rest" not in keys


def _run(entry, solver):
    return compute_influence(entry.model, entry.train, entry.query, loss_fn=entry.loss_fn, solver=solver,
                             damping=AutoDamping(base=entry.weight_decay), query_indices=list(range(6)))


@pytest.mark.parametrize("name", ["mlp_tanh_digits", "transformer_tokens"])
def test_calibrated_sizes_are_those_of_the_hessian_solve_and_the_ranking_is_kept(name):
    """Measured (8 queries, damping AutoDamping(base=wd) for both): EK-FAC's mean |score| over CG's was 3.2 (MLP)
    and 10.7 (transformer) uncalibrated, 1.00 and 0.64 calibrated (0.25-1.5 over all 11 zoo families)."""
    entry = zoo.get(name)
    cg = _run(entry, "cg")
    raw = _run(entry, EKFACSettings(calibrate=False))
    one = _run(entry, EKFACSettings(calibrate="scalar"))
    two = _run(entry, EKFACSettings())
    size = lambda res: float((res.scores.abs().mean(1) / cg.scores.abs().mean(1)).median())  # noqa: E731
    assert size(raw) > 2.5, size(raw)
    for cal in (one, two):
        assert 0.3 < size(cal) < 1.6, size(cal)
    alpha = {d.name: d.value for d in one.setup_diagnostics()}["magnitude_scale"]
    assert 0 < alpha < 0.5
    torch.testing.assert_close(one.scores, alpha * raw.scores, rtol=1e-4, atol=1e-6 * float(raw.scores.abs().max()))
    assert one.damping == raw.damping == two.damping
    found = {d.name: d.value for d in two.setup_diagnostics()}
    assert ("magnitude_scale_rest" in found) == (name == "transformer_tokens")  # the MLP has no diagonal group


def test_self_influence_is_scaled_with_the_scores():
    entry = zoo.get("logreg_digits")
    kw = dict(loss_fn=entry.loss_fn, damping=entry.damping, num_queries=2, self_influence=True)
    raw = compute_influence(entry.model, entry.train, entry.query, solver=KFACSettings(calibrate=False), **kw)
    cal = compute_influence(entry.model, entry.train, entry.query, solver="kfac", **kw)
    alpha = {d.name: d.value for d in cal.setup_diagnostics()}["magnitude_scale"]
    assert alpha != pytest.approx(1.0, abs=0.05)
    torch.testing.assert_close(cal.self_influence, alpha * raw.self_influence, rtol=1e-4, atol=1e-7)


def test_no_exact_hvp_keeps_the_plain_inverse_and_says_why():
    torch.manual_seed(0)
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    model = CustomNet(DetachedBackward)  # its second derivative is wrong: HVPs by finite differences only
    res = compute_influence(model, TensorDataset(x, y), TensorDataset(x[:4], y[:4]), solver="ekfac", damping=0.1,
                            num_queries=2)
    found = {d.name: d.value for d in res.setup_diagnostics()}
    assert found["magnitude_scale"] == 1.0
    assert "not calibrated" in found["magnitude_scale_note"] and "exact Hessian-vector" in found["magnitude_scale_note"]
    plain = compute_influence(model, TensorDataset(x, y), TensorDataset(x[:4], y[:4]),
                              solver=EKFACSettings(calibrate=False), damping=0.1, num_queries=2)
    torch.testing.assert_close(res.scores, plain.scores)


def test_calibrate_is_validated():
    with pytest.raises(InfluenceConfigError, match=r"EKFACSettings.calibrate='yes' must be True \(a scale per group\), 'scalar'"):
        EKFACSettings(calibrate="yes")
