"""Reporters: each turns an :class:`~lightning_influence.results.InfluenceResults` into one kind of output.

:func:`report_influence` is what the callback calls once the results exist: scalar summaries to every
logger, a self-contained HTML report, and, when the trainer has a ``WandbLogger``, tables with example
previews, histograms, summary, config and an artifact in that W&B run. Nothing is printed; the paths and
names written are returned.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import pytorch_lightning as pl
from torch.utils.data import Dataset

from ..results import InfluenceResults
from .content import HARMFUL, HELPFUL, SIGN_CONVENTION, query_views, suspects
from .html import render_html, write_html
from .previews import ExampleCatalog
from .scalars import log_scalars, summary_scalars

__all__ = ["report_influence", "report_epoch", "summary_scalars", "influence_dir", "default_report_path", "HELPFUL", "HARMFUL", "SIGN_CONVENTION"]


def influence_dir(trainer: "pl.Trainer") -> str:
    """``influence/`` under the trainer's log directory, where the results file and the HTML report go by
    default. A collective (``trainer.log_dir`` broadcasts from rank zero): call it on every rank."""
    return os.path.join(trainer.log_dir or trainer.default_root_dir, "influence")


def default_report_path(trainer: "pl.Trainer") -> str:
    """``influence/report.html`` under the trainer's log directory (beside the saved results). A collective
    (:func:`influence_dir`): call it on every rank."""
    return os.path.join(influence_dir(trainer), "report.html")


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
    """Send ``results`` to every logger of ``trainer`` and write the HTML report, on global rank zero.

    Call it on every process: without ``report_path`` the default path is resolved through
    ``trainer.log_dir``, a collective; after that, other ranks return at once.

    Args:
        results_path: the saved results file, put into the W&B artifact (saved to a temporary file
            for the artifact when ``None``).
        report_path: where the HTML report goes (default :func:`default_report_path`).
        render_example: ``render_example(dataset[i]) -> value`` for previews; see
            :mod:`lightning_influence.reporting.previews`.
        top_k: helpful and harmful examples shown per query.
        html: write the HTML report.
        wandb: log to the trainer's ``WandbLogger`` when it has one.
        self_influence_k: self-influence suspects shown (default ``max(top_k, 10)``).
        classes: class names for integer labels (default ``dataset.classes`` when present).
        history: every run of the fit, ``{epoch: results}`` (``InfluenceCallback.history``); with more
            than one, the HTML report and the W&B run show how the top examples moved across them.
        history_paths: ``{epoch: results file}`` of those runs, added to the W&B artifact.

    Returns:
        ``{"scalars": {...}, "html_path": str | None, "wandb_run_dir": str | None, "wandb_run_id": ...,
        "wandb_artifact": "name:latest" | None, "wandb_keys": [...], "errors": {...}}``; ``{}`` on other
        ranks. Each output fails on its own: ``errors`` maps the outputs that failed (``"logger
        scalars"``, ``"report content"``, ``"HTML report"``, ``"W&B"``) to their exceptions, and the
        others are still written.
    """
    path = os.fspath(report_path) if report_path is not None else (default_report_path(trainer) if html else None)
    if not trainer.is_global_zero:
        return {}
    from .wandb import find_wandb_logger

    wandb_logger = find_wandb_logger(trainer) if wandb else None
    errors: Dict[str, BaseException] = {}
    out: Dict[str, Any] = {
        "scalars": {},
        "html_path": None,
        "wandb_run_dir": None,
        "wandb_run_id": None,
        "wandb_artifact": None,
        "wandb_keys": [],
        "errors": errors,
    }
    try:
        out["scalars"] = log_scalars(trainer, results, skip=[wandb_logger] if wandb_logger is not None else [])
    except Exception as err:  # noqa: BLE001 - each output fails on its own
        errors["logger scalars"] = err
    suspects_k = self_influence_k if self_influence_k is not None else max(top_k, 10)
    try:
        views = query_views(results, top_k)
        suspect_entries = suspects(results, suspects_k)
        train = ExampleCatalog(train_dataset, render_example, classes)
        query = ExampleCatalog(query_dataset, render_example, classes)
    except Exception as err:  # noqa: BLE001
        errors["report content"] = err
        return out

    if html:
        links = {"results": results_path} if results_path else None
        try:
            out["html_path"] = write_html(path, render_html(results, views, suspect_entries, train, query, links=links,
                                                                 history=history, top_k=top_k,
                                                                 self_influence_k=suspects_k))
        except Exception as err:  # noqa: BLE001
            errors["HTML report"] = err
    if wandb_logger is not None:
        from .wandb import log_to_wandb

        try:
            out.update(
                log_to_wandb(
                    trainer, wandb_logger, results, views, suspect_entries, train, query,
                    results_path=results_path, html_path=out["html_path"], history=history,
                    history_paths=history_paths, top_k=top_k,
                )
            )
        except Exception as err:  # noqa: BLE001
            errors["W&B"] = err
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
    from .wandb import find_wandb_logger

    wandb_logger = find_wandb_logger(trainer)
    errors: Dict[str, BaseException] = {}
    out: Dict[str, Any] = {"scalars": {}, "wandb_run_dir": None, "wandb_run_id": None, "wandb_keys": [], "errors": errors}
    try:
        out["scalars"] = log_scalars(trainer, results, skip=[wandb_logger] if wandb_logger is not None else [],
                                     extra={"influence/epoch": float(epoch)})
    except Exception as err:  # noqa: BLE001 - each output fails on its own
        errors["logger scalars"] = err
    if wandb_logger is not None:
        from .wandb import log_epoch_to_wandb

        try:
            suspects_k = self_influence_k if self_influence_k is not None else max(top_k, 10)
            train = ExampleCatalog(train_dataset, render_example, classes)
            out.update(log_epoch_to_wandb(trainer, wandb_logger, results, epoch, history, train, top_k, suspects_k))
        except Exception as err:  # noqa: BLE001
            errors["W&B"] = err
    return out
