"""The callback inside real Trainers: same numbers as the functional core, dataset-order indices,
the influence_loss hook, damping from the optimizer, and a model left exactly as trained."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_influence import (
    AutoDamping,
    ExactSettings,
    InfluenceCallback,
    InfluenceConfigError,
    InfluenceResults,
    LissaSettings,
    compute_influence,
)
from lightning_influence.integration.callback import optimizer_damping
from lightning_influence.pipeline import DEFAULT_DAMPING

from ..lit_models import DictDataset, LitClassifier, LitDictClassifier, loaders, quiet_trainer
from ..problems import diag, digits, pearson_rows
from ..custom_ops import Act, NoBackward, OldStyle

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def data():
    return digits(torch.float32, n_train=400)


class Snapshot(pl.Callback):
    """Records the module's state when training ends, before InfluenceCallback runs (listed first)."""

    def on_train_end(self, trainer, pl_module):
        self.state = copy.deepcopy(pl_module.state_dict())
        self.modes = {n: m.training for n, m in pl_module.named_modules()}
        self.flags = {n: p.requires_grad for n, p in pl_module.named_parameters()}


def test_callback_matches_functional_core_and_leaves_model_untouched(tmp_path, data):
    train, val = data
    net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 10))
    net[0].bias.requires_grad_(False)  # a frozen parameter: excluded, flag kept
    model = LitClassifier(net, lr=0.2, weight_decay=1e-3)
    snap = Snapshot()
    cb = InfluenceCallback(num_queries=5, solver="exact", self_influence=True, on_error="raise")
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[snap, cb])
    trainer.fit(model, *loaders(train, val))

    res = cb.results
    assert cb.error is None and isinstance(res, InfluenceResults)
    assert res.scores.shape == (5, len(train)) and res.self_influence.shape == (len(train),)
    # default damping="auto": SGD's L2 1e-3, raised because two epochs leave H + 1e-3·I indefinite
    assert "SGD" in res.settings["damping_source"] and res.settings["damping_base"] == pytest.approx(1e-3)
    assert res.damping > 1e-3 and diag(res, "min_eigenvalue") > 0
    assert "net.0.bias" not in res.settings["params"] and res.settings["num_params"] == 64 * 16 + 16 * 10 + 10
    # queries default to the highest-loss validation examples
    evaluated = copy.deepcopy(model).eval()
    val_losses = torch.nn.functional.cross_entropy(evaluated(val.tensors[0]), val.tensors[1], reduction="none")
    assert set(res.query_indices.tolist()) == set(torch.topk(val_losses.detach(), 5).indices.tolist())
    torch.testing.assert_close(res.query_losses, val_losses.detach()[res.query_indices], rtol=1e-5, atol=1e-6)
    # model exactly as trained: weights, per-module mode, requires_grad flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap.state[k]), k
    assert {n: m.training for n, m in model.named_modules()} == snap.modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == snap.flags
    # the functional core on the same weights gives the same numbers
    ref = compute_influence(model, train, val, query_indices=res.query_indices.tolist(), solver=ExactSettings(),
                            damping=res.damping, self_influence=True)
    torch.testing.assert_close(res.scores, ref.scores)
    torch.testing.assert_close(res.self_influence, ref.self_influence)
    # the results file round-trips
    loaded = InfluenceResults.load(cb.results_path)
    assert torch.equal(loaded.scores, res.scores) and loaded.settings == res.settings


def test_shuffled_loader_gives_dataset_order_indices(tmp_path, data):
    """lr=0 keeps the weights fixed, so shuffled and sequential training must give identical scores,
    each column i belonging to dataset example i."""
    train, val = data
    torch.manual_seed(0)
    base = LitClassifier(lr=0.0, weight_decay=1e-2)
    runs = []
    for shuffle in (True, False):
        model = copy.deepcopy(base)
        cb = InfluenceCallback(query_indices=[0, 5, 9], solver="exact", on_error="raise")
        quiet_trainer(tmp_path / str(shuffle), callbacks=[cb]).fit(model, *loaders(train, val, shuffle=shuffle))
        runs.append(cb.results)
    torch.testing.assert_close(runs[0].scores, runs[1].scores)
    assert torch.equal(runs[0].train_indices, torch.arange(len(train)))
    ref = compute_influence(base, train, val, query_indices=[0, 5, 9], solver="exact", damping=1e-2)
    torch.testing.assert_close(runs[0].scores, ref.scores)


