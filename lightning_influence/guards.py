"""State the influence phase must leave as it found it, and how it stops on Ctrl+C.

* :func:`preserved_rng`: the global random states (torch CPU and CUDA, NumPy, Python ``random``) are
  saved before and restored after the computation, so a run with the callback draws the same random
  numbers afterwards as one without (every sequential ``DataLoader`` draws a seed from torch's RNG).
* :func:`interruptible`: the first Ctrl+C (SIGINT) in the block raises
  :class:`~lightning_influence.errors.InfluenceInterrupted`, which the callback catches to stop the
  influence phase only; the previous SIGINT handler is back in place from that moment, so a second
  Ctrl+C is handled as usual (Lightning's graceful shutdown, or a plain ``KeyboardInterrupt``). Whatever op
  was running when it came, the block ends with ``InfluenceInterrupted`` (an op that turns the interrupt into
  its own error, or swallows it, does not change that).
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
from typing import Any, Iterator, Optional

import torch

from .errors import InfluenceInterrupted

__all__ = ["Interrupt", "interruptible", "preserved_rng"]


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the torch (CPU and every initialised CUDA device), NumPy and Python ``random`` states on
    exit, whatever happened inside."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py = random.getstate()
    np_state: Optional[Any] = None
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        np = None  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        if np is not None and np_state is not None:
            np.random.set_state(np_state)


class Interrupt:
    """What :func:`interruptible` yields: whether SIGINT arrived in its block, and :meth:`check` to stop at a
    safe point when an op swallowed it."""

    def __init__(self, message: str) -> None:
        self.message = message
        self._arrived = threading.Event()

    @property
    def arrived(self) -> bool:
        return self._arrived.is_set()

    def record(self) -> None:
        self._arrived.set()

    def check(self) -> None:
        """Raise :class:`InfluenceInterrupted` if SIGINT arrived (call it between steps of the work)."""
        if self.arrived:
            raise InfluenceInterrupted(self.message)


@contextlib.contextmanager
def interruptible(what: str = "the influence computation") -> Iterator[Interrupt]:
    """Turn the first SIGINT inside the block into :class:`InfluenceInterrupted` and put the previous
    handler back at once (a second SIGINT is handled as usual). On exit the previous handler is restored.

    The handler records that SIGINT arrived: any other exception leaving the block after it (an op that
    catches the interrupt and raises its own error, as the TorchScript interpreter raises a ``RuntimeError``)
    is the interrupt too, and so is a block that ends normally because an op swallowed it; the yielded
    :class:`Interrupt`'s ``check()`` stops the work at its next safe point in that case.

    Outside the main thread (where signal handlers cannot be set) this does nothing: a Ctrl+C arrives as
    a plain ``KeyboardInterrupt``.
    """
    interrupt = Interrupt(f"Ctrl+C stopped {what}; training, its weights and checkpoints are kept. Press Ctrl+C "
                          "again to interrupt as usual.")
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None or previous is signal.SIG_IGN:  # set from C (cannot be put back), or Ctrl+C ignored
        yield interrupt
        return

    def first(signum: int, frame: Any) -> None:
        interrupt.record()
        signal.signal(signal.SIGINT, previous)
        raise InfluenceInterrupted(interrupt.message)

    signal.signal(signal.SIGINT, first)
    try:
        yield interrupt
    except InfluenceInterrupted:
        raise
    except Exception as err:
        # the handler's exception raised inside an op that wraps it in its own (the TorchScript interpreter
        # raises a RuntimeError): still the interrupt. A second Ctrl+C (KeyboardInterrupt) passes as it is.
        if interrupt.arrived:
            raise InfluenceInterrupted(interrupt.message) from err
        raise
    else:
        interrupt.check()  # an op swallowed it: the run was still interrupted
    finally:
        if signal.getsignal(signal.SIGINT) is first:
            signal.signal(signal.SIGINT, previous)
