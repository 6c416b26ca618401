"""Progress of the long phases (query gradients, solve, scoring, self-influence) for a Trainer.

Follows the trainer's progress-bar settings: nothing when ``enable_progress_bar=False`` (no progress-bar
callback) or when the bar is disabled, nothing off global rank zero, and otherwise one bar per phase in
the style of Lightning's :class:`~pytorch_lightning.callbacks.TQDMProgressBar` (its ``Tqdm`` class and
bar format, on stdout, on the line Lightning uses for its validation bar). A ``RichProgressBar`` gets the same tqdm bars.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, TextIO

import pytorch_lightning as pl

from ..errors import InfluenceInterrupted
from ..pipeline import ProgressFn

__all__ = ["checked_progress", "trainer_progress", "PhaseBars", "PHASE_TITLES"]

#: how each phase is titled on its bar
PHASE_TITLES = {
    "query_gradients": "Influence: query gradients",
    "solve": "Influence: inverse HVP",
    "scoring": "Influence: scoring training set",
    "self_influence": "Influence: self-influence",
}


class PhaseBars:
    """A ``progress(phase, done, total)`` callable showing one tqdm bar per phase; a bar closes when its
    phase completes or the next phase begins."""

    def __init__(self, file: Optional[TextIO] = None, position: int = 0, leave: bool = False) -> None:
        self.file, self.position, self.leave = file, position, leave
        self._phase: Optional[str] = None
        self._bar: Any = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase != self._phase or self._bar is None:
            self.close()
            self._phase = phase
            self._bar = self._new_bar(phase, total)
        bar = self._bar
        if bar.total != total:
            bar.total = total
        bar.update(max(0, int(done) - int(bar.n)))
        if done >= total:
            self.close()

    def _new_bar(self, phase: str, total: int) -> Any:
        from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm, TQDMProgressBar

        return Tqdm(
            desc=PHASE_TITLES.get(phase, f"Influence: {phase}"),
            total=total,
            position=self.position,
            leave=self.leave,
            dynamic_ncols=True,
            file=self.file if self.file is not None else sys.stdout,
            smoothing=0,
            bar_format=TQDMProgressBar.BAR_FORMAT,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._phase = None, None


def trainer_progress(trainer: "pl.Trainer") -> Optional[ProgressFn]:
    """A ``progress(phase, done, total)`` hook that follows the trainer's progress-bar settings, or
    ``None`` when the trainer shows no progress bar (``enable_progress_bar=False``, a disabled bar) or
    this is not global rank zero."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None or not trainer.is_global_zero or getattr(bar, "is_disabled", False):
        return None
    # the validation bar's line: the training bar may still be open on the line above when fit ends
    position = 2 * int(getattr(bar, "process_position", 0) or 0) + 1
    return PhaseBars(position=position, leave=bool(getattr(bar, "_leave", False)))


def checked_progress(trainer: "pl.Trainer", inner: Optional[ProgressFn], interrupt: Any = None) -> ProgressFn:
    """``inner`` (may be ``None``), first stopping the run with
    :class:`~lightning_influence.errors.InfluenceInterrupted` when a Ctrl+C arrived that an op swallowed
    (``interrupt.check()``, a :class:`~lightning_influence.guards.Interrupt`) or, in one process, once
    Lightning received SIGTERM (with several, the communicator stops every rank together)."""

    def progress(phase: str, done: int, total: int) -> None:
        if interrupt is not None:
            interrupt.check()
        if trainer.world_size <= 1 and getattr(trainer, "received_sigterm", False):
            raise InfluenceInterrupted("SIGTERM stopped the influence computation; training, its weights and "
                                       "checkpoints are kept.")
        if inner is not None:
            inner(phase, done, total)

    return progress
