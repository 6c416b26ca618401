"""Answering new queries from an influence index against recomputing them (``compute_influence``).

    python benchmarks/bench_index.py                 # the small CNN on 1,347 digits, 100 queries
    python benchmarks/bench_index.py --queries 20 --epochs 2
    python benchmarks/bench_index.py --model cnn_1m --epochs 3 --representations compressed   # 1M params, 10,000 images

``--model cnn_1m``: ``bench_scale.py``'s 1.0M-parameter CNN on 10,000 augmented digits (``--train``), trained
with Adam as there; its exact index would be ``N·P`` = 40 GB, so only the compressed one (``projection="auto"``
picks the sketch: the dense ``[k, P]`` matrix would be 4 GB) is built.

The CNN (``tests/problems.small_cnn``, float32) is trained for ``--epochs`` of Adam; then, for the solver
``--solver``: the time of ``compute_influence`` for ``--queries`` test digits (fit, solve, a pass over every
training gradient), the index's build time (fit and one pass) for the exact and compressed representations,
and the time of ``index.explain`` for the same queries (query gradients and one product with the stored
rows), with the index's size on disk and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lightning_influence import compute_influence  # noqa: E402
from lightning_influence.index import build_index_for_run  # noqa: E402
from tests import problems  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--solver", default="ekfac")
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--projection-dim", type=int, default=1024)
    parser.add_argument("--model", choices=["small_cnn", "cnn_1m"], default="small_cnn")
    parser.add_argument("--train", type=int, default=10_000, help="training images of cnn_1m")
    parser.add_argument("--representations", nargs="+", default=["exact", "compressed"],
                        choices=["exact", "compressed"])
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model == "small_cnn":
        train, val = problems.digits(torch.float32, image=True)
        model = problems.fit_adam(problems.small_cnn(), train, 1e-3, epochs=args.epochs)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_scale import augmented_digits, cnn_1m

        train, val = augmented_digits(args.train), augmented_digits(max(args.queries, 100), seed=1)
        model = cnn_1m()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        t0 = time.perf_counter()
        for _ in range(args.epochs):
            for x, y in torch.utils.data.DataLoader(train, batch_size=128, shuffle=True):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        model.eval()
        print(f"trained {args.epochs} epoch(s) in {time.perf_counter() - t0:.1f} s")
    queries = list(range(args.queries))
    p = sum(t.numel() for t in model.parameters())
    print(f"# {args.model}, P={p}, n={len(train)}, Q={len(queries)}, solver={args.solver}, damping={args.damping}, "
          f"float32, {torch.get_num_threads()} thread(s)")
    t0 = time.perf_counter()
    ref = compute_influence(model, train, val, query_indices=queries, solver=args.solver, damping=args.damping)
    recompute = time.perf_counter() - t0
    print(f"compute_influence (recompute): {recompute:.2f} s; peak RSS so far "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    for rep in args.representations:
        with tempfile.TemporaryDirectory() as folder:
            t0 = time.perf_counter()
            index = build_index_for_run(model, train, folder, solver=args.solver, damping=args.damping,
                                        representation=rep, projection_dim=args.projection_dim)
            build = time.perf_counter() - t0
            index.explain(model, val, queries[:2])  # warm: page cache, first-call costs
            t0 = time.perf_counter()
            res = index.explain(model, val, queries)
            query = time.perf_counter() - t0
            corr = float(problems.pearson_rows(res.scores, ref.scores).mean())
            print(f"index {rep:10s} ({index.projection or 'exact'}) D={index.dim:6d}: build {build:.2f} s "
                  f"({index.meta['timings']}), {len(queries)} queries {query:.3f} s "
                  f"({recompute / query:.0f}x faster than recomputing), disk {index.disk_bytes / 2**20:.1f} MiB, "
                  f"Pearson vs compute_influence {corr:.4f}; query split "
                  f"{ {k: round(v, 3) for k, v in res.timings.items()} }")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
