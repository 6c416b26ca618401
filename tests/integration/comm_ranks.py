"""Two processes of :class:`~lightning_influence.integration.strategy.StrategyCommunicator` on plain
``torch.distributed`` (gloo, CPU), without Lightning: run as a script by ``test_collectives.py``, once per rank::

    python tests/integration/comm_ranks.py RANK PORT OUT

Scenarios, in order, each on its communicator (its own process group): a sum; a check failing on rank 1 only
(``raise_together``); a stop requested on rank 0 (``stop_requested``, as after SIGTERM); rank 1 stopped
(SIGSTOP) for 3 s while rank 0 waits with a 1 s ``timeout``. Writes ``OUT/comm<rank>.json``: per scenario the
outcome (``"ok"`` or the exception's type and message) and the seconds it took.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lightning_influence.errors import InfluenceConfigError  # noqa: E402
from lightning_influence.integration.strategy import StrategyCommunicator  # noqa: E402

STRATEGY = SimpleNamespace(root_device=torch.device("cpu"))


def outcome(fn):
    t0 = time.monotonic()
    try:
        value = fn()
        out = "ok" if value is None else value
    except BaseException as err:  # noqa: BLE001 - reported to the test
        out = f"{type(err).__name__}: {err}"
    return {"outcome": out, "seconds": time.monotonic() - t0}


def main() -> None:
    rank, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    seen = {}

    comm = StrategyCommunicator(STRATEGY, rank, 2, timeout=10)
    seen["sum"] = outcome(lambda: comm.all_reduce_sum(torch.tensor([rank + 1.0])).tolist())
    comm.close()

    comm = StrategyCommunicator(STRATEGY, rank, 2, timeout=10)
    failure = InfluenceConfigError("params='x' matches nothing: pass params=None") if rank == 1 else None
    seen["check"] = outcome(lambda: comm.raise_together(failure))
    comm.close()

    comm = StrategyCommunicator(STRATEGY, rank, 2, timeout=10, stop_requested=lambda: rank == 0, stop_what="SIGTERM")

    def work():
        with comm.agreement():
            for _ in range(3):
                comm.all_reduce_sum(torch.ones(4))

    seen["stop"] = outcome(work)
    comm.close()

    comm = StrategyCommunicator(STRATEGY, rank, 2, timeout=1)

    def stopped():
        if rank == 1:
            subprocess.Popen(["sh", "-c", f"sleep 3; kill -CONT {os.getpid()}"])
            os.kill(os.getpid(), signal.SIGSTOP)
        with comm.agreement():
            comm.all_reduce_sum(torch.ones(4))

    seen["stopped_rank"] = outcome(stopped)
    t0 = time.monotonic()
    comm.close()
    seen["close_seconds"] = time.monotonic() - t0
    with open(os.path.join(out, f"comm{rank}.json"), "w") as fh:
        json.dump(seen, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
