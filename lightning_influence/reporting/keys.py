"""The only place logger keys are made: every number a report logs has one key, under ``influence/``.

Where each key appears (the README's "What is logged" table lists them all):

* **metrics** (:func:`metric`): the run's measurements, in the loggers' scalars, the W&B history row and
  summary: ``influence/num_queries``, ``influence/damping``, ``influence/score_max``,
  ``influence/seconds_<phase>``, …;
* **diagnostics** (:func:`diagnostic`): the solver's typed diagnostics, ``influence/diagnostics/<name>``;
  a component's keep their name under their source (``influence/diagnostics/preconditioner/rank``);
  per-query ones become ``<name>_median`` and ``<name>_max``;
* **settings** (:func:`setting`): the run record's flat view (how the scores were computed), in the W&B
  config only: ``influence/solver``, ``influence/damping_mode``, ``influence/lambda_min_estimate``, …;
  ``influence/damping`` is both a setting and a metric, under the one name;
* **tables and charts** (:func:`table`, :func:`series`): ``influence/queries``, ``influence/series/<name>``.

Example:
    >>> metric("score_max"), setting("damping_mode"), series("norm_history")
    ('influence/score_max', 'influence/damping_mode', 'influence/series/norm_history')
    >>> from lightning_influence.diagnostics import Diagnostic
    >>> diagnostic(Diagnostic("rank", 12, "rank k", source="preconditioner"))
    'influence/diagnostics/preconditioner/rank'
"""

from __future__ import annotations

from typing import Optional

from ..diagnostics import Diagnostic

__all__ = ["PREFIX", "diagnostic", "metric", "per_query", "series", "setting", "table", "EPOCH", "GLOBAL_STEP",
           "RUN", "SOLVER"]

PREFIX = "influence"


def _join(*parts: str) -> str:
    return "/".join((PREFIX,) + tuple(p for p in parts if p))


def metric(name: str) -> str:
    """A measurement of the run (``influence/<name>``)."""
    return _join(name)


def setting(name: str) -> str:
    """A key of the run record's flat view, in a run config (``influence/<name>``)."""
    return _join(name)


def diagnostic(d: Diagnostic, name: Optional[str] = None) -> str:
    """``influence/diagnostics/<source>/<name>`` (no source: ``influence/diagnostics/<name>``); ``name``
    replaces the diagnostic's own (e.g. ``rank_median`` for a per-query summary)."""
    return _join("diagnostics", d.source, name or d.name)


def diagnostic_prefix() -> str:
    """What every diagnostic's key starts with."""
    return _join("diagnostics") + "/"


def per_query(d: Diagnostic, statistic: str) -> str:
    """A per-query diagnostic summarised over the queries: ``influence/diagnostics/<name>_<statistic>``."""
    return diagnostic(d, f"{d.name}_{statistic}")


def series(name: str) -> str:
    """A series diagnostic's chart (``influence/series/<name>``)."""
    return _join("series", name)


def table(name: str) -> str:
    """A table or histogram (``influence/<name>``)."""
    return _join(name)


#: the run of a fit a row belongs to (loggers' scalars of runs inside the training loop)
EPOCH = metric("epoch")
GLOBAL_STEP = metric("global_step")
#: how the run was triggered (``"epoch end"``, ``"step"``, ``"end of training"``)
RUN = setting("run")
SOLVER = setting("solver")
