"""Reporters: each turns an :class:`~lightning_influence.results.InfluenceResults` into one kind of output,
with or without a Trainer.

    from lightning_influence.reporting import Html, ReportContext, Scalars, Wandb, report

    ctx = ReportContext(train_dataset=train, query_dataset=val, top_k=5)
    out = report(results, [Scalars([csv_logger]), Html("influence.html"), Wandb(wandb.run)], ctx)

A reporter has a ``name`` and two methods (:class:`Reporter`): :meth:`Reporter.report_fit` writes the full
report (the end of a fit, or a call like the one above) and :meth:`Reporter.report_run` the part worth
writing after every run inside a training loop (scalars at that step); a plain callable
``reporter(results, context) -> dict`` with a ``name`` is a reporter whose ``report_fit`` is the call.
:func:`report` calls each in turn, and each fails on its own (``out["errors"]`` maps the names that failed
to their exceptions; the others still write). No reporter reads another's output. The callback passes
its reporters the same way (``InfluenceCallback(reporters=[...])``, default :func:`default_reporters`);
a reporter built without its target (``Scalars()``, ``Html()``, ``Wandb()``) takes it from the context,
which the callback fills from the Trainer (its loggers, the report path, its ``WandbLogger``'s run).

Nothing here imports Lightning, and ``wandb`` is imported only by the W&B reporter when it writes.

Example:
    >>> import torch
    >>> from lightning_influence import InfluenceResults
    >>> res = InfluenceResults(torch.tensor([[0.5, -1.0]]), torch.tensor([0]), torch.tensor([0, 1]),
    ...                        torch.tensor([0.3]), settings={"solver": "exact", "damping": 0.1})
    >>> class Printer(Reporter):
    ...     name = "printer"
    ...     def report_fit(self, results, context):
    ...         print("most harmful:", results.top_harmful(0, k=1).indices.tolist())
    ...         return {}
    >>> out = report(res, [Printer()])
    most harmful: [0]
    >>> out["errors"]
    {}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from torch.utils.data import Dataset

from ..record import RunKey
from ..results import InfluenceResults
from . import keys
from .content import Entry, QueryView, query_views, suspects
from .previews import Decoder, ExampleCatalog, check_decode
from .tokens import TokenView, token_views

__all__ = ["Html", "ReportContext", "Reporter", "Scalars", "Wandb", "default_reporters", "report"]


@dataclass
class ReportContext:
    """Everything a reporter needs besides the results; no Trainer.

    Attributes:
        train_dataset / query_dataset: the datasets the results index (for previews and labels); either
            may be ``None`` (the examples are then shown by index only).
        render_example: ``render_example(dataset[i]) -> value`` for previews (see
            :mod:`lightning_influence.reporting.previews`).
        decode: ``decode(token_ids: list[int]) -> str`` (a tokenizer's ``decode``): token ids are shown as this
            text in every report (HTML, W&B tables, top-k lists, the per-token heat map). ``render_example``
            picks what is shown, then ``decode`` turns any token ids in it into text; a ``decode`` that fails
            on an example shows its ids (one warning). Not callable: an error at construction.
        classes: class names for integer labels (default ``dataset.classes`` when present).
        top_k: helpful and harmful examples shown per query.
        self_influence_k: self-influence suspects shown (default ``max(top_k, 10)``).
        step: the training step the results explain (W&B row and logger step).
        results_path: the saved results file, linked from the HTML report and put into the W&B artifact.
        history: ``{run: results}`` of every run of a fit (``InfluenceCallback.history``, keyed by
            :class:`~lightning_influence.record.RunKey`, or by epoch); with more than one, the reports show how
            the top examples moved across them.
        history_paths: ``{run: results file}`` of those runs (added to the W&B artifact).
        epoch: the epoch of a run inside the training loop (shorthand for a ``key`` with trigger ``"epoch"``).
        key: the run inside the training loop these results are (``None``, or trigger ``"final"``: a full
            report). :func:`report` then calls :meth:`Reporter.report_run` instead of ``report_fit``.
        loggers: Lightning-style loggers (``log_metrics(metrics, step)``) for :class:`Scalars` built without
            its own.
        report_path: where :class:`Html` built without a path writes.
        wandb_run: the W&B run for :class:`Wandb` built without one.
        outputs: what the reporters before this one returned (paths, ids); for the caller, not for other
            reporters to read.
    """

    train_dataset: Optional[Dataset] = None
    query_dataset: Optional[Dataset] = None
    render_example: Optional[Callable[[Any], Any]] = None
    decode: Optional[Callable[[List[int]], str]] = None
    classes: Optional[Sequence[str]] = None
    top_k: int = 10
    self_influence_k: Optional[int] = None
    step: int = 0
    results_path: Optional[str] = None
    history: Optional[Mapping[Any, InfluenceResults]] = None
    history_paths: Optional[Mapping[Any, str]] = None
    epoch: Optional[int] = None
    key: Optional[RunKey] = None
    loggers: Sequence[Any] = ()
    report_path: Optional[Union[str, "os.PathLike[str]"]] = None
    wandb_run: Any = None
    outputs: Dict[str, Any] = field(default_factory=dict)
    #: the views and suspects already computed, by (what, id of the results)
    _cache: Dict[Any, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_decode(self.decode)

    @cached_property
    def decoder(self) -> Decoder:
        """``decode`` with its fallback, shared by the train and query catalogs."""
        return Decoder(self.decode)

    @property
    def in_loop(self) -> bool:
        """Whether this is a run inside the training loop (per-run output only)."""
        if self.key is not None:
            return self.key.trigger in ("epoch", "step")
        return self.epoch is not None

    @property
    def run_epoch(self) -> Optional[int]:
        """The epoch of the run (``key.epoch``, else ``epoch``)."""
        return self.key.epoch if self.key is not None else self.epoch

    @property
    def suspects_k(self) -> int:
        return self.self_influence_k if self.self_influence_k is not None else max(self.top_k, 10)

    @cached_property
    def train(self) -> ExampleCatalog:
        return ExampleCatalog(self.train_dataset, self.render_example, self.classes, self.decoder)

    @cached_property
    def query(self) -> ExampleCatalog:
        return ExampleCatalog(self.query_dataset, self.render_example, self.classes, self.decoder)

    def views(self, results: InfluenceResults) -> List[QueryView]:
        """Each query's top helpful and harmful examples (computed once per results object)."""
        key = ("views", id(results))
        if key not in self._cache:
            self._cache[key] = query_views(results, self.top_k)
        return self._cache[key]

    def tokens(self, results: InfluenceResults) -> List[TokenView]:
        """The per-token heat maps of the queries (empty without per-token scores)."""
        key = ("tokens", id(results))
        if key not in self._cache:
            self._cache[key] = token_views(results, self.views(results), self.query)
        return self._cache[key]

    def suspects(self, results: InfluenceResults) -> List[Entry]:
        """The self-influence suspects (empty without self-influence)."""
        key = ("suspects", id(results))
        if key not in self._cache:
            self._cache[key] = suspects(results, self.suspects_k)
        return self._cache[key]


class Reporter:
    """Base of the reporters: a ``name`` (what ``out["errors"]`` is keyed by) and two methods, each
    returning what it wrote (paths, ids, keys) as a dict. Subclass it for a reporter of your own."""

    name: str = "reporter"

    def report_run(self, results: InfluenceResults, context: ReportContext) -> Dict[str, Any]:
        """Output for one run inside a training loop (``every_n_epochs``, ``every_n_steps``). Default: none."""
        return {}

    def report_fit(self, results: InfluenceResults, context: ReportContext) -> Dict[str, Any]:
        """The full report: the end of a fit, or a call of :func:`report` outside a loop."""
        raise NotImplementedError

    def __call__(self, results: InfluenceResults, context: ReportContext) -> Dict[str, Any]:
        return self.report_run(results, context) if context.in_loop else self.report_fit(results, context)


class Scalars(Reporter):
    """Summary scalars (``influence/...``: medians, damping, timings, solver diagnostics, see
    :mod:`.keys`) to loggers with Lightning's logger interface (``log_metrics(metrics, step)``, ``save()``):
    CSV, TensorBoard, MLflow… Runs inside the loop get ``influence/epoch`` and ``influence/global_step``.

    Args:
        loggers: the loggers to write to (default: ``context.loggers``).
    """

    name = "logger scalars"

    def __init__(self, loggers: Optional[Sequence[Any]] = None) -> None:
        self.loggers = None if loggers is None else list(loggers)

    def _write(self, results: InfluenceResults, context: ReportContext, in_loop: bool) -> Dict[str, Any]:
        from .scalars import summary_scalars

        metrics: Dict[str, float] = dict(summary_scalars(results))
        if in_loop:
            metrics[keys.EPOCH] = float(context.run_epoch if context.run_epoch is not None else -1)
            if context.key is not None:
                metrics[keys.GLOBAL_STEP] = float(context.key.global_step)
        for logger in self.loggers if self.loggers is not None else context.loggers:
            logger.log_metrics(metrics, step=context.step)
            logger.save()
        return {"scalars": metrics}

    def report_run(self, results: InfluenceResults, context: ReportContext) -> Dict[str, Any]:
        return self._write(results, context, True)

    def report_fit(self, results: InfluenceResults, context: ReportContext) -> Dict[str, Any]:
        return self._write(results, context, False)


class Html(Reporter):
    """The self-contained HTML report (queries with previews and their top examples, self-influence
    suspects, diagnostics, movement across the runs of a fit), written atomically to ``path`` (default:
    ``context.report_path``). Nothing for a run inside the training loop: the report at the end covers
    every run."""

    name = "HTML report"

    def __init__(self, path: Optional[Union[str, "os.PathLike[str]"]] = None) -> None:
        self.path = None if path is None else os.fspath(path)

    def report_fit(self, results: InfluenceResults, context: ReportContext) -> Dict[str, Any]:
        path = self.path if self.path is not None else context.report_path
        if path is None:
            raise ValueError("Html() has no path: pass Html(path) or a ReportContext with report_path.")
        from .html import write_html

        return {"html_path": write_html(path, render_report(results, context))}


class Wandb(Reporter):
    """Tables with example previews, histograms, charts, summary, config and the ``influence-scores``
    artifact, in one ``run.log`` row of a W&B run (the run is neither started nor finished here). For a
    run inside the training loop, one row of summary scalars, ``influence/epoch`` and, from the second
    run on, the over-epochs table.

    Args:
        run: a ``wandb`` run (``wandb.init(...)`` or ``wandb.run``), or a Lightning ``WandbLogger`` (its
            ``experiment`` is used); default: ``context.wandb_run``.
    """

    name = "W&B"

    def __init__(self, run: Any = None) -> None:
        self.run = run

    def _run(self, context: ReportContext) -> Any:
        run = self.run if self.run is not None else context.wandb_run
        if run is None:
            raise ValueError("Wandb() has no run: pass Wandb(run) or a ReportContext with wandb_run.")
        return run.experiment if hasattr(run, "experiment") and hasattr(run, "log_metrics") else run

    def report_run(self, results: InfluenceResults, context: ReportContext) -> Dict[str, Any]:
        if self.run is None and context.wandb_run is None:
            return {}  # no W&B logger in this Trainer
        from .wandb import log_epoch_to_wandb

        return log_epoch_to_wandb(self._run(context), results, context.run_epoch or 0,
                                  context.history or {context.run_epoch or 0: results}, context.train, context.step,
                                  context.top_k, context.suspects_k, key=context.key)

    def report_fit(self, results: InfluenceResults, context: ReportContext) -> Dict[str, Any]:
        if self.run is None and context.wandb_run is None:
            return {}
        from .wandb import log_to_wandb

        return log_to_wandb(self._run(context), results, context.views(results), context.suspects(results),
                            context.train, context.query, step=context.step, results_path=context.results_path,
                            html=render_report(results, context), history=context.history,
                            history_paths=context.history_paths, top_k=context.top_k, tokens=context.tokens(results))


def render_report(results: InfluenceResults, context: ReportContext) -> str:
    """The HTML report's text for ``results`` in ``context`` (what :class:`Html` writes and :class:`Wandb`
    embeds; each renders it itself)."""
    from .html import render_html

    links = {"results": context.results_path} if context.results_path else None
    return render_html(results, context.views(results), context.suspects(results), context.train, context.query,
                       links=links, history=context.history, top_k=context.top_k, self_influence_k=context.suspects_k,
                       tokens=context.tokens(results))


#: what a full report returns for the outputs that wrote nothing (no W&B run, no HTML report)
EMPTY_OUTPUTS: Dict[str, Any] = {"scalars": {}, "html_path": None, "wandb_run_dir": None, "wandb_run_id": None,
                                 "wandb_artifact": None, "wandb_keys": []}


def default_reporters() -> List[Reporter]:
    """What the callback reports to by default: :class:`Scalars` (the Trainer's loggers other than a
    ``WandbLogger``), :class:`Html` (``influence/report.html`` in the run's folder) and :class:`Wandb`
    (the Trainer's ``WandbLogger``, when it has one)."""
    return [Scalars(), Html(), Wandb()]


def report(results: InfluenceResults, reporters: Sequence[Any],
           context: Optional[ReportContext] = None) -> Dict[str, Any]:
    """Hand ``results`` to each reporter in order (its ``report_run`` for a run inside a training loop,
    its ``report_fit`` otherwise; a plain callable for full reports only); each fails on its own.

    Returns:
        the reporters' outputs merged (e.g. ``scalars``, ``html_path``, ``wandb_run_dir``,
        ``wandb_artifact``), plus ``errors``: ``{reporter name: exception}`` for those that failed.
    """
    context = context or ReportContext()
    if not context.in_loop:
        for k, v in EMPTY_OUTPUTS.items():
            context.outputs.setdefault(k, type(v)() if isinstance(v, (dict, list)) else v)
    errors: Dict[str, BaseException] = {}
    for reporter in reporters:
        try:
            if isinstance(reporter, Reporter):
                out = reporter(results, context)
            elif context.in_loop:
                out = {}
            else:
                out = reporter(results, context)
            context.outputs.update(out or {})
        except Exception as err:  # noqa: BLE001 - each output fails on its own
            errors[getattr(reporter, "name", type(reporter).__name__)] = err
    return {**context.outputs, "errors": errors}
