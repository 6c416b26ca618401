"""The Trainer's strategy as the influence computation's :class:`~lightning_influence.distributed.Communicator`.

The callback splits its work over the processes Lightning trains with, on a process group of its own
(same backend and ranks, created per run) whose collectives each wait at most ``collective_timeout`` seconds
and let signal handlers run while they wait, and which stop every rank together after SIGTERM
(:class:`StrategyCommunicator`). Data-parallel strategies (DDP in every start method: ``ddp``,
``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) are served; strategies that shard or split the model's
parameters across processes are refused before training.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed import SOLO, CollectiveTimeoutError, Communicator, PeerFailedError
from ..errors import InfluenceConfigError

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["DEFAULT_COLLECTIVE_TIMEOUT", "StrategyCommunicator", "check_strategy", "communicator_for", "opened_communicator"]

#: strategies whose processes hold different parameters (sharded or split model)
_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")
#: strategies whose processes hold the same parameters and different data
_DATA_PARALLEL = ("DDPStrategy",)


def _kinds(strategy: object) -> List[str]:
    """Class names along the strategy's MRO (works for both ``pytorch_lightning`` and ``lightning``)."""
    return [c.__name__ for c in type(strategy).__mro__]


def check_strategy(trainer: "pl.Trainer") -> None:
    """Raise :class:`InfluenceConfigError` for a strategy the callback cannot serve (parameters sharded or
    split across processes, or an unknown multi-process strategy), naming it and the alternative."""
    strategy = trainer.strategy
    kinds = _kinds(strategy)
    name = type(strategy).__name__
    sharded = next((k for k in _SHARDED if k in kinds), None)
    if sharded is not None:
        raise InfluenceConfigError(
            f"InfluenceCallback cannot run under {name}: it shards or splits the model's parameters across "
            "processes, and influence needs every attributed parameter (and its Hessian products) whole on "
            "each process. Train with strategy='ddp' (the influence work is then split across its processes), "
            "or load the trained checkpoint into an unsharded model and call "
            "lightning_influence.compute_influence(model, train_dataset, val_dataset)."
        )
    if trainer.world_size > 1 and not any(k in kinds for k in _DATA_PARALLEL):
        raise InfluenceConfigError(
            f"InfluenceCallback does not know how to split its work under {name} with {trainer.world_size} "
            "processes. Use strategy='ddp' (or 'ddp_spawn' / 'ddp_notebook'), or a single device."
        )


#: the callback's default ``collective_timeout``: seconds a rank waits in one influence collective for the others
DEFAULT_COLLECTIVE_TIMEOUT = 600.0


@contextlib.contextmanager
def opened_communicator(trainer: "pl.Trainer", timeout: Optional[float] = None) -> Iterator[Communicator]:
    """:func:`communicator_for` (a collective), closed when the block ends however it ends."""
    comm = communicator_for(trainer, timeout)
    try:
        yield comm
    finally:
        comm.close()


def communicator_for(trainer: "pl.Trainer", timeout: Optional[float] = None) -> Communicator:
    """The communicator for this Trainer: :data:`~lightning_influence.distributed.SOLO` on one process,
    a :class:`StrategyCommunicator` over the strategy's processes otherwise (a collective: it creates the
    influence phase's own process group, so call it on every rank, in the same order). ``timeout``:
    seconds a rank waits in one collective (default :data:`DEFAULT_COLLECTIVE_TIMEOUT`). The communicator
    stops every rank together once Lightning has received SIGTERM on any of them."""
    check_strategy(trainer)
    if trainer.world_size <= 1:
        return SOLO
    return StrategyCommunicator(trainer.strategy, trainer.global_rank, trainer.world_size,
                                timeout=DEFAULT_COLLECTIVE_TIMEOUT if timeout is None else timeout,
                                stop_requested=lambda: bool(getattr(trainer, "received_sigterm", False)),
                                stop_what="SIGTERM")


