"""The callback's time budget for ``solver="auto"``: how long the influence phase may take next to training.

``time_budget="training"`` (the default) lets the automatic choice's Hessian solvers take as long as the
training run they follow has taken so far, and at least :data:`MIN_TIME_BUDGET` seconds (so that a small
model's fit of a few seconds keeps its exact or CG scores); when their estimated cost is larger, the rule
picks EK-FAC (:mod:`lightning_influence.solvers.auto`, rule 5). A number is a budget in seconds; ``None``
means no limit. An explicit solver, or an ``AutoSettings`` with its own ``time_budget``, is left as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Union

from ..checks import is_real
from ..errors import InfluenceConfigError
from ..solvers import SolverSettings
from ..solvers.auto import AutoSettings

__all__ = ["MIN_TIME_BUDGET", "TimeBudget", "budget_seconds", "budgeted_solver", "check_time_budget"]

#: the smallest budget ``time_budget="training"`` gives, in seconds
MIN_TIME_BUDGET = 60.0

TimeBudget = Union[float, Literal["training"], None]


def check_time_budget(time_budget: TimeBudget) -> None:
    """Refuse anything but ``"training"``, a number of seconds > 0 or ``None``, naming the argument."""
    if time_budget is None or time_budget == "training":
        return
    if not (is_real(time_budget) and time_budget > 0):
        raise InfluenceConfigError(f"time_budget={time_budget!r} must be 'training' (the training run's length, at "
                                   f"least {MIN_TIME_BUDGET:g} s), a number of seconds > 0, or None for no limit.")


def budget_seconds(time_budget: TimeBudget, trained_seconds: float) -> Optional[float]:
    """The budget in seconds for a run after ``trained_seconds`` of training (``None``: no limit)."""
    if time_budget == "training":
        return max(MIN_TIME_BUDGET, float(trained_seconds))
    return None if time_budget is None else float(time_budget)


def budgeted_solver(solver: SolverSettings, time_budget: TimeBudget, trained_seconds: float) -> SolverSettings:
    """``solver`` with the budget applied: an :class:`AutoSettings` without a budget of its own gets
    :func:`budget_seconds`; any other solver is returned unchanged."""
    if not isinstance(solver, AutoSettings) or solver.time_budget is not None:
        return solver
    seconds = budget_seconds(time_budget, trained_seconds)
    return solver if seconds is None else dataclasses.replace(solver, time_budget=seconds)
