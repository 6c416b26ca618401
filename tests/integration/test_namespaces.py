"""Both Lightning namespaces, ``pytorch_lightning`` and ``lightning.pytorch``: one callback class, which each
``LightningCLI`` accepts from a YAML config (``trainer.callbacks`` with ``class_path``/``init_args``) under its own
name and under the alias ``lightning_influence.lightning.InfluenceCallback``, and each namespace's ``WandbLogger``
gets the full report (tables, histograms, config, artifact), read back from the offline run."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_influence.integration.reporting import find_wandb_logger

from ..problems import digits
from ..wandb_reader import OfflineRun, wandb_offline_env

wandb = pytest.importorskip("wandb")

#: namespace -> a class_path its CLI is given (the one class, under its two names)
CALLBACKS = {
    "pytorch_lightning": "lightning_influence.InfluenceCallback",
    "lightning.pytorch": "lightning_influence.lightning.InfluenceCallback",
}
NAMES = ("lightning_influence.InfluenceCallback", "lightning_influence.lightning.InfluenceCallback")


def namespace(name: str) -> Any:
    pytest.importorskip(name)
    pytest.importorskip("jsonargparse")
    return importlib.import_module(name)


def digits_module(pl: Any) -> type:
    """A linear classifier on 8×8 digits for namespace ``pl``, with its own dataloaders (what a CLI runs)."""

    class Digits(pl.LightningModule):
        def __init__(self, n_train: int = 120) -> None:
            super().__init__()
            self.train_set, self.val_set = digits(torch.float32, n_train=n_train, image=True)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.5, weight_decay=1e-2)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.train_set, batch_size=40, shuffle=True)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(self.val_set, batch_size=200)

    return Digits


CONFIG = """\
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  limit_val_batches: 1
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  default_root_dir: {root}
  logger:
    class_path: {ns}.loggers.WandbLogger
    init_args: {{project: influence-cli, save_dir: {root}, offline: true}}
  callbacks:
    - class_path: {callback}
      init_args:
        num_queries: 2
        solver: exact
        top_k: 3
        self_influence: true
        on_error: raise
        every_n_epochs: 1
"""


@pytest.mark.parametrize("ns", list(CALLBACKS))
def test_cli_yaml_config_and_full_wandb_report(ns, tmp_path, monkeypatch):
    pl = namespace(ns)
    cli_module = importlib.import_module(f"{ns}.cli")
    monkeypatch.setattr("sys.argv", ["cli"])
    for k, v in wandb_offline_env(tmp_path / "wandb-home").items():
        monkeypatch.setenv(k, v)
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(root=tmp_path, ns=ns, callback=CALLBACKS[ns]))
    torch.manual_seed(0)
    cli = cli_module.LightningCLI(digits_module(pl), args=["fit", "--config", str(config)], save_config_callback=None)
    wandb.finish()
    wandb.teardown()

    cbs = [c for c in cli.trainer.callbacks if type(c).__name__ == "InfluenceCallback"]
    assert len(cbs) == 1 and isinstance(cbs[0], pl.Callback)
    cb = cbs[0]
    assert cb.error is None and cb.results is not None and cb.results.num_train == 120
    assert cb.self_influence and cb.top_k == 3 and cb.solver.name == "exact"  # init_args arrived
    assert cb.every_n_epochs == 1 and cb.history.epochs() == [0] and cb.results is cb.history[0]
    run = OfflineRun.find(tmp_path, wait=10)
    assert cb.outputs["wandb_run_dir"] == run.run_dir
    assert len(run.table("influence/queries").rows) == 2
    assert len(run.table("influence/top_examples").rows) == 2 * 2 * 3
    assert len(run.table("influence/self_influence").rows) == 10
    hist = run.row_with("influence/score_histogram")["influence/score_histogram"]
    assert hist["_type"] == "histogram" and sum(hist["values"]) == cb.results.scores.numel()
    assert run.config["influence/solver"] == "exact" and run.summary["influence/solver"] == "exact"
    assert set(run.artifact_of_type("influence-scores").files) >= {"results.pt", "report.html"}


@pytest.mark.parametrize("ns", list(CALLBACKS))
@pytest.mark.parametrize("callback", NAMES)
def test_each_cli_takes_the_one_callback_under_either_name(ns, callback, tmp_path, monkeypatch):
    """One class derives from both namespaces' Callback: each CLI takes it, under its name and under the alias
    (the earlier lightning.pytorch class, kept so that its configurations keep working)."""
    pl = namespace(ns)
    monkeypatch.setattr("sys.argv", ["cli"])
    cli_module = importlib.import_module(f"{ns}.cli")
    config = tmp_path / "config.yaml"
    config.write_text(f"trainer:\n  logger: false\n  callbacks:\n    - class_path: {callback}\n"
                      "      init_args: {num_queries: 3, solver: ekfac}\n")
    cli = cli_module.LightningCLI(digits_module(pl), args=["--config", str(config)], run=False)
    from lightning_influence import InfluenceCallback
    from lightning_influence.lightning import InfluenceCallback as Alias

    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, InfluenceCallback)]
    assert type(cb) is InfluenceCallback is Alias and isinstance(cb, pl.Callback)
    assert cb.num_queries == 3 and cb.solver.name == "ekfac"


@pytest.mark.parametrize("ns", list(CALLBACKS))
def test_wandb_logger_found_in_either_namespace(ns, tmp_path):
    pl = namespace(ns)
    csv = pl.loggers.CSVLogger(str(tmp_path))
    wb = pl.loggers.WandbLogger(save_dir=str(tmp_path), offline=True)  # no run starts before .experiment

    class Trainer:
        loggers = [csv, wb]

    assert find_wandb_logger(Trainer()) is wb
    Trainer.loggers = [csv]
    assert find_wandb_logger(Trainer()) is None


@pytest.mark.parametrize("ns", list(CALLBACKS))
def test_each_callback_runs_in_the_other_namespaces_trainer(ns, tmp_path):
    """Including the training-loop runs and their history through a checkpoint of the other namespace."""
    pl = namespace(ns)
    other = next(c for n, c in CALLBACKS.items() if n != ns)
    module, _, name = other.rpartition(".")

    def fit(root, max_epochs, ckpt_path=None):
        cb = getattr(importlib.import_module(module), name)(num_queries=2, solver="exact", on_error="raise",
                                                            params=["net.1.bias"], every_n_epochs=1)
        trainer = pl.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=pl.loggers.CSVLogger(str(root)),
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             default_root_dir=str(root), callbacks=[cb], limit_val_batches=1)
        trainer.fit(digits_module(pl)(n_train=80), ckpt_path=ckpt_path)
        return cb, trainer

    cb, trainer = fit(tmp_path, 2)
    assert cb.error is None and cb.results.scores.shape == (2, 80) and cb.history.epochs() == [0, 1]
    assert cb.results_path == str(tmp_path / "lightning_logs" / "version_0" / "influence" / "results.pt")
    assert (tmp_path / "lightning_logs" / "version_0" / "influence" / "report.html").is_file()
    trainer.save_checkpoint(str(tmp_path / "two.ckpt"))
    resumed, _ = fit(tmp_path / "resumed", 3, ckpt_path=str(tmp_path / "two.ckpt"))
    assert resumed.history.epochs() == [0, 1, 2] and torch.equal(resumed.history[0].scores, cb.history[0].scores)
