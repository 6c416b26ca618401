"""Reporters without a Trainer: one small interface for every output of an influence report.

    from lightning_influence.reporting import Html, ReportContext, Scalars, Wandb, report

    ctx = ReportContext(train_dataset=train, query_dataset=val, top_k=5)
    out = report(results, [Scalars([csv_logger]), Html("influence.html"), Wandb(wandb.run)], ctx)

A reporter is a callable ``reporter(results, context) -> dict`` with a ``name``; :func:`report` calls
each in turn, and each fails on its own (``out["errors"]`` maps the names that failed to their
exceptions, the others still write). The callback builds the same list from its Trainer's loggers
(:func:`~lightning_influence.reporting.report_influence`), so a user of ``compute_influence`` gets the
same W&B tables and HTML report. A new output is a new reporter, not a new flag.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Union

from torch.utils.data import Dataset

from ..results import InfluenceResults
from .content import Entry, QueryView, query_views, suspects
from .previews import ExampleCatalog

__all__ = ["Html", "ReportContext", "Reporter", "Scalars", "Wandb", "report"]


@dataclass
class ReportContext:
    """Everything a reporter needs besides the results; no Trainer.

    Attributes:
        train_dataset / query_dataset: the datasets the results index (for previews and labels); either
            may be ``None`` (the examples are then shown by index only).
        render_example: ``render_example(dataset[i]) -> value`` for previews (see
            :mod:`lightning_influence.reporting.previews`).
        classes: class names for integer labels (default ``dataset.classes`` when present).
        top_k: helpful and harmful examples shown per query.
        self_influence_k: self-influence suspects shown (default ``max(top_k, 10)``).
        step: the training step the results explain (W&B row and logger step).
        results_path: the saved results file, linked from the HTML report and put into the W&B artifact.
        history: ``{epoch: results}`` of every run of a fit (``InfluenceCallback.history``); with more than
            one, the reports show how the top examples moved across them.
        history_paths: ``{epoch: results file}`` of those runs (added to the W&B artifact).
        epoch: set for a run inside the training loop: reporters then write their per-epoch part only
            (scalars with ``influence/epoch``, the W&B over-epochs row); ``None`` for a full report.
        outputs: what the reporters before this one returned (the W&B reporter embeds the HTML report
            written just before it).
    """

    train_dataset: Optional[Dataset] = None
    query_dataset: Optional[Dataset] = None
    render_example: Optional[Callable[[Any], Any]] = None
    classes: Optional[Sequence[str]] = None
    top_k: int = 10
    self_influence_k: Optional[int] = None
    step: int = 0
    results_path: Optional[str] = None
    history: Optional[Mapping[int, InfluenceResults]] = None
    history_paths: Optional[Mapping[int, str]] = None
    epoch: Optional[int] = None
    outputs: Dict[str, Any] = field(default_factory=dict)
    #: the views and suspects already computed, by (what, id of the results)
    _cache: Dict[Any, Any] = field(default_factory=dict, init=False, repr=False)

    @property
    def suspects_k(self) -> int:
        return self.self_influence_k if self.self_influence_k is not None else max(self.top_k, 10)

    @cached_property
    def train(self) -> ExampleCatalog:
        return ExampleCatalog(self.train_dataset, self.render_example, self.classes)

    @cached_property
    def query(self) -> ExampleCatalog:
        return ExampleCatalog(self.query_dataset, self.render_example, self.classes)

    def views(self, results: InfluenceResults) -> List[QueryView]:
        """Each query's top helpful and harmful examples (computed once per results object)."""
        key = ("views", id(results))
        if key not in self._cache:
            self._cache[key] = query_views(results, self.top_k)
        return self._cache[key]

    def suspects(self, results: InfluenceResults) -> List[Entry]:
        """The self-influence suspects (empty without self-influence)."""
        key = ("suspects", id(results))
        if key not in self._cache:
            self._cache[key] = suspects(results, self.suspects_k)
        return self._cache[key]


