"""Tiny LightningModules for callback tests."""

from __future__ import annotations

from typing import Any, Dict, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


class LitClassifier(pl.LightningModule):
    """Wraps any ``net``; SGD with coupled L2 ``weight_decay`` (so damping = weight_decay)."""

    def __init__(self, net: Optional[nn.Module] = None, lr: float = 0.5, weight_decay: float = 1e-2,
                 optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = net if net is not None else nn.Linear(64, 10)
        self.lr, self.weight_decay, self.optimizer_name = lr, weight_decay, optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class DictDataset(Dataset):
    """Examples as dicts ``{"pixels": x, "label": y}``: needs the ``influence_loss`` hook."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"pixels": self.x[i], "label": self.y[i]}


class LitDictClassifier(LitClassifier):
    """Same model, dict batches, per-example loss through ``influence_loss``."""

    def influence_loss(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self(batch["pixels"]), batch["label"], reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.influence_loss(batch).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.influence_loss(batch).mean())


def loaders(train: Dataset, val: Dataset, shuffle: bool = True, batch_size: int = 64):
    return (DataLoader(train, batch_size=batch_size, shuffle=shuffle), DataLoader(val, batch_size=256))


def quiet_trainer(tmp_path, **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without progress bar, summary or checkpoints, logging CSV under ``tmp_path``."""
    defaults: Dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, logger=pl.loggers.CSVLogger(str(tmp_path)), default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