def test_influence_loss_hook_with_dict_batches(tmp_path, data):
    train, val = data
    torch.manual_seed(0)
    plain = LitClassifier(lr=0.0, weight_decay=1e-2)
    hooked = LitDictClassifier(copy.deepcopy(plain.net), lr=0.0, weight_decay=1e-2)
    cb = InfluenceCallback(query_indices=[1, 2, 3], solver="exact", on_error="raise")
    dtrain, dval = DictDataset(*train.tensors), DictDataset(*val.tensors)
    quiet_trainer(tmp_path, callbacks=[cb]).fit(hooked, DataLoader(dtrain, batch_size=64), DataLoader(dval, batch_size=64))
    assert cb.results.settings["loss"] == "influence_loss"
    ref = compute_influence(plain, train, val, query_indices=[1, 2, 3], solver="exact", damping=1e-2)
    torch.testing.assert_close(cb.results.scores, ref.scores)
    assert cb.results.query_predictions is None  # the batch format is the user's


def test_query_dataloader_and_lissa_in_trainer(tmp_path, data):
    train, val = data
    qloader = DataLoader(torch.utils.data.TensorDataset(*val[:20]), batch_size=8)
    cb = InfluenceCallback(num_queries=3, query_dataloader=qloader, solver=LissaSettings(depth=50, scale=5.0),
                           chunk_size=64, on_error="raise")
    quiet_trainer(tmp_path, limit_val_batches=0, callbacks=[cb]).fit(LitClassifier(), DataLoader(train, batch_size=64))
    assert cb.results.scores.shape == (3, len(train)) and bool(torch.isfinite(cb.results.scores).all())
    assert cb.results.query_indices.max() < 20
    assert cb.results.settings["solver"] == "lissa"


def test_float64_option_runs_in_float64(tmp_path, data):
    train, val = data
    cb = InfluenceCallback(num_queries=2, solver="exact", dtype="float64", on_error="raise")
    quiet_trainer(tmp_path, callbacks=[cb]).fit(LitClassifier(), *loaders(train, val))
    assert cb.results.scores.dtype == torch.float64 and cb.results.settings["dtype"] == "float64"


@pytest.mark.parametrize(
    "optimizer, weight_decay, expected, reason",
    [
        ("sgd", 5e-3, 5e-3, "coupled"),
        ("adam", 2e-4, 2e-4, "coupled"),
        ("adamw", 1e-2, DEFAULT_DAMPING, "decoupled"),
        ("sgd", 0.0, DEFAULT_DAMPING, "no L2"),
    ],
)
def test_damping_from_optimizer(optimizer, weight_decay, expected, reason):
    model = LitClassifier(weight_decay=weight_decay, optimizer=optimizer)
    opt = model.configure_optimizers()
    lam, why = optimizer_damping([opt], list(model.parameters()))
    assert lam == pytest.approx(expected) and reason in why