class Reporter(Protocol):
    """One output of a report: ``reporter(results, context) -> {what was written}``."""

    name: str

    def __call__(self, results: InfluenceResults, context: ReportContext) -> Dict[str, Any]: ...


class Scalars:
    """Summary scalars (``influence/...``: medians, damping, timings, solver diagnostics) to loggers with
    Lightning's logger interface (``log_metrics(metrics, step)``, ``save()``): CSV, TensorBoard, MLflow…

    Args:
        loggers: the loggers to write to.
    """

    name = "logger scalars"

    def __init__(self, loggers: Sequence[Any]) -> None:
        self.loggers = list(loggers)

    def __call__(self, results: InfluenceResults, context: ReportContext) -> Dict[str, Any]:
        from .scalars import summary_scalars

        metrics: Dict[str, float] = dict(summary_scalars(results))
        if context.epoch is not None:
            metrics["influence/epoch"] = float(context.epoch)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=context.step)
            logger.save()
        return {"scalars": metrics}


class Html:
    """The self-contained HTML report (queries with previews and their top examples, self-influence
    suspects, diagnostics, movement across epochs), written atomically to ``path``. Skipped for a run
    inside the training loop (``context.epoch`` set): the report at the end of training covers every run.
    """

    name = "HTML report"

    def __init__(self, path: Union[str, "os.PathLike[str]"]) -> None:
        self.path = os.fspath(path)

    def __call__(self, results: InfluenceResults, context: ReportContext) -> Dict[str, Any]:
        if context.epoch is not None:
            return {}
        from .html import render_html, write_html

        links = {"results": context.results_path} if context.results_path else None
        html = render_html(results, context.views(results), context.suspects(results), context.train, context.query,
                           links=links, history=context.history, top_k=context.top_k,
                           self_influence_k=context.suspects_k)
        return {"html_path": write_html(self.path, html)}


class Wandb:
    """Tables with example previews, histograms, charts, summary, config and the ``influence-scores``
    artifact, in one ``run.log`` row of a W&B run (the run is neither started nor finished here). For a
    run inside the training loop, one row of summary scalars, ``influence/epoch`` and, from the second
    run on, the over-epochs table.

    Args:
        run: a ``wandb`` run (``wandb.init(...)`` or ``wandb.run``), or a Lightning ``WandbLogger`` (its
            ``experiment`` is used).
    """

    name = "W&B"

    def __init__(self, run: Any) -> None:
        self.run = run

    def _run(self) -> Any:
        return self.run.experiment if hasattr(self.run, "experiment") and hasattr(self.run, "log_metrics") else self.run

    def __call__(self, results: InfluenceResults, context: ReportContext) -> Dict[str, Any]:
        from .wandb import log_epoch_to_wandb, log_to_wandb

        if context.epoch is not None:
            return log_epoch_to_wandb(self._run(), results, context.epoch, context.history or {context.epoch: results},
                                      context.train, context.step, context.top_k, context.suspects_k)
        return log_to_wandb(self._run(), results, context.views(results), context.suspects(results), context.train,
                            context.query, step=context.step, results_path=context.results_path,
                            html_path=context.outputs.get("html_path"), history=context.history,
                            history_paths=context.history_paths, top_k=context.top_k)


def report(results: InfluenceResults, reporters: Sequence[Reporter],
           context: Optional[ReportContext] = None) -> Dict[str, Any]:
    """Hand ``results`` to each reporter in order; each fails on its own.

    Returns:
        the reporters' outputs merged (e.g. ``scalars``, ``html_path``, ``wandb_run_dir``,
        ``wandb_artifact``), plus ``errors``: ``{reporter name: exception}`` for those that failed.
    """
    context = context or ReportContext()
    errors: Dict[str, BaseException] = {}
    for reporter in reporters:
        try:
            context.outputs.update(reporter(results, context))
        except Exception as err:  # noqa: BLE001 - each output fails on its own
            errors[reporter.name] = err
    return {**context.outputs, "errors": errors}
