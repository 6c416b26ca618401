"""Every solver on every family of the model zoo (``tests/zoo.py``), against the exact damped inverse.

For each zoo entry (trained, seeded, float32 weights as users have them) and each registered solver, one
``compute_influence`` call with the entry's damping (``H + damping·I`` positive definite, see the zoo table)
on ``--queries`` queries, and as the reference the same problem solved in float64 by conjugate gradient
to a relative residual of 1e-10 (the exact damped solve to round-off, without forming the ``P × P`` Hessian,
which takes minutes for the convolutional entries). Printed per row: the solver the run used (``auto`` names its choice), per-query Pearson of the
scores against the exact ones (median and min), the ratio of the mean |predicted loss change| to the exact
one (magnitudes: a factor, 1 is right), wall time, and what failed, if anything. Ratios and correlations are
measured side by side in one run; times are for comparison within the run only.

    python benchmarks/bench_zoo.py                        # every entry, every solver (≈ 15-25 min on 2 cores)
    python benchmarks/bench_zoo.py --models transformer_tokens lstm_tokens --solvers auto lissa ekfac
    python benchmarks/bench_zoo.py --json out.json        # the rows as JSON too

The Kronecker-factored solvers (``ekfac``, ``kfac``) approximate the Gauss-Newton curvature, not the Hessian:
their Pearson against the exact Hessian solve is a measure of that approximation too, not of a solver bug.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_influence import CGSettings, compute_influence  # noqa: E402
from lightning_influence.solvers.base import solver_names  # noqa: E402
from tests import zoo  # noqa: E402
from tests.problems import pearson_rows as pearson  # noqa: E402


def run_one(entry: "zoo.ZooModel", solver: Any, queries: List[int], dtype: torch.dtype) -> Any:
    return compute_influence(entry.model, entry.train, entry.query, query_indices=queries, solver=solver,
                             damping=entry.damping, loss_fn=entry.loss_fn, dtype=dtype)


def main(argv: List[str] | None = None) -> List[Dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(zoo.NAMES), help="zoo entries (default: all)")
    ap.add_argument("--solvers", nargs="*", default=solver_names(), help="solvers (default: every registered one)")
    ap.add_argument("--queries", type=int, default=10, help="queries per model (the first Q of its query set)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); reference: CG to 1e-10 in float64; "
          f"{args.queries} queries per model; damping = the zoo entry's")
    head = f"{'model':<20} {'P':>5} {'solver':<16} {'pearson med':>11} {'min':>6} {'|Δ| ratio':>9} {'seconds':>8}  note"
    print(head)
    print("-" * len(head))
    rows: List[Dict[str, Any]] = []
    for name in args.models:
        entry = zoo.get(name)
        queries = list(range(min(args.queries, len(entry.query))))
        ref = run_one(entry, CGSettings(tol=1e-10, max_iter=5000), queries, torch.float64)
        ref_mag = float(ref.scores.abs().mean())
        for solver in args.solvers:
            t0 = time.perf_counter()
            row: Dict[str, Any] = {"model": name, "params": entry.num_params, "solver": solver}
            try:
                res = run_one(entry, solver, queries, torch.float32)
                r = pearson(res.scores, ref.scores)
                row.update(used=res.settings.get("auto_choice", res.solver), pearson_median=float(r.median()),
                           pearson_min=float(r.min()), magnitude_ratio=float(res.scores.abs().mean()) / ref_mag,
                           note="")
            except Exception as err:  # noqa: BLE001 - a row per failure, the run goes on
                row.update(used=solver, pearson_median=math.nan, pearson_min=math.nan, magnitude_ratio=math.nan,
                           note=f"{type(err).__name__}: {str(err).splitlines()[0][:90]}")
                if os.environ.get("BENCH_TRACEBACK"):
                    traceback.print_exc()
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            label = solver if row["used"] == solver else f"{solver}→{row['used']}"
            print(f"{name:<20} {entry.num_params:>5} {label:<16} {row['pearson_median']:>11.4f} "
                  f"{row['pearson_min']:>6.3f} {row['magnitude_ratio']:>9.3f} {row['seconds']:>8.1f}  {row['note']}",
                  flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