class StrategyCommunicator(Communicator):
    """Collectives for the influence phase on its own process group of the strategy's processes (same
    backend, same ranks), each with a timeout of its own.

    Its own group keeps the influence phase's collectives apart from Lightning's on the default group:
    Lightning's SIGTERM handler broadcasts on the default group from inside the signal handler, which
    deadlocked against an influence all-gather there. Every collective is issued asynchronously and waited
    for in short slices (20 ms with gloo, polled otherwise), so Python signal handlers run while a rank
    waits, and a rank that waits longer than ``timeout`` seconds raises
    :class:`~lightning_influence.distributed.CollectiveTimeoutError` (the group's own backend timeout is a
    little longer, to free its worker threads afterwards). A collective that fails because a peer left
    (``Connection closed by peer``) raises :class:`~lightning_influence.distributed.PeerFailedError`.

    Args:
        strategy: the Trainer's strategy (DDP in any start method).
        rank / world_size: this process's global rank and the number of processes.
        timeout: seconds one collective may wait for the other ranks.
        stop_requested / stop_what: see :class:`~lightning_influence.distributed.Communicator`.
    """

    #: seconds of one wait slice (gloo's ``Work.wait(timeout)``)
    SLICE = 0.02
    #: seconds the backend's own timeout exceeds ``timeout`` (its error would be less clear than ours)
    BACKEND_GRACE = 5.0

    def __init__(self, strategy: object, rank: int, world_size: int, timeout: float = DEFAULT_COLLECTIVE_TIMEOUT,
                 stop_requested: Optional[Callable[[], bool]] = None, stop_what: str = "a stop request") -> None:
        super().__init__(stop_requested=stop_requested, stop_what=stop_what)
        self.strategy = strategy
        self.rank, self.world_size = int(rank), int(world_size)
        self.timeout = float(timeout)
        self._backend = str(dist.get_backend())
        self._group = dist.new_group(backend=self._backend,
                                     timeout=datetime.timedelta(seconds=self.timeout + self.BACKEND_GRACE))
        self._count = 0  # collectives issued (named in a timeout's message)
        self._abandoned = False  # a collective was given up on while the backend still waits in it

    def _device(self) -> torch.device:
        if self._backend == "gloo":
            return torch.device("cpu")
        return self.strategy.root_device  # type: ignore[attr-defined]

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        on = tensor.to(self._device()).contiguous()
        self._wait(dist.all_reduce(on, group=self._group, async_op=True), "all-reduce")
        return on.to(tensor.device)

    def _all_gather(self, tensor: Tensor) -> Tensor:
        on = tensor.to(self._device()).contiguous()
        parts = [torch.empty_like(on) for _ in range(self.world_size)]
        self._wait(dist.all_gather(parts, on, group=self._group, async_op=True), "all-gather")
        return torch.stack(parts).to(tensor.device)

    def _barrier(self) -> None:
        self._all_reduce(torch.zeros(1))

    def _wait(self, work: Any, what: str) -> None:
        """Wait for ``work`` in slices until ``timeout`` (signal handlers run between slices)."""
        self._count += 1
        start = time.monotonic()
        deadline = start + self.timeout
        delay = 5e-5
        while True:
            try:
                if self._backend == "gloo":
                    work.wait(datetime.timedelta(seconds=self.SLICE))  # raises "Operation timed out!" if not done
                    return
                if work.is_completed():
                    work.wait()
                    return
                else:
                    time.sleep(delay)
                    delay = min(2 * delay, 1e-3)
            except RuntimeError as err:
                if "operation timed out" not in str(err).lower() or work.is_completed():
                    raise PeerFailedError(
                        f"influence stopped on rank {self.rank}: its {what} (collective {self._count}) failed "
                        f"({str(err).splitlines()[0][:300]}); another rank left the influence computation (it "
                        "died, was stopped, or gave up waiting for this one)."
                    ) from err
            if time.monotonic() > deadline:
                self._abandoned = True  # the backend still holds the op until its own timeout
                raise CollectiveTimeoutError(
                    f"influence stopped on rank {self.rank}: the other ranks did not join its {what} (collective "
                    f"{self._count}) within collective_timeout={self.timeout:g} s (waited "
                    f"{time.monotonic() - start:.1f} s): a rank has stopped, hangs or is far slower. Raise "
                    "InfluenceCallback(collective_timeout=...) if the ranks legitimately need longer between "
                    "collectives (e.g. rank zero writing a large report)."
                )

    def close(self) -> None:
        """Give the process group back (its threads and connections); after this no collective is possible.
        A group with an abandoned collective is left to the backend's own timeout (destroying it would wait
        for that op: the stopped rank's continuation)."""
        group, self._group, self._broken = self._group, None, True
        if group is not None and not self._abandoned:
            try:
                dist.destroy_process_group(group)
            except Exception:  # noqa: BLE001 - an already broken group: nothing more to free
                pass
