"""Several ranks of one influence computation without processes: one thread per rank and an in-memory
communicator (test support)."""

from __future__ import annotations

import threading

import torch

from lightning_influence.distributed import Communicator

__all__ = ["FakeRank", "ThreadWorld", "run_ranks"]


class FakeRank(Communicator):
    """A rank of a world whose collectives are never called (for shard-only work)."""

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__()
        self.rank, self.world_size = rank, world_size


class ThreadWorld:
    """Collectives between threads: every rank leaves its tensor in a slot and waits at a barrier (a
    10 s timeout turns a hang into an error)."""

    def __init__(self, world_size: int) -> None:
        self.slots = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=10)

    def comm(self, rank: int) -> Communicator:
        world = self

        class ThreadRank(Communicator):
            def __init__(self) -> None:
                super().__init__()
                self.rank, self.world_size = rank, len(world.slots)

            def _all_gather(self, tensor):
                world.slots[rank] = tensor.clone()
                world.barrier.wait()
                out = torch.stack(list(world.slots))
                world.barrier.wait()
                return out

            def _all_reduce(self, tensor):
                return self._all_gather(tensor).sum(0)

            def _barrier(self):
                world.barrier.wait()
                self.barriers += 1

        rank_comm = ThreadRank()
        rank_comm.barriers = 0
        return rank_comm


def run_ranks(world_size: int, fn, monkeypatch):
    """``fn(rank, comm)`` on one thread per rank; returns each rank's result or exception. Forward-mode AD
    keeps global state, so the threads take turns inside each Hessian-vector product."""
    import lightning_influence.curvature.operator as operator

    lock, hvp = threading.Lock(), operator.batch_hvp

    def one_at_a_time(*args, **kwargs):
        with lock:
            return hvp(*args, **kwargs)

    monkeypatch.setattr(operator, "batch_hvp", one_at_a_time)
    world = ThreadWorld(world_size)
    out = [None] * world_size

    def target(r: int) -> None:
        try:
            out[r] = fn(r, world.comm(r))
        except BaseException as err:  # noqa: BLE001 - returned to the test
            out[r] = err

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out
