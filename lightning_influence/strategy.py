"""The Trainer's strategy as the influence computation's :class:`~lightning_influence.distributed.Communicator`.

The callback splits its work through the same engine Lightning trains with: the strategy's own
collectives (``all_gather``, ``reduce``) on its process group and device. Data-parallel strategies (DDP in
every start method: ``ddp``, ``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) are served; strategies that
shard or split the model's parameters across processes are refused before training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List

import torch
from torch import Tensor

from .distributed import SOLO, Communicator
from .errors import InfluenceConfigError

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["StrategyCommunicator", "check_strategy", "communicator_for"]

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


def communicator_for(trainer: "pl.Trainer") -> Communicator:
    """The communicator for this Trainer: :data:`~lightning_influence.distributed.SOLO` on one process,
    a :class:`StrategyCommunicator` over the strategy's processes otherwise."""
    check_strategy(trainer)
    if trainer.world_size <= 1:
        return SOLO
    return StrategyCommunicator(trainer.strategy, trainer.global_rank, trainer.world_size)


class StrategyCommunicator(Communicator):
    """Collectives through a Lightning data-parallel strategy (its process group and root device).

    Args:
        strategy: the Trainer's strategy (DDP in any start method).
        rank / world_size: this process's global rank and the number of processes.
    """

    def __init__(self, strategy: object, rank: int, world_size: int) -> None:
        super().__init__()
        self.strategy = strategy
        self.rank, self.world_size = int(rank), int(world_size)

    def _device(self) -> torch.device:
        return self.strategy.root_device  # type: ignore[attr-defined]

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        on = tensor.to(self._device())
        out = self.strategy.reduce(on, reduce_op="sum")  # type: ignore[attr-defined]  (in place)
        return out.to(tensor.device)

    def _all_gather(self, tensor: Tensor) -> Tensor:
        on = tensor.to(self._device())
        out = self.strategy.all_gather(on)  # type: ignore[attr-defined]
        return out.to(tensor.device).reshape(self.world_size, *tensor.shape)

    def _barrier(self) -> None:
        self.strategy.barrier("lightning_influence")  # type: ignore[attr-defined]
