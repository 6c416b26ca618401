"""Reporters: each turns an :class:`~lightning_influence.results.InfluenceResults` into one kind of output.

:func:`report` hands results to reporters (:class:`Scalars` to Lightning-style loggers, :class:`Html` for
a self-contained HTML report, :class:`Wandb` for tables with previews, histograms, summary, config and an
artifact in a W&B run) with a :class:`ReportContext`; each fails on its own. Every logger key comes from
:mod:`.keys`. A reporter of your own subclasses :class:`Reporter` (see :mod:`.reporters`).

This package imports no Lightning (the callback builds the context from its Trainer:
:mod:`lightning_influence.integration.reporting`), and ``wandb`` only when writing to a run.
"""

from __future__ import annotations

from .content import HARMFUL, HELPFUL, SIGN_CONVENTION
from .reporters import Html, ReportContext, Reporter, Scalars, Wandb, default_reporters, render_report, report
from .scalars import config_values, summary_scalars, summary_values

__all__ = ["HARMFUL", "HELPFUL", "Html", "ReportContext", "Reporter", "SIGN_CONVENTION", "Scalars", "Wandb",
           "config_values", "default_reporters", "render_report", "report", "summary_scalars", "summary_values"]
