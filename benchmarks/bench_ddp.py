"""Influence split over 2 DDP processes against 1 process, side by side in one run.

    python benchmarks/bench_ddp.py                       # digits CNN, 10 queries, lissa / ekfac / arnoldi
    python benchmarks/bench_ddp.py --model mlp --solvers lissa cg --queries 100

The script starts a 2-process DDP Trainer on the CPU (gloo) around the benchmark's trained model (one
training step at learning rate 0: the weights stay as trained), then, on that Trainer's strategy:

- **2 processes**: every rank calls ``compute_influence(..., comm=communicator_for(trainer))`` with 1
  torch thread each; each scores its half of the training set and the full-data passes are all-reduced.
- **1 process, 1 thread** and **1 process, 2 threads**: rank zero alone runs the same call (rank 1 waits
  at a barrier).

It prints a markdown table: wall seconds, training examples scored per process, the speed-up of 2
processes over 1 process with the same threads per process (the split's efficiency) and over 1 process
with all the cores (what a user of this 2-core machine gains), and the Pearson r of the split scores
against the single-process ones. This machine has 2 cores: 2 processes × 1 thread use the same cores
as 1 process × 2 threads, so the second ratio is bounded near 1 here; on W devices (GPUs, or nodes)
the first ratio is what carries over. A timing, not a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_lissa import _problem, _queries  # noqa: E402
from bench_peers import machine  # noqa: E402

CACHE = os.path.join(HERE, ".cache")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn", choices=["logreg", "mlp", "cnn"])
    ap.add_argument("--solvers", nargs="*", default=["lissa", "ekfac", "arnoldi"])
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    os.makedirs(CACHE, exist_ok=True)

    import pytorch_lightning as pl
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from lightning_influence import compute_influence
    from lightning_influence.integration.strategy import communicator_for

    p = _problem(args.model, torch.float64, CACHE)  # the data are float64; influence runs in float32
    queries = _queries(args.queries)

    class Wrapped(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = p.model

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_steps=1, logger=False, enable_checkpointing=False, precision="64-true",
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        strategy=pl.strategies.DDPStrategy(process_group_backend="gloo", timeout=datetime.timedelta(minutes=30)),
    )
    module = Wrapped()
    trainer.fit(module, DataLoader(p.train, batch_size=64))
    model = module.net
    comm = communicator_for(trainer)
    rows = []
    for solver in args.solvers:
        kw = dict(query_indices=queries, solver=solver, damping=p.damping)
        torch.set_num_threads(1)
        trainer.strategy.barrier()
        scored = {}
        t0 = time.perf_counter()
        split = compute_influence(model, p.train, p.val, comm=comm, **kw,
                                  progress=lambda phase, done, total: scored.__setitem__(phase, done))
        t_split = time.perf_counter() - t0
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            times = {}
            for threads in (1, 2):
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                one = compute_influence(model, p.train, p.val, **kw)
                times[threads] = time.perf_counter() - t0
            r = float(torch.corrcoef(torch.stack([split.scores.flatten().double(), one.scores.flatten().double()]))[0, 1])
            rows.append(dict(solver=solver, split=t_split, one1=times[1], one2=times[2], scored=scored.get("scoring"),
                             total=len(p.train), r=r))
        trainer.strategy.barrier()
    if trainer.is_global_zero:
        print(f"\nMachine: {machine()}; torch {torch.__version__}; model {args.model} "
              f"({sum(q.numel() for q in model.parameters()):,} parameters), {len(p.train):,} training examples, "
              f"{len(queries)} queries.\nCommand: python benchmarks/bench_ddp.py {' '.join(sys.argv[1:])}\n")
        print("| solver | 1 process × 2 threads (s) | 1 process × 1 thread (s) | 2 processes × 1 thread (s) | "
              "examples scored per process | speed-up, same threads per process | speed-up vs 1 × 2 threads | "
              "r vs 1 process |\n|---|---|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['solver']} | {row['one2']:.1f} | {row['one1']:.1f} | {row['split']:.1f} | "
                  f"{row['scored']:,} of {row['total']:,} | {row['one1'] / row['split']:.2f}× | "
                  f"{row['one2'] / row['split']:.2f}× | {row['r']:.4f} |")
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
