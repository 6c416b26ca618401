"""Scalar summaries for any Lightning logger (TensorBoard, CSV, W&B, …), and the settings and
diagnostics flattened under ``influence/`` for run summaries and configs."""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Sequence, Union


from ..checks import is_real
from ..diagnostics import Diagnostic
from ..results import InfluenceResults

__all__ = ["summary_scalars", "diagnostic_scalars", "summary_values", "config_values", "nan_median",
           "format_value"]

Scalar = Union[bool, int, float]


def summary_scalars(results: InfluenceResults) -> Dict[str, float]:
    """Numbers that summarise a run, keyed under ``influence/`` (floats only, for any logger; booleans
    0/1)."""
    s = results.scores
    out: Dict[str, float] = {
        "influence/num_queries": float(results.num_queries),
        "influence/num_train": float(results.num_train),
        "influence/damping": results.damping,
        "influence/wall_seconds": results.wall_time,
        "influence/score_abs_mean": float(s.abs().mean()),
        "influence/score_max": float(s.max()),
        "influence/score_min": float(s.min()),
        "influence/query_loss_mean": float(results.query_losses.mean()),
    }
    if results.self_influence is not None:
        out["influence/self_influence_min"] = float(results.self_influence.min())
        out["influence/self_influence_mean"] = float(results.self_influence.mean())
    for phase, secs in results.timings.items():
        out[f"influence/seconds_{phase}"] = float(secs)
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
            out[f"influence/diagnostics/{d.name}"] = d.value
    for name, values in results.per_query_diagnostics().items():
        finite = values[~values.isnan()].tolist()
        if finite:
            out.setdefault(f"influence/diagnostics/{name}_median", nan_median(finite))
            out.setdefault(f"influence/diagnostics/{name}_max", max(finite))
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
    ones (``influence/diagnostics/preconditioner``), the solver's name and its numeric and string
    settings (damping, scale, depth, …)."""
    out: Dict[str, Any] = dict(summary_scalars(results))
    out.update(diagnostic_scalars(results))
    for d in results.summary_diagnostics():
        if isinstance(d.value, str):
            out[f"influence/diagnostics/{d.name}"] = d.value
    if results.solver is not None:
        out["influence/solver"] = results.solver
    for key, v in results.settings.items():
        if key == "solver" or isinstance(v, str):
            out[f"influence/{key}"] = v
        elif is_real(v):
            out.setdefault(f"influence/{key}", v)
    return out


def config_values(results: InfluenceResults) -> Dict[str, Any]:
    """The full settings as JSON-safe values under ``influence/`` (for a run config), the solver's name,
    and the scalars its ``fit`` chose (:meth:`InfluenceResults.setup_diagnostics`: damping, scale,
    preconditioner, …) under ``influence/setup/<name>``."""
    out = {f"influence/{k}": _plain(v) for k, v in results.settings.items()}
    if results.solver is not None:
        out.setdefault("influence/solver", results.solver)
    for d in results.setup_diagnostics():
        if d.kind == "scalar" and isinstance(d.value, (str, bool, int, float)):
            out[f"influence/setup/{d.name}"] = _plain(d.value)
    return out
