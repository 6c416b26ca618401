"""Reporters: each turns an :class:`~lightning_influence.results.InfluenceResults` into one kind of output.

Without a Trainer: :func:`report` with reporters (:class:`Scalars`, :class:`Html`, :class:`Wandb`) and a
:class:`ReportContext` (see :mod:`.reporters`). With one, :func:`report_influence` (what the callback
calls once the results exist) builds the same reporters from the Trainer: scalar summaries to every
logger, a self-contained HTML report, and, when the trainer has a ``WandbLogger``, tables with example
previews, histograms, summary, config and an artifact in that W&B run; :func:`report_epoch` does a run
inside the training loop. Nothing is printed; the paths and names written are returned.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import pytorch_lightning as pl
from torch.utils.data import Dataset

from ..results import InfluenceResults
from .content import HARMFUL, HELPFUL, SIGN_CONVENTION
from .reporters import Html, ReportContext, Reporter, Scalars, Wandb, report
from .scalars import summary_scalars

__all__ = ["Html", "ReportContext", "Reporter", "Scalars", "Wandb", "report", "report_influence", "report_epoch",
           "reporters_for", "summary_scalars", "influence_dir", "default_report_path", "HELPFUL", "HARMFUL",
           "SIGN_CONVENTION"]


def influence_dir(trainer: "pl.Trainer") -> str:
    """``influence/`` under the trainer's log directory, where the results file and the HTML report go by
    default. A collective (``trainer.log_dir`` broadcasts from rank zero): call it on every rank."""
    return os.path.join(trainer.log_dir or trainer.default_root_dir, "influence")


def default_report_path(trainer: "pl.Trainer") -> str:
    """``influence/report.html`` under the trainer's log directory (beside the saved results). A collective
    (:func:`influence_dir`): call it on every rank."""
    return os.path.join(influence_dir(trainer), "report.html")


def reporters_for(trainer: "pl.Trainer", html_path: Optional[str] = None, wandb: bool = True) -> List[Reporter]:
    """The reporters for a Trainer: :class:`Scalars` to its loggers (all but the ``WandbLogger``), an
    :class:`Html` report at ``html_path`` (none when ``None``) and, with ``wandb`` and a ``WandbLogger``,
    :class:`Wandb` on its run."""
    from .wandb import find_wandb_logger

    wandb_logger = find_wandb_logger(trainer) if wandb else None
    out: List[Reporter] = [Scalars([lg for lg in trainer.loggers if lg is not wandb_logger])]
    if html_path is not None:
        out.append(Html(html_path))
    if wandb_logger is not None:
        out.append(Wandb(wandb_logger))
    return out


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
    html: bool = True,
    wandb: bool = True,
    self_influence_k: Optional[int] = None,
    classes: Optional[Sequence[str]] = None,
    history: Optional[Mapping[int, InfluenceResults]] = None,
    history_paths: Optional[Mapping[int, str]] = None,
) -> Dict[str, Any]:
    """Send ``results`` to every logger of ``trainer`` and write the HTML report, on global rank zero:
    :func:`report` with :func:`reporters_for` the trainer.

    Call it on every process: without ``report_path`` the default path is resolved through
    ``trainer.log_dir``, a collective; after that, other ranks return at once.

    Args:
        results_path: the saved results file, put into the W&B artifact (saved to a temporary file
            for the artifact when ``None``).
        report_path: where the HTML report goes (default :func:`default_report_path`).
        html: write the HTML report. wandb: log to the trainer's ``WandbLogger`` when it has one.
        render_example, top_k, self_influence_k, classes, history, history_paths: see
            :class:`ReportContext`.

    Returns:
        ``{"scalars": {...}, "html_path": str | None, "wandb_run_dir": str | None, "wandb_run_id": ...,
        "wandb_artifact": "name:latest" | None, "wandb_keys": [...], "errors": {...}}``; ``{}`` on other
        ranks. Each output fails on its own: ``errors`` maps the outputs that failed (``"logger
        scalars"``, ``"HTML report"``, ``"W&B"``) to their exceptions, and the others are still written.
    """
    path = os.fspath(report_path) if report_path is not None else (default_report_path(trainer) if html else None)
    if not trainer.is_global_zero:
        return {}
    context = ReportContext(train_dataset=train_dataset, query_dataset=query_dataset, render_example=render_example,
                            classes=classes, top_k=top_k, self_influence_k=self_influence_k,
                            step=int(trainer.global_step), results_path=results_path, history=history,
                            history_paths=history_paths)
    out = {"scalars": {}, "html_path": None, "wandb_run_dir": None, "wandb_run_id": None, "wandb_artifact": None,
           "wandb_keys": []}
    out.update(report(results, reporters_for(trainer, path if html else None, wandb), context))
    return out


def report_epoch(
    trainer: "pl.Trainer",
    results: InfluenceResults,
    *,
    epoch: int,
    history: Mapping[int, InfluenceResults],
    train_dataset: Dataset,
    top_k: int = 10,
    self_influence_k: Optional[int] = None,
    render_example: Optional[Callable[[Any], Any]] = None,
    classes: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Report one run inside the training loop (``InfluenceCallback(every_n_epochs=k)``), on global rank
    zero (other ranks return ``{}`` at once; no collectives): the summary scalars and
    ``influence/epoch`` to every logger at the current global step, and to a ``WandbLogger`` one row that
    also holds, from the second run on, how the top examples moved across the runs
    (:func:`.wandb.over_epochs_row`). The HTML report and the W&B tables with previews are written once,
    when training ends, by :func:`report_influence`.

    Returns:
        ``{"scalars": {...}, "wandb_run_dir": ..., "wandb_run_id": ..., "wandb_keys": [...], "errors": {...}}``,
        each output failing on its own as in :func:`report_influence`.
    """
    if not trainer.is_global_zero:
        return {}
    context = ReportContext(train_dataset=train_dataset, render_example=render_example, classes=classes, top_k=top_k,
                            self_influence_k=self_influence_k, step=int(trainer.global_step), history=history,
                            epoch=int(epoch))
    out = {"scalars": {}, "wandb_run_dir": None, "wandb_run_id": None, "wandb_keys": []}
    out.update(report(results, reporters_for(trainer), context))
    return out
