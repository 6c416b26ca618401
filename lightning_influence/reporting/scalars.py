"""Scalar summaries for any Lightning logger (TensorBoard, CSV, W&B, …), and the settings and
diagnostics flattened under ``influence/`` for run summaries and configs."""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List

import pytorch_lightning as pl

from ..results import InfluenceResults

__all__ = ["summary_scalars", "diagnostic_scalars", "summary_values", "config_values", "log_scalars"]

_MIN_KEYS = ("min_eigenvalue",)


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


def diagnostic_scalars(results: InfluenceResults) -> Dict[str, Any]:
    """Solver diagnostics reduced to one value each over the query batches, under
    ``influence/diagnostics/``: booleans (``converged``) all-of, ``min_eigenvalue`` the minimum, other
    numbers the maximum (iterations, residuals), histories their final value (``<name>_final``)."""
    diags = results.diagnostics or {}
    out: Dict[str, Any] = {}
    if isinstance(diags.get("hvp_calls"), (int, float)):
        out["influence/diagnostics/hvp_calls"] = diags["hvp_calls"]
    batches = diags.get("solve") or []
    if isinstance(batches, dict):
        batches = [batches]
    values: Dict[str, List[Any]] = {}
    for batch in batches:
        if not isinstance(batch, dict):
            continue
        for key, v in batch.items():
            if isinstance(v, bool):
                values.setdefault(key, []).append(v)
            elif isinstance(v, (int, float)):
                values.setdefault(key, []).append(v)
            elif isinstance(v, (list, tuple)) and v and isinstance(v[-1], (int, float)) and not isinstance(v[-1], bool):
                values.setdefault(f"{key}_final", []).append(v[-1])
    for key, vs in values.items():
        if all(isinstance(v, bool) for v in vs):
            out[f"influence/diagnostics/{key}"] = all(vs)
        else:
            nums = [float(v) for v in vs]
            out[f"influence/diagnostics/{key}"] = min(nums) if key in _MIN_KEYS else max(nums)
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
