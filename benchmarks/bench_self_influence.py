"""Self-influence of every training example, per solver, against the exact answer.

    python benchmarks/bench_self_influence.py                    # tanh MLP, every solver
    python benchmarks/bench_self_influence.py --models logreg mlp --solvers ekfac lissa

``I_up,loss(z_i, z_i) = −gᵢᵀ(H + λI)⁻¹gᵢ`` for all 1,347 training digits of the logistic regression and
the tanh MLP of ``tests/problems.py`` (float64, their weight decay as λ). The reference is the dense solve
(``solver="exact"``) run here first; each row is ``compute_influence(..., self_influence=True)`` with one
query (the scores of one query are a negligible part of the time), its wall time as measured in this
process one after the other, and the Spearman ρ and Pearson r of its self-influence against the exact one
(torchmetrics), plus the time ratio to the exact solve. A timing, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_lissa import _problem  # noqa: E402

CACHE = os.path.join(HERE, ".cache")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["mlp"], choices=["logreg", "mlp"])
    ap.add_argument("--solvers", nargs="*", default=["ekfac", "kfac", "arnoldi", "lissa", "cg"])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(CACHE, exist_ok=True)

    from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

    from lightning_influence import compute_influence

    print("| model | solver | wall s | × exact | Spearman ρ | Pearson r |\n|---|---|---|---|---|---|")
    for name in args.models:
        p = _problem(name, torch.float64, CACHE)

        def run(solver: str):
            t0 = time.perf_counter()
            res = compute_influence(p.model, p.train, p.val, query_indices=[0], solver=solver, damping=p.damping,
                                    self_influence=True, dtype=torch.float64)
            return res.self_influence, time.perf_counter() - t0

        ref, t_ref = run("exact")
        label = {"logreg": "logistic regression", "mlp": "tanh MLP"}[name]
        print(f"| {label} | exact (reference) | {t_ref:.1f} | 1.00 | 1 | 1 |", flush=True)
        for solver in args.solvers:
            si, t = run(solver)
            rho, r = float(spearman_corrcoef(si, ref)), float(pearson_corrcoef(si, ref))
            print(f"| {label} | {solver} | {t:.1f} | {t / t_ref:.2f} | {rho:.4f} | {r:.4f} |", flush=True)


if __name__ == "__main__":
    main()
