"""Bad input gets a clear error naming the argument and the fix, before heavy work where possible."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_influence import (
    CGSettings,
    ExactSettings,
    InfluenceCallback,
    InfluenceConfigError,
    InfluenceRuntimeError,
    LissaSettings,
    NegativeCurvatureError,
    SolverDivergedError,
    compute_influence,
)

from .lit_models import LitClassifier, loaders, quiet_trainer
from .problems import diag, digits

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def data():
    return digits(torch.float32, n_train=200)


class Stream(IterableDataset):
    def __init__(self, ds):
        self.ds = ds

    def __iter__(self):
        return iter(self.ds)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(solver="newton"), r"solver='newton' is not a known solver; use one of \['arnoldi', 'auto', 'cg', 'ekfac', 'exact', 'kfac', 'lissa'\]"),
        (dict(num_queries=0), r"num_queries=0 must be a positive integer"),
        (dict(top_k=-1), r"top_k=-1 must be a positive integer"),
        (dict(chunk_size=2.5), r"chunk_size=2.5 must be a positive integer"),
        (dict(query_indices=[]), r"query_indices=\[\] is empty"),
        (dict(query_indices=[-1]), r"must be non-negative"),
        (dict(damping=-0.1), r"damping=-0.1 must be a finite number ≥ 0"),
        (dict(damping=float("nan")), r"damping=nan must be a finite number"),
        (dict(damping="big"), r"damping='big' must be a number ≥ 0, \"auto\" or AutoDamping"),
        (dict(dtype=torch.float16), r"dtype=torch.float16 is not supported: half precision .* use torch.float32"),
        (dict(query_indices="12"), r"query_indices='12' is a string"),
        (dict(query_indices=[1.7]), r"query_indices=\[1.7\] holds 1.7, which is not an integer position"),
        (dict(params=123), r"params=123 is not a name or a list of names"),
        (dict(on_error="ignore"), r"on_error='ignore' must be 'warn' or 'raise'"),
        (dict(query_dataloader=[1, 2]), r"query_dataloader must be a torch DataLoader"),
        (dict(loss_fn="mse"), r"loss_fn='mse' is not callable"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, match):
    with pytest.raises(InfluenceConfigError, match=match):
        InfluenceCallback(**kwargs)


@pytest.mark.parametrize(
    "settings, match",
    [
        (lambda: LissaSettings(depth=0), r"LissaSettings.depth=0 must be a positive integer"),
        (lambda: LissaSettings(scale=-1.0), r"LissaSettings.scale=-1.0 must be a positive number"),
        (lambda: CGSettings(tol=0), r"CGSettings.tol=0 must be a positive number"),
        (lambda: CGSettings(max_iter=2.5), r"CGSettings.max_iter=2.5 must be a positive integer"),
        (lambda: ExactSettings(max_params=0), r"ExactSettings.max_params=0 must be a positive integer"),
        (lambda: ExactSettings(block=1.5), r"ExactSettings.block=1.5 must be a positive integer"),
        (lambda: LissaSettings(preconditioner="cg"), r"LissaSettings.preconditioner='cg' must be None or a closed-form solver \('arnoldi', 'ekfac', 'kfac'"),
    ],
)
def test_bad_solver_settings(settings, match):
    with pytest.raises(InfluenceConfigError, match=match):
        settings()


def test_params_matching_nothing_fails_at_setup_before_training(tmp_path, data):
    model = LitClassifier()
    cb = InfluenceCallback(params=["classifier"])
    with pytest.raises(InfluenceConfigError, match=r"params=\['classifier'\] matches no trainable parameter.*net.weight"):
        quiet_trainer(tmp_path, callbacks=[cb]).fit(model, *loaders(*data))
    assert model.trainer.global_step == 0


def test_params_prefix_and_glob_select(data):
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
    res = compute_influence(model, data[0], data[1], num_queries=2, params=["2"], solver="exact")
    assert res.settings["params"] == ["2.weight", "2.bias"] and res.settings["num_params"] == 90
    res = compute_influence(model, data[0], data[1], num_queries=2, params="*.bias", solver="exact")
    assert res.settings["params"] == ["0.bias", "2.bias"]


def test_iterable_train_dataset_fails_before_training(tmp_path, data):
    model = LitClassifier()
    cb = InfluenceCallback(num_queries=2)
    with pytest.raises(InfluenceConfigError, match=r"iterable-only dataset.*map-style Dataset"):
        quiet_trainer(tmp_path, callbacks=[cb]).fit(model, DataLoader(Stream(data[0]), batch_size=32),
                                                    DataLoader(data[1], batch_size=32))
    assert model.trainer.global_step == 0


def test_no_train_dataloader(tmp_path):
    trainer = quiet_trainer(tmp_path)
    with pytest.raises(InfluenceConfigError, match="found no train dataloader; pass train_dataloaders"):
        InfluenceCallback().on_train_start(trainer, LitClassifier())
    with pytest.raises(InfluenceConfigError, match="train_dataset is None"):
        compute_influence(LitClassifier(), None)


def test_no_query_data_fails_before_training(tmp_path, data):
    model = LitClassifier()
    cb = InfluenceCallback(num_queries=2)  # on_error="warn": still refused before the run, not after it
    trainer = quiet_trainer(tmp_path, limit_val_batches=0, callbacks=[cb])
    with pytest.raises(InfluenceConfigError, match="no query data.*query_dataloader="):
        trainer.fit(model, *loaders(*data))
    assert model.trainer.global_step == 0


def test_validation_set_up_later_is_not_refused(tmp_path, data):
    """With check_val_every_n_epoch=2, Lightning loads the validation data at the first validation, after
    on_train_start: the callback waits for it instead of refusing."""
    cb = InfluenceCallback(num_queries=2, solver="exact", on_error="raise", report=False, save_results=False)
    quiet_trainer(tmp_path, max_epochs=2, check_val_every_n_epoch=2, callbacks=[cb]).fit(LitClassifier(), *loaders(*data))
    assert cb.results is not None and cb.results.num_queries == 2


def test_query_indices_out_of_range_fail_before_training(tmp_path, data):
    model = LitClassifier()
    cb = InfluenceCallback(query_indices=[3, 5000])
    n_val = len(data[1])
    with pytest.raises(InfluenceConfigError, match=rf"query_indices \[5000\] are out of range .* {n_val} examples"):
        quiet_trainer(tmp_path, callbacks=[cb]).fit(model, *loaders(*data))
    assert model.trainer.global_step == 0
    with pytest.raises(InfluenceConfigError, match=r"query indices \[5000\] are out of range"):
        compute_influence(model, data[0], data[1], query_indices=[5000])


def test_loss_not_per_example_fails_before_training(tmp_path, data):
    model = LitClassifier()
    cb = InfluenceCallback(loss_fn=lambda out, y: F.cross_entropy(out, y))  # mean, not per example
    with pytest.raises(InfluenceConfigError, match=r"returned shape \(\) for a batch of 4 examples.*reduction='none'"):
        quiet_trainer(tmp_path, callbacks=[cb]).fit(model, *loaders(*data))
    assert model.trainer.global_step == 0


def test_batches_that_are_not_pairs_need_the_hook(data):
    class Single(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return data[0].tensors[0][i]

    with pytest.raises(InfluenceConfigError, match=r"not \(inputs, targets\) pairs. Define `influence_loss"):
        compute_influence(nn.Linear(64, 10), Single())


def test_nan_gradient_names_the_example(data):
    x, y = data[0].tensors
    x = x.clone()
    x[37, 5] = float("nan")
    with pytest.raises(InfluenceRuntimeError, match=r"training example 37 .*NaN/inf"):
        compute_influence(nn.Linear(64, 10), TensorDataset(x, y), data[1], num_queries=2, solver="exact",
                          damping=0.1)


def test_nan_gradient_with_finite_loss(data):
    def sqrt_loss(out, y):  # finite (zero) loss whose gradient is inf·0 = NaN
        return torch.sqrt((out[:, 0] - out[:, 0].detach()) ** 2)

    with pytest.raises(InfluenceRuntimeError, match=r"gradient of (training|query) example 0 .* NaN/inf"):
        compute_influence(nn.Linear(64, 10), data[0], data[1], query_indices=[0, 1], loss_fn=sqrt_loss)


def test_nan_loss_at_trained_weights(data):
    model = nn.Linear(64, 10)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(InfluenceRuntimeError, match=r"NaN/inf for \d+ of 4 examples.*did training diverge"):
        compute_influence(model, data[0], data[1], num_queries=2)


def test_exact_refuses_too_many_parameters(data):
    model = nn.Sequential(nn.Linear(64, 200), nn.Tanh(), nn.Linear(200, 10))
    with pytest.raises(InfluenceConfigError, match=r"solver='exact' would form a 15010×15010 Hessian.*max_params=10000.*params="):
        compute_influence(model, data[0], data[1], num_queries=2, solver="exact")


def test_lissa_with_too_small_scale_raises_divergence(data):
    model = nn.Linear(64, 10)
    with pytest.raises(SolverDivergedError, match=r"(diverged|NaN/inf).*raise scale"):
        compute_influence(model, data[0], data[1], num_queries=2,
                          solver=LissaSettings(depth=2000, scale=0.01, batch_size=32), damping=0.01)


def test_cg_negative_curvature_names_damping():
    torch.manual_seed(0)
    x = torch.randn(50, 3)
    y = torch.randint(0, 2, (50,))
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)

    ds = TensorDataset(x, y)
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        exact = compute_influence(model, ds, num_queries=1, solver="exact", damping=0.0, dtype=torch.float64)
    assert diag(exact, "min_eigenvalue") < 0  # the premise: an indefinite Hessian
    with pytest.raises(NegativeCurvatureError, match=r"non-positive curvature.*Raise damping.*damping='auto'"):
        compute_influence(model, ds, num_queries=4, solver=CGSettings(), damping=0.0, dtype=torch.float64)
