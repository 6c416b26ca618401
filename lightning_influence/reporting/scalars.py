"""Scalar summaries for any Lightning logger (TensorBoard, CSV, W&B, …)."""

from __future__ import annotations

from typing import Dict

import pytorch_lightning as pl

from ..results import InfluenceResults

__all__ = ["summary_scalars", "log_scalars"]


def summary_scalars(results: InfluenceResults) -> Dict[str, float]:
    """Numbers that summarise a run, keyed under ``influence/``."""
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
    for phase, secs in results.timings.items():
        out[f"influence/seconds_{phase}"] = float(secs)
    return out


def log_scalars(trainer: "pl.Trainer", results: InfluenceResults) -> Dict[str, float]:
    """Log :func:`summary_scalars` to every logger of the trainer at the current global step."""
    metrics = summary_scalars(results)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()
    return metrics
