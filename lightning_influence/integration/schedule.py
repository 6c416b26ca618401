"""When influence runs inside a fit: small predicates, apart from what a run does.

A :class:`Schedule` answers, at each point of the training loop where the callback may run, whether to run
there: after an optimizer step (:meth:`Schedule.after_step`, Lightning's ``on_train_batch_end``) and at
the end of an epoch (:meth:`Schedule.after_epoch`, ``on_train_epoch_end``: after that epoch's validation,
before ``ModelCheckpoint`` saves). The end of training always runs. A run is then identified by a
:class:`~lightning_influence.record.RunKey` (trigger, epoch, global step), so several runs in one epoch
never overwrite each other.

A new schedule is one subclass::

    class AtSteps(Schedule):
        def __init__(self, steps): self.steps = set(steps)
        def after_step(self, global_step, epoch): return global_step in self.steps

    InfluenceCallback(schedule=AtSteps([100, 1000]))

Example:
    >>> s = EveryNEpochs(2)
    >>> [e for e in range(6) if s.after_epoch(epoch=e, global_step=0)]
    [1, 3, 5]
    >>> t = EveryNSteps(50)
    >>> [g for g in (49, 50, 100, 101) if t.after_step(global_step=g, epoch=0)]
    [50, 100]
    >>> Combined(EveryNEpochs(1), EveryNSteps(10)).describe()
    'every epoch and every 10 optimizer steps, and when training ends'
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from ..checks import is_int
from ..errors import InfluenceConfigError

__all__ = ["Combined", "EndOfFit", "EveryNEpochs", "EveryNSteps", "Schedule", "from_arguments"]


class Schedule:
    """When to run inside the training loop (the end of training always runs). Default: never."""

    def after_step(self, global_step: int, epoch: int) -> bool:
        """After an optimizer step that brought the count to ``global_step``, in 0-based ``epoch``."""
        return False

    def after_epoch(self, epoch: int, global_step: int) -> bool:
        """At the end of 0-based ``epoch`` (after its validation)."""
        return False

    @property
    def in_loop(self) -> bool:
        """Whether any run happens inside the loop (then the callback needs queries before training ends)."""
        return True

    def describe(self) -> str:
        """``"every 2 epochs, and when training ends"``: for the callback's log line."""
        return "when training ends"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class EndOfFit(Schedule):
    """Only when training ends (the default)."""

    @property
    def in_loop(self) -> bool:
        return False


def _positive(name: str, value: Any, what: str) -> int:
    if not (is_int(value) and value >= 1):
        raise InfluenceConfigError(f"{name}={value!r} must be a positive integer k ({what}) or None (only when "
                                   "training ends).")
    return int(value)


class EveryNEpochs(Schedule):
    """At the end of every ``n``-th epoch (0-based epochs ``n-1, 2n-1, …``)."""

    def __init__(self, n: int) -> None:
        self.n = _positive("every_n_epochs", n, "influence at the end of every k-th training epoch, and when "
                           "training ends")

    def after_epoch(self, epoch: int, global_step: int) -> bool:
        return (int(epoch) + 1) % self.n == 0

    def describe(self) -> str:
        return ("every epoch" if self.n == 1 else f"every {self.n} epochs") + ", and when training ends"


class EveryNSteps(Schedule):
    """After every ``n``-th optimizer step (``global_step = n, 2n, …``)."""

    def __init__(self, n: int) -> None:
        self.n = _positive("every_n_steps", n, "influence after every k-th optimizer step, and when training ends")

    def after_step(self, global_step: int, epoch: int) -> bool:
        return int(global_step) > 0 and int(global_step) % self.n == 0

    def describe(self) -> str:
        return ("every optimizer step" if self.n == 1 else f"every {self.n} optimizer steps") + ", and when training ends"


class Combined(Schedule):
    """Runs wherever any of ``schedules`` runs."""

    def __init__(self, *schedules: Schedule) -> None:
        self.schedules = tuple(schedules)

    def after_step(self, global_step: int, epoch: int) -> bool:
        return any(s.after_step(global_step, epoch) for s in self.schedules)

    def after_epoch(self, epoch: int, global_step: int) -> bool:
        return any(s.after_epoch(epoch, global_step) for s in self.schedules)

    @property
    def in_loop(self) -> bool:
        return any(s.in_loop for s in self.schedules)

    def describe(self) -> str:
        parts = [s.describe().replace(", and when training ends", "") for s in self.schedules if s.in_loop]
        return " and ".join(parts) + ", and when training ends" if parts else "when training ends"


def from_arguments(schedule: Optional[Schedule], every_n_epochs: Optional[int], every_n_steps: Optional[int]) -> Schedule:
    """The callback's schedule from its arguments: ``schedule=`` (an object), or ``every_n_epochs`` and/or
    ``every_n_steps`` (both: either triggers), else :class:`EndOfFit`."""
    parts: Sequence[Schedule] = [s for s in (
        EveryNEpochs(every_n_epochs) if every_n_epochs is not None else None,
        EveryNSteps(every_n_steps) if every_n_steps is not None else None,
    ) if s is not None]
    if schedule is not None:
        if not isinstance(schedule, Schedule):
            raise InfluenceConfigError(f"schedule={schedule!r} must be a lightning_influence.integration.schedule."
                                       "Schedule (EveryNEpochs(k), EveryNSteps(k), or a subclass), or None.")
        if parts:
            raise InfluenceConfigError("pass schedule= or every_n_epochs=/every_n_steps= to InfluenceCallback, not both.")
        return schedule
    if not parts:
        return EndOfFit()
    return parts[0] if len(parts) == 1 else Combined(*parts)
