"""Reporters: each turns an :class:`~lightning_influence.results.InfluenceResults` into one kind of output.

:func:`report_influence` is what the callback calls once the results exist.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Union

import pytorch_lightning as pl
from torch.utils.data import Dataset

from ..results import InfluenceResults
from .scalars import log_scalars, summary_scalars

__all__ = ["report_influence", "summary_scalars"]


def report_influence(
    trainer: "pl.Trainer",
    pl_module: "pl.LightningModule",
    results: InfluenceResults,
    *,
    train_dataset: Dataset,
    query_dataset: Dataset,
    results_path: Optional[str] = None,
    report_path: Optional[Union[str, os.PathLike]] = None,
    render_example: Optional[Callable[[Any], Any]] = None,
    top_k: int = 10,
) -> Dict[str, Any]:
    """Send ``results`` to every logger of ``trainer``. Returns what was written (paths, keys)."""
    return {"scalars": log_scalars(trainer, results)}
