"""Many queries in bounded memory: ``Q`` queries on a ~51k-parameter MLP, every solver, wall time and peak memory.

    python benchmarks/bench_queries.py                       # Q = 2,000; auto, cg, lissa, arnoldi, ekfac
    python benchmarks/bench_queries.py --queries 200 --solvers auto ekfac --timeout 300

The model: a 64-256-128-10 tanh MLP (50,698 parameters) trained on the 1,347 training digits (Adam, coupled L2
1e-3, float32). The queries: ``Q`` digits from the validation split and noisy copies of them (Gaussian noise of
standard deviation 0.1, pixels in [0, 1], seeded), so ``Q`` can exceed the 450 validation digits. Every solver runs in a fresh
subprocess (``spawn`` of bench_lissa.py's harness), which reports its wall time, the query batch the solver
used (``res.settings["query_batch_size"]``) and its peak resident memory (``VmHWM``: interpreter, torch and
the data included; ``base MB`` is the resident size before the computation). Damping: ``"auto"``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_lissa import peak_rss_mb, rss_mb, spawn  # noqa: E402


def _model_and_data(num_queries: int):
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from tests.problems import digits

    torch.manual_seed(0)
    train, val = digits(torch.float32)
    net = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 128), nn.Tanh(), nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-3)
    x, y = train.tensors
    for _ in range(300):  # full batch: a few seconds
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    vx, vy = val.tensors
    reps = -(-num_queries // len(vx))
    g = torch.Generator().manual_seed(1)
    qx = torch.cat([vx] + [vx + 0.1 * torch.randn(vx.shape, generator=g) for _ in range(reps - 1)])[:num_queries]
    qy = vy.repeat(reps)[:num_queries]
    return net, train, TensorDataset(qx, qy), opt


def worker(job: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(job["threads"])
    from lightning_influence import compute_influence
    from lightning_influence.curvature.damping import AutoDamping

    net, train, queries, opt = _model_and_data(job["queries"])
    base = rss_mb()
    t0 = time.perf_counter()
    res = compute_influence(net, train, queries, query_indices=list(range(job["queries"])), solver=job["solver"],
                            damping=AutoDamping.from_optimizer(opt))
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 1), "peak_mb": round(peak_rss_mb()), "base_mb": round(base),
            "params": sum(p.numel() for p in net.parameters()), "chosen": res.settings.get("auto_choice", job["solver"]),
            "query_batch": res.settings.get("query_batch_size"), "damping": res.damping,
            "scores_mb": round(res.scores.numel() * res.scores.element_size() / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--solvers", nargs="+", default=["auto", "cg", "lissa", "arnoldi", "ekfac"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    print(f"{args.queries} queries × 1,347 training digits, 64-256-128-10 tanh MLP, float32, damping='auto', "
          f"{args.threads} torch threads; each solver in its own process (timeout {args.timeout:.0f} s)\n")
    print("| solver | chosen | query batch | λ | wall s | peak MB | base MB | scores MB |")
    print("|---|---|---|---|---|---|---|---|")
    for solver in args.solvers:
        job = {"solver": solver, "queries": args.queries, "threads": args.threads}
        r = spawn(job, script=os.path.abspath(__file__), timeout=args.timeout)
        if "error" in r:
            print(f"| {solver} | {r['error']} | | | | | | |", flush=True)
            continue
        print(f"| {solver} | {r['chosen']} | {r['query_batch']} | {r['damping']:.3g} | {r['wall_s']} | {r['peak_mb']} | "
              f"{r['base_mb']} | {r['scores_mb']} |", flush=True)


if __name__ == "__main__":
    main()