@pytest.mark.parametrize("optimizer, base", [("sgd", 1e-3), ("adamw", 0.0)])
def test_auto_damping_from_the_callback(tmp_path, data, optimizer, base):
    """damping="auto": the optimizer's coupled L2 (none for AdamW) plus what the spectrum needs; a tanh
    MLP after one epoch is far from a minimum, so H + base·I is indefinite and λ must rise above it."""
    train, val = data
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10))
    model = LitClassifier(net, lr=0.2 if optimizer == "sgd" else 0.01, weight_decay=1e-3, optimizer=optimizer)
    cb = InfluenceCallback(num_queries=3, solver="exact", damping="auto", on_error="raise")
    quiet_trainer(tmp_path, callbacks=[cb]).fit(model, *loaders(train, val))
    res = cb.results
    assert res.settings["damping_mode"] == "auto" and res.settings["damping_base"] == base
    assert res.settings["damping_source"].startswith("auto:")
    lam, lam_min = res.settings["damping"], res.settings["lambda_min_estimate"]
    assert lam_min + base < 0  # the premise: an indefinite Hessian at the optimizer's own damping
    assert lam == pytest.approx(max(base, 1.5 * -lam_min))  # −λ_min + 0.5·|λ_min| (the margin)
    min_eig = diag(res, "min_eigenvalue")  # the exact solver's eigenvalues of H + λI
    assert min_eig == pytest.approx(lam + lam_min, rel=1e-3) and min_eig > 0
    ref = compute_influence(model, train, val, query_indices=res.query_indices.tolist(), solver="exact",
                            damping=AutoDamping(base=base))
    assert ref.settings["damping"] == lam
    torch.testing.assert_close(res.scores, ref.scores)


def test_failure_is_contained_by_default(tmp_path, data, monkeypatch):
    """A failing influence computation warns, keeps the error, and fit completes with the model intact."""
    train, val = data

    def broken(*args, **kwargs):
        raise RuntimeError("an HVP failed halfway")

    monkeypatch.setattr("lightning_influence.integration.callback.compute_influence", broken)
    cb = InfluenceCallback(num_queries=2, solver="exact")
    model = LitClassifier()
    with pytest.warns(UserWarning, match="InfluenceCallback failed .*HVP failed halfway"):
        quiet_trainer(tmp_path, callbacks=[cb]).fit(model, *loaders(train, val))
    assert cb.results is None and "HVP failed halfway" in str(cb.error)
    assert model.trainer.state.finished


def test_warns_when_listed_before_weight_averaging(tmp_path, data):
    train, val = data
    from pytorch_lightning.callbacks import StochasticWeightAveraging

    cb = InfluenceCallback(num_queries=2, solver="exact")
    trainer = quiet_trainer(tmp_path, callbacks=[cb, StochasticWeightAveraging(swa_lrs=0.01)])
    with pytest.warns(UserWarning, match="listed before StochasticWeightAveraging"):
        trainer.fit(LitClassifier(), *loaders(train, val))


def test_a_model_without_exact_second_derivatives_gets_a_working_default(tmp_path, data, caplog):
    """The default (``solver="auto"``) on a model whose custom op (``OldStyle``: a tanh written as older code
    writes ``autograd.Function``, without ``setup_context``) ``torch.func`` cannot differentiate: the probe
    before training finds only eager per-example gradients, the automatic choice is EK-FAC (no Hessian-vector
    products), the log line says why, and its scores correlate with the exact solve's at that solver's own
    automatic damping (measured after 12 SGD epochs: Pearson 0.49-0.86; EK-FAC's Gauss-Newton curvature
    differs from the Hessian of weights this far from a minimum, 0.91-0.96 after an Adam fit)."""
    import logging

    train, val = data
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), Act(OldStyle), nn.Linear(16, 10))
    model = LitClassifier(net, lr=0.2, weight_decay=1e-3)
    cb = InfluenceCallback(num_queries=4, on_error="raise")
    with caplog.at_level(logging.INFO):
        quiet_trainer(tmp_path, max_epochs=12, callbacks=[cb]).fit(model, *loaders(train, val))
    res = cb.results
    assert cb.error is None and res.settings["auto_choice"] == "ekfac"
    assert "finite differences only" in res.settings["auto_reason"]
    assert any("ekfac" in r.getMessage() and "finite differences" in r.getMessage() for r in caplog.records)
    net[1] = nn.Tanh()  # the same function through torch's own op: exact HVPs, the exact solve as reference
    ref = compute_influence(net, train, val, query_indices=res.query_indices.tolist(), solver="exact")
    r = pearson_rows(res.scores, ref.scores)
    assert r.median() > 0.6 and r.min() > 0.3, r


