"""Progress of the long phases (query gradients, solve, scoring, self-influence) for a Trainer."""

from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl

from .pipeline import ProgressFn

__all__ = ["trainer_progress"]


def trainer_progress(trainer: "pl.Trainer") -> Optional[ProgressFn]:
    """A ``progress(phase, done, total)`` hook that follows the trainer's progress-bar settings, or
    ``None`` when the trainer shows no progress bar."""
    return None
