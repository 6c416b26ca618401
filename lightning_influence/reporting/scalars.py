"""Scalar summaries for any Lightning logger (TensorBoard, CSV, W&B, …), the W&B summary and config. Every
key comes from :mod:`.keys`; each number is logged under one name (see the README's table).

* :func:`summary_scalars`: the run's metrics and the solver's numeric diagnostics, floats only (any logger);
* :func:`summary_values`: the same with their own types, string diagnostics and the solver's name (the
  W&B summary);
* :func:`config_values`: the run record's flat view, how the scores were computed (the W&B config).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Sequence, Union

from ..diagnostics import Diagnostic
from ..results import InfluenceResults
from . import keys

__all__ = ["summary_scalars", "diagnostic_scalars", "summary_values", "config_values", "nan_median",
           "format_value"]

Scalar = Union[bool, int, float]


def summary_scalars(results: InfluenceResults) -> Dict[str, float]:
    """Numbers that summarise a run, keyed under ``influence/`` (floats only, for any logger; booleans
    0/1): the metrics and :func:`diagnostic_scalars`."""
    s = results.scores
    out: Dict[str, float] = {
        keys.metric("num_queries"): float(results.num_queries),
        keys.metric("num_train"): float(results.num_train),
        keys.metric("damping"): results.damping,
        keys.metric("wall_seconds"): results.wall_time,
        keys.metric("score_abs_mean"): float(s.abs().mean()),
        keys.metric("score_max"): float(s.max()),
        keys.metric("score_min"): float(s.min()),
        keys.metric("query_loss_mean"): float(results.query_losses.mean()),
    }
    if results.self_influence is not None:
        out[keys.metric("self_influence_min")] = float(results.self_influence.min())
        out[keys.metric("self_influence_mean")] = float(results.self_influence.mean())
    for phase, secs in results.timings.items():
        if phase != "total":  # the total is wall_seconds
            out[keys.metric(f"seconds_{phase}")] = float(secs)
    out.update({k: float(v) for k, v in diagnostic_scalars(results).items()})
    return out
def nan_median(values: Sequence[float]) -> float:
    """The median of the non-NaN ``values`` (the mean of the middle two for an even count); NaN when none."""
    v = sorted(float(x) for x in values if not math.isnan(float(x)))
    if not v:
        return math.nan
    m = len(v) // 2
    return v[m] if len(v) % 2 else (v[m - 1] + v[m]) / 2


def _is_scalar(d: Diagnostic) -> bool:
    return isinstance(d.value, (bool, int, float))


def diagnostic_scalars(results: InfluenceResults) -> Dict[str, Scalar]:
    """The solver's diagnostics as numbers, keyed ``influence/diagnostics/<name>``:

    * every numeric or boolean scalar of :meth:`InfluenceResults.summary_diagnostics` (setup, the query
      chunks combined by each diagnostic's declared ``reduce``, self-influence, totals) as it is;
    * every per-query diagnostic (:meth:`InfluenceResults.per_query_diagnostics`) as
      ``<name>_median`` and ``<name>_max`` over the queries, ignoring NaN (left out when every value
      is NaN; a scalar of the same name takes precedence).

    String scalars and series are left out (see :func:`summary_values` and the reports' charts).
    """
    out: Dict[str, Scalar] = {}
    for d in results.summary_diagnostics():
        if _is_scalar(d):
            out[keys.diagnostic(d)] = d.value
    for name, values in results.per_query_diagnostics().items():
        finite = values[~values.isnan()].tolist()
        d = results.diagnostic(name) or Diagnostic(name, None, name)
        if finite:
            out.setdefault(keys.per_query(d, "median"), nan_median(finite))
            out.setdefault(keys.per_query(d, "max"), max(finite))
    return out


def format_value(v: Any) -> str:
    """A diagnostic or setting as a reader sees it: ``yes``/``no`` for booleans, 4 significant digits for
    floats, lists joined by commas."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(format_value(x) for x in v)
    return str(v)


def _plain(v: Any) -> Any:
    if isinstance(v, (str, bool, int)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, Iterable):
        return [_plain(x) for x in v]
    return str(v)


def summary_values(results: InfluenceResults) -> Dict[str, Any]:
    """Everything a run summary shows, all under ``influence/``: :func:`summary_scalars`, the diagnostic
    scalars with their own types (:func:`diagnostic_scalars`, booleans stay booleans) and the string
    ones (``influence/diagnostics/preconditioner``), and the solver's name. The settings are the
    config's (:func:`config_values`), not repeated here."""
    out: Dict[str, Any] = dict(summary_scalars(results))
    out.update(diagnostic_scalars(results))
    for d in results.summary_diagnostics():
        if isinstance(d.value, str):
            out[keys.diagnostic(d)] = d.value
    if results.solver is not None:
        out[keys.SOLVER] = results.solver
    return out


def config_values(results: InfluenceResults) -> Dict[str, Any]:
    """The run record's flat view as JSON-safe values under ``influence/`` (for a run config): how the
    scores were computed (solver settings, damping choice, run arguments, data facts, the run of a fit)."""
    out = {keys.setting(k): _plain(v) for k, v in results.settings.items()}
    if results.solver is not None:
        out.setdefault(keys.SOLVER, results.solver)
    return out