def test_a_custom_op_without_any_derivative_fails_before_training_naming_it(tmp_path, data):
    """An ``autograd.Function`` with no backward: the checks before training probe one per-example gradient
    and one HVP on real examples and stop the fit before its first step, naming the op and the
    layer (not the raw torch error after the whole run)."""
    from lightning_influence.autodiff import UnsupportedModelError

    train, val = data
    net = nn.Sequential(nn.Linear(64, 16), Act(NoBackward), nn.Linear(16, 10))
    model = LitClassifier(net, lr=0.2)
    trainer = quiet_trainer(tmp_path, max_epochs=50, callbacks=[InfluenceCallback(num_queries=2)])
    with pytest.raises(UnsupportedModelError, match=r"op `tests\.custom_ops\.NoBackward` in layer `inner\.net\.1` \(Act\)"):
        trainer.fit(model, *loaders(train, val))
    assert trainer.global_step == 0


def test_the_time_budget_of_the_automatic_choice(tmp_path, data, caplog):
    """``time_budget``: by default (``"training"``) a small model keeps its exact solve (the budget is at
    least a minute); a budget the Hessian solvers cannot meet gives EK-FAC, with the estimate in the log
    line; an explicit solver ignores it; bad values are refused at construction, naming the argument."""
    import logging

    from lightning_influence.integration.budget import MIN_TIME_BUDGET, budget_seconds

    train, val = data
    torch.manual_seed(0)
    default = InfluenceCallback(num_queries=2, on_error="raise")
    quiet_trainer(tmp_path / "a", max_epochs=1, callbacks=[default]).fit(
        LitClassifier(nn.Linear(64, 10), lr=0.2, weight_decay=1e-3), *loaders(train, val))
    assert default.results.settings["auto_choice"] == "exact"
    assert f"within the time budget of {MIN_TIME_BUDGET:,.0f} s" in default.results.settings["auto_reason"]

    tight = InfluenceCallback(num_queries=2, on_error="raise", time_budget=1e-6)
    with caplog.at_level(logging.INFO):
        quiet_trainer(tmp_path / "b", max_epochs=1, callbacks=[tight]).fit(
            LitClassifier(nn.Linear(64, 10), lr=0.2, weight_decay=1e-3), *loaders(train, val))
    assert tight.error is None and tight.results.solver == "ekfac"
    assert any("EK-FAC instead" in r.getMessage() and "Pass solver='exact'" in r.getMessage() for r in caplog.records)

    explicit = InfluenceCallback(num_queries=2, on_error="raise", solver="exact", time_budget=1e-6)
    quiet_trainer(tmp_path / "c", max_epochs=1, callbacks=[explicit]).fit(
        LitClassifier(nn.Linear(64, 10), lr=0.2, weight_decay=1e-3), *loaders(train, val))
    assert explicit.results.solver == "exact" and "auto_choice" not in explicit.results.settings

    # the training so far is the fit's time less its earlier influence runs
    import time as _time

    probe = InfluenceCallback()
    probe._train_started, probe._influence_seconds = _time.perf_counter() - 200.0, 80.0
    assert probe._budgeted_solver().time_budget == pytest.approx(120.0, abs=5.0)
    probe._influence_seconds = 190.0
    assert probe._budgeted_solver().time_budget == MIN_TIME_BUDGET
    assert budget_seconds("training", 5.0) == MIN_TIME_BUDGET and budget_seconds("training", 300.0) == 300.0
    assert budget_seconds(None, 300.0) is None and budget_seconds(12.5, 300.0) == 12.5
    for bad in (0, -1.0, "fast", float("nan")):
        with pytest.raises(InfluenceConfigError, match=r"time_budget=.* must be 'training'"):
            InfluenceCallback(time_budget=bad)
