"""How one influence computation is split over ``W`` processes: the :class:`Communicator` seam.

The maths sees only this interface, never Lightning or ``torch.distributed``: the callback hands in one
built on the Trainer's strategy (:mod:`lightning_influence.strategy`), :func:`compute_influence` uses
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
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from .errors import InfluenceRuntimeError

__all__ = ["Communicator", "PeerFailedError", "SOLO", "shard_bounds"]


def shard_bounds(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous shard of ``n`` items: the first ``n % W`` ranks
    hold one more, so the shards cover ``0..n-1`` in order."""
    base, extra = divmod(int(n), int(world_size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class PeerFailedError(InfluenceRuntimeError):
    """Another process of the same influence computation failed; the message names it and its error."""


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

    def __init__(self) -> None:
        self._broken = False  # a collective itself failed: never enter another one

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

    def settle(self) -> None:
        """Wait until every rank has finished its collectives (a barrier); nothing for one process or
        after a collective itself failed. Without it a rank can leave the block right after a gather and
        exit while a peer's last transfer is still in flight: under ``ddp_spawn`` with gloo one run in
        three aborted at exit ("terminate called without an active exception"), with plain
        ``torch.distributed.all_gather`` as with Lightning's, and none with a barrier after them."""
        if self.distributed and not self._broken:
            self._collective(self._barrier)

    @contextlib.contextmanager
    def agreement(self) -> Iterator[None]:
        """Run a block of collective work: if it raises on this rank, tell the others (they raise
        :class:`PeerFailedError` at their next collective) and re-raise here; on success, check that
        no other rank failed after the last collective, and :meth:`settle`."""
        try:
            yield
            self.check()
            self.settle()
        except PeerFailedError:
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
        flags = self._collective(self._all_gather, torch.tensor([0 if ok else 1], dtype=torch.long,
                                                                 device=self._device()))
        failed = [r for r, f in enumerate(flags.reshape(-1).tolist()) if f]
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
