"""Training-loop integration: the Lightning callback (:mod:`.callback`), when it runs (:mod:`.schedule`),
where its runs are kept (:mod:`.store`), how a run's outputs are written (:mod:`.writer`) and where
(:mod:`.outputs`), its data (:mod:`.loaders`), its own arguments (:mod:`.checks`), the Trainer's strategy as
the communicator (:mod:`.strategy`), progress bars (:mod:`.progress`) and the reporters' context from a
Trainer (:mod:`.reporting`). The maths (the rest of the package) knows nothing of Lightning."""

from .schedule import Combined, EndOfFit, EveryNEpochs, EveryNSteps, Schedule
from .store import ResultsStore, RunHistory

__all__ = ["Combined", "EndOfFit", "EveryNEpochs", "EveryNSteps", "ResultsStore", "RunHistory", "Schedule"]
