"""The reporters' context from a Trainer: its loggers, its ``WandbLogger``'s run, the run's folder and step.

The reporters themselves (:mod:`lightning_influence.reporting`) know no Lightning; this module reads what
they need from a Trainer. :func:`report_influence` sends one run's results through the
reporters the way the callback does, for users who drive a Trainer themselves (an in-loop run: the same with
``key=RunKey("epoch", e, step)`` in the reporters' context, which :func:`trainer_context` builds).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from torch.utils.data import Dataset

from ..record import RunKey
from ..reporting.reporters import ReportContext, Reporter, default_reporters, report
from ..results import InfluenceResults
from .outputs import FOLDER, broadcast_from_zero, run_dir

__all__ = ["WANDB_LOGGER_MODULES", "default_report_path", "find_wandb_logger", "influence_dir",
           "report_influence", "trainer_context"]

#: where each Lightning namespace defines its ``WandbLogger``
WANDB_LOGGER_MODULES = ("pytorch_lightning.loggers.wandb", "lightning.pytorch.loggers.wandb")


def find_wandb_logger(trainer: Any) -> Optional[Any]:
    """The first ``WandbLogger`` of the trainer, from either namespace (``pytorch_lightning`` or
    ``lightning.pytorch``), or ``None``. Imports nothing: a logger's class is loaded once it exists."""
    classes = tuple(
        cls for cls in (getattr(sys.modules.get(m), "WandbLogger", None) for m in WANDB_LOGGER_MODULES) if cls is not None
    )
    for logger in trainer.loggers:
        if classes and isinstance(logger, classes):
            return logger
    return None


def influence_dir(trainer: Any) -> str:
    """``influence/`` under the run's folder as ``ModelCheckpoint`` resolves it
    (:func:`~.outputs.run_dir`: the logger's save dir, name and version, else ``default_root_dir``). A
    collective (global rank zero resolves it and broadcasts): call it on every rank. The callback gives each
    fit a folder of its own instead (:func:`~.outputs.fit_outputs`)."""
    return os.path.join(broadcast_from_zero(trainer, run_dir(trainer) if trainer.is_global_zero else None), FOLDER)


def default_report_path(trainer: Any) -> str:
    """``influence/report.html`` under the run's folder (:func:`influence_dir`). A collective: call it on every
    rank."""
    return os.path.join(influence_dir(trainer), "report.html")


def trainer_context(trainer: Any, *, train_dataset: Optional[Dataset] = None, query_dataset: Optional[Dataset] = None,
                    report_path: Optional[Union[str, "os.PathLike[str]"]] = None, key: Optional[RunKey] = None,
                    wandb: bool = True, **kwargs: Any) -> ReportContext:
    """A :class:`~lightning_influence.reporting.ReportContext` for ``trainer``: its loggers other than the
    ``WandbLogger`` for :class:`~lightning_influence.reporting.Scalars`, that logger's run for
    :class:`~lightning_influence.reporting.Wandb` (``wandb=False``: none), the report path and the step.
    ``kwargs`` are the context's other fields (``top_k``, ``history``, …)."""
    wandb_logger = find_wandb_logger(trainer) if wandb else None
    loggers = [lg for lg in trainer.loggers if lg is not wandb_logger]
    return ReportContext(train_dataset=train_dataset, query_dataset=query_dataset, step=int(trainer.global_step),
                         loggers=loggers, report_path=report_path, wandb_run=wandb_logger, key=key, **kwargs)


def report_influence(
    trainer: Any,
    pl_module: Any,
    results: InfluenceResults,
    *,
    train_dataset: Dataset,
    query_dataset: Dataset,
    results_path: Optional[str] = None,
    report_path: Optional[Union[str, os.PathLike]] = None,
    render_example: Optional[Callable[[Any], Any]] = None,
    decode: Optional[Callable[[List[int]], str]] = None,
    top_k: int = 10,
    html: bool = True,
    wandb: bool = True,
    self_influence_k: Optional[int] = None,
    classes: Optional[Sequence[str]] = None,
    history: Optional[Mapping[Any, InfluenceResults]] = None,
    history_paths: Optional[Mapping[Any, str]] = None,
    reporters: Optional[Sequence[Reporter]] = None,
) -> Dict[str, Any]:
    """Send ``results`` to every logger of ``trainer`` and write the HTML report, on global rank zero: the
    full report of :func:`~lightning_influence.reporting.report` with ``reporters`` (default
    :func:`~lightning_influence.reporting.default_reporters`; ``html=False`` leaves out the HTML report,
    ``wandb=False`` the W&B run) in :func:`trainer_context`. ``render_example`` and ``decode`` say how examples
    are shown (:class:`~lightning_influence.reporting.ReportContext`).

    Call it on every process: without ``report_path`` the default path is resolved by global rank zero and
    broadcast (:func:`influence_dir`), a collective; after that, other ranks return at once.

    Returns:
        ``{"scalars": {...}, "html_path": str | None, "wandb_run_dir": str | None, "wandb_run_id": ...,
        "wandb_artifact": "name:latest" | None, "wandb_keys": [...], "errors": {...}}``; ``{}`` on other
        ranks. Each output fails on its own: ``errors`` maps the outputs that failed (``"logger
        scalars"``, ``"HTML report"``, ``"W&B"``) to their exceptions, and the others are still written.
    """
    path = os.fspath(report_path) if report_path is not None else (default_report_path(trainer) if html else None)
    if not trainer.is_global_zero:
        return {}
    chosen = list(reporters) if reporters is not None else default_reporters()
    if not html:
        chosen = [r for r in chosen if r.name != "HTML report"]
    context = trainer_context(trainer, train_dataset=train_dataset, query_dataset=query_dataset, report_path=path,
                              wandb=wandb, render_example=render_example, decode=decode, classes=classes, top_k=top_k,
                              self_influence_k=self_influence_k, results_path=results_path, history=history,
                              history_paths=history_paths)
    out: Dict[str, Any] = {"scalars": {}, "html_path": None, "wandb_run_dir": None, "wandb_run_id": None,
                           "wandb_artifact": None, "wandb_keys": []}
    out.update(report(results, chosen, context))
    return out
