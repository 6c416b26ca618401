"""How one influence computation is split over ``W`` processes: the :class:`Communicator` seam.

The maths sees only this interface, never Lightning or ``torch.distributed``: the callback hands in one
built on the Trainer's strategy (:mod:`lightning_influence.integration.strategy`), :func:`compute_influence` uses
:data:`SOLO` (one process) by default.

Work split (data parallel): every process holds the same parameters, queries and right-hand sides, and a
contiguous shard of the training set (:func:`shard_bounds`). Every full-data pass (HVP sweeps, Lanczos,
Kronecker factors, the score sketch) sums its shard and all-reduces; minibatch recursions draw
rank-local parts of each minibatch and all-reduce their HVPs, so every rank runs the same recursion on
the same (all-reduced) numbers and takes the same branches; scores and self-influence are computed for
the shard and gathered.

Failure agreement: every collective first exchanges a one-number status. A process whose work raised
sends "failed" in the next status exchange and then its message, so the others raise too (naming the
rank and its error) at their next collective instead of waiting in it until the backend's timeout.

Stop agreement: a rank whose ``stop_requested()`` is true (the callback's: Lightning received SIGTERM) sends
"stop" instead, and every rank raises :class:`StopRequested` (an ``InfluenceInterrupted``) at that same
collective, so none is left waiting in the next one.

:meth:`Communicator.raise_together` does the same for a step without collectives (the callback's checks
before training): every rank raises the first failing rank's error, with its message.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from .errors import InfluenceConfigError, InfluenceInterrupted, InfluenceRuntimeError

__all__ = ["CollectiveTimeoutError", "Communicator", "PeerFailedError", "SOLO", "StopRequested", "shard_bounds"]


def shard_bounds(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous shard of ``n`` items: the first ``n % W`` ranks
    hold one more, so the shards cover ``0..n-1`` in order."""
    base, extra = divmod(int(n), int(world_size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class PeerFailedError(InfluenceRuntimeError):
    """Another process of the same influence computation failed; the message names it and its error."""


class CollectiveTimeoutError(PeerFailedError):
    """The other processes did not join a collective within the communicator's timeout (a process stopped,
    hangs, or is far slower); the message names the timeout and how to raise it."""


class StopRequested(InfluenceInterrupted):
    """Every process stops the influence computation together: one of them was asked to stop (SIGTERM)."""


#: status codes of the exchange before every collective
_OK, _FAILED, _STOP = 0, 1, 2


class Communicator:
    """Sums and gathers across the processes of one computation; this base class is one process.

    Subclasses implement :meth:`_all_reduce` and :meth:`_all_gather` (same-shape tensors, every rank
    calling in the same order); the status protocol around them is here.

    Attributes:
        rank: this process's index, ``0 ≤ rank < world_size``.
        world_size: number of processes.
    """

    rank: int = 0
    world_size: int = 1

    #: bytes of an error message sent to the other ranks (longer messages are cut)
    MESSAGE_BYTES = 2048

    def __init__(self, stop_requested: Optional[Callable[[], bool]] = None, stop_what: str = "a stop request") -> None:
        self._broken = False  # a collective itself failed: never enter another one
        #: ``stop_requested()`` true on any rank stops every rank at the next collective (:class:`StopRequested`)
        self.stop_requested = stop_requested
        self.stop_what = stop_what

    # ------------------------------------------------------------------ backend (override)
    def _all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum of ``tensor`` over ranks (the same shape on every rank)."""
        return tensor

    def _all_gather(self, tensor: Tensor) -> Tensor:
        """``[W, *shape]``: every rank's ``tensor`` (the same shape on every rank), in rank order."""
        return tensor.unsqueeze(0)

    def _barrier(self) -> None:
        """Return once every rank has called it."""

    # ------------------------------------------------------------------ public
    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum of ``tensor`` over ranks, returned (the input may be overwritten with it)."""
        if not self.distributed:
            return tensor
        self._status(ok=True)
        return self._collective(self._all_reduce, tensor)

    def all_reduce_sum_all(self, tensors: List[Tensor]) -> List[Tensor]:
        """:meth:`all_reduce_sum` of several tensors of one dtype and device, in one collective."""
        if not self.distributed or not tensors:
            return tensors
        flat = self.all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]))
        out, pos = [], 0
        for t in tensors:
            out.append(flat[pos : pos + t.numel()].reshape(t.shape))
            pos += t.numel()
        return out

    def gather_columns(self, tensor: Tensor) -> Tensor:
        """Concatenate every rank's ``tensor`` along its last dimension, in rank order (shards may differ
        in size by any amount along it)."""
        if not self.distributed:
            return tensor
        self._status(ok=True)
        width = torch.tensor([tensor.shape[-1]], dtype=torch.long, device=tensor.device)
        widths = self._collective(self._all_gather, width).reshape(-1).tolist()
        pad = max(widths) - tensor.shape[-1]
        padded = torch.nn.functional.pad(tensor, (0, pad)) if pad else tensor
        parts = self._collective(self._all_gather, padded.contiguous())
        return torch.cat([parts[r][..., : widths[r]] for r in range(self.world_size)], dim=-1)

    def check(self) -> None:
        """A status exchange with nothing else: raises :class:`PeerFailedError` when another rank failed.
        Call it at the end of a computation so that a failure after the last collective is seen."""
        if self.distributed:
            self._status(ok=True)

    def broadcast_flag(self, value: bool, src: int = 0) -> bool:
        """Rank ``src``'s ``value`` on every rank (after a status exchange, like every collective here)."""
        if not self.distributed:
            return bool(value)
        self._status(ok=True)
        flags = self._collective(self._all_gather, torch.tensor([int(bool(value))], dtype=torch.long,
                                                                device=self._device()))
        return bool(flags.reshape(-1)[src])

    def all_true(self, value: bool) -> bool:
        """Whether ``value`` is true on every rank (after a status exchange, like every collective here)."""
        if not self.distributed:
            return bool(value)
        self._status(ok=True)
        flags = self._collective(self._all_gather, torch.tensor([int(bool(value))], dtype=torch.long,
                                                                device=self._device()))
        return bool(flags.reshape(-1).all())

    def raise_together(self, error: Optional[BaseException]) -> None:
        """Every rank's outcome of a step with no collectives inside (``error``: what it raised, or ``None``):
        if any rank failed, every rank raises the first failing rank's error: that rank its own exception,
        the others an error of the same kind (:class:`~lightning_influence.errors.InfluenceConfigError` for
        one, :class:`PeerFailedError` otherwise) with its message and rank. Nothing is left waiting for a
        rank that raised alone (before training: in the first gradient all-reduce).

        One process: raises ``error`` if there is one."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        code = 0 if error is None else (1 if isinstance(error, InfluenceConfigError) else 2)
        flags = self._collective(self._all_gather, torch.tensor([code], dtype=torch.long, device=self._device()))
        codes = flags.reshape(-1).tolist()
        failed = [r for r, c in enumerate(codes) if c]
        if not failed:
            return
        messages = self._exchange_messages("" if error is None else str(error))
        first = failed[0]
        if first == self.rank and error is not None:
            raise error
        where = f" [found on rank {first}; every rank stops here]"
        if codes[first] == 1:
            raise InfluenceConfigError(messages[first] + where)
        raise PeerFailedError(f"influence stopped on rank {self.rank} because rank(s) {failed} failed (rank {first}: "
                              f"{messages[first]}).")

    def settle(self) -> None:
        """Wait until every rank has finished its collectives (a barrier); nothing for one process or
        after a collective itself failed. Without it a rank can leave the block right after a gather and
        exit while a peer's last transfer is still in flight: under ``ddp_spawn`` with gloo one run in
        three aborted at exit ("terminate called without an active exception"), with plain
        ``torch.distributed.all_gather`` as with Lightning's, and none with a barrier after them."""
        if self.distributed and not self._broken:
            self._collective(self._barrier)

    def close(self) -> None:
        """Free what the collectives hold (a process group); nothing for one process."""

    @contextlib.contextmanager
    def agreement(self) -> Iterator[None]:
        """Run a block of collective work: if it raises on this rank, tell the others (they raise
        :class:`PeerFailedError` at their next collective) and re-raise here; on success, check that
        no other rank failed after the last collective, and :meth:`settle`."""
        try:
            yield
            self.check()
            self.settle()
        except (PeerFailedError, StopRequested):  # every rank knows already
            raise
        except BaseException as err:
            if self.distributed and not self._broken:
                self._fail(err)
            raise

    # ------------------------------------------------------------------ protocol
    def _collective(self, fn, *args):
        """``fn(*args)``, a collective; if it raises, no other collective is entered on this rank."""
        try:
            return fn(*args)
        except BaseException:
            self._broken = True
            raise

    def _status(self, ok: bool) -> None:
        code = _FAILED if not ok else (_STOP if self.stop_requested is not None and self.stop_requested() else _OK)
        flags = self._collective(self._all_gather, torch.tensor([code], dtype=torch.long, device=self._device()))
        codes = flags.reshape(-1).tolist()
        failed = [r for r, f in enumerate(codes) if f == _FAILED]
        stopped = [r for r, f in enumerate(codes) if f == _STOP]
        if stopped and not failed:
            self._broken = True  # every rank raises here: no more collectives
            raise StopRequested(
                f"{self.stop_what} (received on rank(s) {stopped}) stopped the influence computation on every rank "
                f"(rank {self.rank} here); training, its weights and checkpoints are kept."
            )
        if failed:
            messages = self._exchange_messages("")
            self._broken = True
            detail = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
            raise PeerFailedError(
                f"influence stopped on rank {self.rank} because rank(s) {failed} failed ({detail}). "
                "Fix that error; no process waits in a collective."
            )

    def _fail(self, err: BaseException) -> None:
        """Send "failed" and this rank's message; the other ranks are in (or will reach) a status
        exchange and receive it."""
        try:
            self._collective(self._all_gather, torch.tensor([1], dtype=torch.long, device=self._device()))
            self._exchange_messages(f"{type(err).__name__}: {err}")
        except BaseException:  # noqa: BLE001 - the original error is what the caller raises
            pass
        self._broken = True

    def _exchange_messages(self, message: str) -> List[str]:
        data = message.encode("utf-8", "replace")[: self.MESSAGE_BYTES]
        buf = torch.zeros(self.MESSAGE_BYTES, dtype=torch.uint8, device=self._device())
        if data:
            buf[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        parts = self._collective(self._all_gather, buf)
        return [bytes(p.tolist()).rstrip(b"\0").decode("utf-8", "replace") for p in parts.reshape(self.world_size, -1)]

    def _device(self) -> torch.device:
        return torch.device("cpu")


#: one process: every collective is the identity
SOLO = Communicator()


def local_communicator(comm: Optional[Communicator]) -> Communicator:
    """``comm``, or :data:`SOLO` when ``None``."""
    return SOLO if comm is None else comm
