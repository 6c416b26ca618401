"""Every checkable error before training: the query data, the solver's size limit and the outputs are
checked in on_train_start, so a bad configuration costs no training run."""

from __future__ import annotations

import os

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_influence import InfluenceCallback, InfluenceConfigError, compute_influence

from .lit_models import LitClassifier, loaders, quiet_trainer
from .problems import digits

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def data():
    return digits(torch.float32, n_train=120)


# ---------------------------------------------------------------- checks before training
def _fails_before_training(tmp_path, cb, train_loader, val_loader, match, model=None, **trainer_kwargs):
    model = model or LitClassifier()
    with pytest.raises(InfluenceConfigError, match=match):
        quiet_trainer(tmp_path, callbacks=[cb], **trainer_kwargs).fit(model, train_loader, val_loader)
    assert model.trainer.global_step == 0


def test_empty_validation_set_fails_before_training(tmp_path, data):
    empty = TensorDataset(data[1].tensors[0][:0], data[1].tensors[1][:0])
    _fails_before_training(tmp_path, InfluenceCallback(num_queries=2), DataLoader(data[0], batch_size=32),
                           DataLoader(empty, batch_size=8), r"the query dataset is empty")


def test_missing_validation_set_fails_before_training(tmp_path, data):
    _fails_before_training(tmp_path, InfluenceCallback(num_queries=2), DataLoader(data[0], batch_size=32), None,
                           r"no query data.*val_dataloaders.*query_dataloader=")


def test_query_batches_in_another_format_fail_before_training(tmp_path, data):
    cb = InfluenceCallback(num_queries=2, query_dataloader=DataLoader(data[1].tensors[0], batch_size=8))
    _fails_before_training(tmp_path, cb, *loaders(*data), r"batches are Tensor, not \(inputs, targets\) pairs")


def test_query_label_out_of_range_fails_before_training(tmp_path, data):
    x, y = data[1].tensors
    y = y.clone()
    y[2] = 10
    cb = InfluenceCallback(num_queries=2, query_dataloader=DataLoader(TensorDataset(x, y), batch_size=8))
    _fails_before_training(tmp_path, cb, *loaders(*data), r"query example 2 has label 10, outside 0\.\.9: the "
                                                          r"model outputs 10 classes")


def test_exact_on_a_large_model_fails_before_training(tmp_path, data):
    model = LitClassifier(nn.Sequential(nn.Linear(64, 200), nn.Tanh(), nn.Linear(200, 10)))
    _fails_before_training(tmp_path, InfluenceCallback(num_queries=2, solver="exact"), *loaders(*data),
                           r"solver='exact' would form a 15010×15010 Hessian", model=model)


class Counting(Dataset):
    def __init__(self, ds):
        self.ds, self.reads = ds, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.reads += 1
        return self.ds[i]


def test_exact_size_refused_before_any_pass_over_the_data(data):
    """Under damping='auto' too: no Lanczos pass, no loss pass, only the few examples of the format check."""
    train = Counting(data[0])
    model = nn.Sequential(nn.Linear(64, 200), nn.Tanh(), nn.Linear(200, 10))
    with pytest.raises(InfluenceConfigError, match=r"would form a 15010×15010 Hessian"):
        compute_influence(model, train, data[1], num_queries=2, solver="exact", damping="auto")
    assert train.reads <= 4


def test_report_path_under_a_file_fails_before_training(tmp_path, data):
    (tmp_path / "a_file").write_text("x")
    cb = InfluenceCallback(num_queries=2, report_path=tmp_path / "a_file" / "report.html")
    _fails_before_training(tmp_path, cb, *loaders(*data), r"report_path: .*report.html cannot be created because "
                                                          r".*a_file is a file, not a directory \(ENOTDIR\)")


def test_report_path_that_is_a_directory_fails_before_training(tmp_path, data):
    cb = InfluenceCallback(num_queries=2, report_path=tmp_path)
    _fails_before_training(tmp_path, cb, *loaders(*data), r"report_path: .* is a directory, not a file")


def test_influence_folder_that_is_a_file_fails_before_training(tmp_path, data):
    logger = pl.loggers.CSVLogger(str(tmp_path), name="", version="v")
    os.makedirs(tmp_path / "v")
    (tmp_path / "v" / "influence").write_text("x")
    _fails_before_training(tmp_path, InfluenceCallback(num_queries=2), *loaders(*data),
                           r"results file: .*influence/results.pt cannot be created because .*influence is a file",
                           logger=logger)
