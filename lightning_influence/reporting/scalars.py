"""Scalar summaries for any Lightning logger (TensorBoard, CSV, W&B, …), and the settings and
diagnostics flattened under ``influence/`` for run summaries and configs."""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Sequence, Union

import pytorch_lightning as pl

from ..results import PER_QUERY_DIAGNOSTICS, InfluenceResults

__all__ = ["summary_scalars", "diagnostic_scalars", "summary_values", "config_values", "log_scalars", "nan_median"]

Scalar = Union[bool, int, float]

#: reduced over the query chunks by their minimum (every other number: maximum, booleans: all)
_MIN_KEYS = ("min_eigenvalue", "lambda_min_full", "depth_min")
#: summed over the query chunks
_SUM_KEYS = ("solve_hvp_calls",)
#: chunk lists that are an axis, not a measurement, or are reduced on their own
_SKIP_LISTS = ("checkpoint_steps", "depth") + PER_QUERY_DIAGNOSTICS
#: names of LiSSA setup values (``diagnostics["solve"][k]["setup"]``) that would be ambiguous alone
_SETUP_NAMES = {"hvps": "setup_hvps"}


def summary_scalars(results: InfluenceResults) -> Dict[str, float]:
    """Numbers that summarise a run, keyed under ``influence/`` (floats only, for any logger)."""
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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(v: Any) -> List[float]:
    """The numbers of a list (empty when ``v`` is not a non-empty list of numbers)."""
    if isinstance(v, (list, tuple)) and v and all(_is_number(x) for x in v):
        return [float(x) for x in v]
    return []


def _reduce(key: str, vs: List[Any]) -> Scalar:
    if all(isinstance(v, bool) for v in vs):
        return all(vs)
    nums = [v for v in vs if not (isinstance(v, float) and math.isnan(v))]
    if not nums:
        return math.nan
    if key in _SUM_KEYS:
        return sum(nums)
    return min(nums) if key in _MIN_KEYS else max(nums)


def diagnostic_scalars(results: InfluenceResults) -> Dict[str, Scalar]:
    """Solver diagnostics reduced to one number each, keyed ``influence/diagnostics/<name>``.

    Over the query chunks: booleans (``converged``) all-of; ``min_eigenvalue``,
    ``lambda_min_full`` the minimum; other numbers the maximum (``iterations``, ``scale``, ``damping``,
    ``batch_size``, ``max_eigenvalue``, …); flat histories (CG's ``residual_history``) the largest final
    value as ``<name>_final``, and per-repeat histories (LiSSA's ``norm_history``, ``segment_change``)
    the largest final value over chunks and repeats, also as ``<name>_final``. Besides:

    * ``hvp_calls``: Hessian-vector products of the whole run (setup, solve and self-influence);
      ``solve_hvp_calls`` those of the query solves (summed over chunks).
    * ``relative_stderr_median`` / ``relative_stderr_max``: over the queries, ignoring NaN, of LiSSA's
      relative standard error of each query's scores across repeats (dimensionless); absent with one
      repeat.
    * ``depth_max`` / ``depth_min``: LiSSA recursion steps, over the queries (over repeats in files
      without per-query depths).
    * LiSSA setup estimates under their own names: ``lambda_max_full``, ``lambda_min_full``, ``trace``,
      ``trace_stderr`` (Hessian units), ``lambda_max_minibatch_max`` (the largest of the per-minibatch
      ``λ_max(H_B + λI)``), ``setup_hvps``; any other numeric setup value by its name.

    Strings and per-query lists are left out (see :meth:`InfluenceResults.per_query_diagnostics`).
    """
    diags = results.diagnostics or {}
    out: Dict[str, Scalar] = {}
    values: Dict[str, List[Any]] = {}
    depths: List[float] = []
    chunks = results.solve_chunks()
    for chunk in chunks:
        d = chunk.diagnostics
        for key, v in d.items():
            if key == "hvp_calls":
                key = "solve_hvp_calls"
            if isinstance(v, bool) or _is_number(v):
                values.setdefault(key, []).append(v)
            elif key == "setup" and isinstance(v, dict):
                for sk, sv in v.items():
                    name = _SETUP_NAMES.get(sk, f"setup_{sk}" if sk in d else sk)
                    if isinstance(sv, bool) or _is_number(sv):
                        values.setdefault(name, []).append(sv)
                    elif _numbers(sv):
                        values.setdefault(f"{name}_max", []).append(max(_numbers(sv)))
            elif key == "depth":
                depths.extend(_numbers(v))
            elif key in _SKIP_LISTS or not isinstance(v, (list, tuple)) or not v:
                continue
            elif _numbers(v):
                values.setdefault(f"{key}_final", []).append(_numbers(v)[-1])
            else:  # one history per repeat
                finals = [_numbers(h)[-1] for h in v if _numbers(h)]
                if finals:
                    values.setdefault(f"{key}_final", []).append(max(finals))
    for key, vs in values.items():
        out[f"influence/diagnostics/{key}"] = _reduce(key, vs)
    if _is_number(diags.get("hvp_calls")):
        out["influence/diagnostics/hvp_calls"] = diags["hvp_calls"]

    per_query = results.per_query_diagnostics()
    stderr = per_query.get("relative_stderr")
    if stderr is not None and bool(stderr.isfinite().any()):
        finite = stderr[~stderr.isnan()].tolist()
        out["influence/diagnostics/relative_stderr_median"] = nan_median(finite)
        out["influence/diagnostics/relative_stderr_max"] = max(finite)
    depth = per_query.get("depth_per_query")
    if depth is not None and bool((~depth.isnan()).any()):
        depths = depth[~depth.isnan()].tolist()
    if depths:
        out["influence/diagnostics/depth_max"] = int(max(depths))
        out["influence/diagnostics/depth_min"] = int(min(depths))
    return out


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
    """Everything a run summary shows: :func:`summary_scalars`, the solver's name and its numeric
    settings (damping, scale, depth, …), all under ``influence/``."""
    out: Dict[str, Any] = dict(summary_scalars(results))
    out.update(diagnostic_scalars(results))
    for key, v in results.settings.items():
        if key == "solver" or isinstance(v, str):
            out[f"influence/{key}"] = v
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.setdefault(f"influence/{key}", v)
    return out


def config_values(results: InfluenceResults) -> Dict[str, Any]:
    """The full settings as JSON-safe values under ``influence/`` (for a run config)."""
    return {f"influence/{k}": _plain(v) for k, v in results.settings.items()}


def log_scalars(trainer: "pl.Trainer", results: InfluenceResults, skip: Iterable[Any] = ()) -> Dict[str, float]:
    """Log :func:`summary_scalars` to every logger of the trainer (but those in ``skip``) at the current
    global step."""
    metrics = summary_scalars(results)
    skipped = {id(s) for s in skip}
    for logger in trainer.loggers:
        if id(logger) in skipped:
            continue
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()
    return metrics
