"""lightning-influence: influence functions (Koh & Liang, 2017) for PyTorch Lightning.

Add :class:`InfluenceCallback` to a ``Trainer``; when training ends it scores every training example's
influence on chosen validation predictions. :func:`compute_influence` does the same without a Trainer.
Scores follow Koh & Liang's sign: positive = harmful, negative = helpful.
"""

from .counterfactual import Counterfactual, PredictedMetrics
from .curvature.damping import AutoDamping
from .errors import (InfluenceConfigError, InfluenceInterrupted, InfluenceRuntimeError, NegativeCurvatureError,
                     ResultsFileError, SolverDivergedError)
from .index import IndexMismatchError, InfluenceIndex, build_index_for_run
from .pipeline import DEFAULT_DAMPING, compute_influence
from .results import InfluenceResults, Ranked
from .record import RunKey, RunRecord
from .solvers import (ArnoldiSettings, CGSettings, EKFACSettings, ExactSettings, KFACSettings, LissaSettings, Preconditioned,
                      SolverKind, SolverSettings, solver_names)

__version__ = "0.1.0"

__all__ = [
    "ArnoldiSettings",
    "AutoDamping",
    "CGSettings",
    "Counterfactual",
    "EKFACSettings",
    "DEFAULT_DAMPING",
    "ExactSettings",
    "InfluenceCallback",
    "IndexMismatchError",
    "InfluenceConfigError",
    "InfluenceIndex",
    "InfluenceInterrupted",
    "InfluenceResults",
    "InfluenceRuntimeError",
    "KFACSettings",
    "LissaSettings",
    "NegativeCurvatureError",
    "PredictedMetrics",
    "Preconditioned",
    "Ranked",
    "RunKey",
    "RunRecord",
    "ResultsFileError",
    "SolverDivergedError",
    "SolverKind",
    "SolverSettings",
    "build_index_for_run",
    "compute_influence",
    "solver_names",
]


def __getattr__(name: str):  # lazy: importing the maths should not import Lightning
    if name == "InfluenceCallback":
        from .integration.callback import InfluenceCallback

        return InfluenceCallback
    raise AttributeError(f"module 'lightning_influence' has no attribute {name!r}")
