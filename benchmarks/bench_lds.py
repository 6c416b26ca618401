"""Linear datamodeling score (LDS) of every solver and of the compressed index on sklearn digits.

    python benchmarks/bench_lds.py --m 20 --models logreg          # cheap mode: a couple of minutes
    python benchmarks/bench_lds.py --m 100 --models logreg mlp cnn # the common protocol (long)

Protocol (printed beside every number): the model is trained on the 1,347 training digits by
``Trainer.fit`` (full-batch L-BFGS, cross-entropy plus ``½·wd·‖θ‖²``, float64, seeded init); influence scores
of every training example on ``--queries`` test digits (the rest of the 1,797) are computed at those
weights with damping ``wd`` (the Hessian of the mean loss gains ``wd·I`` from the L2 term; the CNN 0.1,
its Hessian having small negative eigenvalues). Then ``m``
models are retrained the same way on random subsets (each exactly ``round(fraction·n)`` examples, subset
``j`` from seed ``(seed, j)``; init seed ``seed + 1 + j`` with ``--init vary``, the full model's with
``--init same``), and each query's test loss is measured. Per query, the LDS is the Spearman correlation
across subsets between that loss and ``Σ_{i∈S_j} score_i`` (the first-order predicted loss of the subset
model up to a positive affine map: removing ``i`` changes the loss by ``−score_i/n``); reported: the mean over
queries (``lightning_influence.index.lds``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lightning_influence import compute_influence  # noqa: E402
from lightning_influence.index import build_index_for_run  # noqa: E402
from lightning_influence.index.lds import linear_datamodeling_score, subset_masks  # noqa: E402
from tests import problems  # noqa: E402

#: name: (builder, image inputs, L2 weight decay, L-BFGS iterations, damping of the influence solve); the CNN's
#: λ = 0.1 as in tests/problems.trained_cnn (its Hessian has small negative eigenvalues at the L2's 1e-3)
MODELS = {"logreg": (problems.logistic_regression, False, 1e-2, 500, 1e-2),
          "mlp": (problems.tanh_mlp, False, 1e-2, 1000, 1e-2),
          "cnn": (problems.small_cnn, True, 1e-3, 300, 0.1)}
SOLVERS = ["exact", "cg", "lissa", "arnoldi", "ekfac", "kfac"]


def make_module(net: torch.nn.Module, weight_decay: float, max_iter: int):
    import pytorch_lightning as pl

    class FullBatchLBFGS(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            l2 = sum((p * p).sum() for p in self.net.parameters())
            return F.cross_entropy(self.net(x), y) + 0.5 * weight_decay * l2

        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-14,
                                     history_size=50, line_search_fn="strong_wolfe")

    return FullBatchLBFGS()


def train(model_name: str, train_set, rows: torch.Tensor, init_seed: int) -> torch.nn.Module:
    """``Trainer.fit`` on the examples ``rows`` of ``train_set``: one full batch, one L-BFGS step of up to
    ``max_iter`` iterations, float64 on the CPU; returns the trained network."""
    import pytorch_lightning as pl

    build, _, wd, max_iter, _ = MODELS[model_name]
    torch.manual_seed(init_seed)
    net = build().double()
    x, y = train_set.tensors
    data = torch.utils.data.TensorDataset(x[rows], y[rows])
    loader = torch.utils.data.DataLoader(data, batch_size=len(data), shuffle=False)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(make_module(net, wd, max_iter), loader)
    return net.eval()


def test_losses(net: torch.nn.Module, val, queries: torch.Tensor) -> torch.Tensor:
    x, y = val.tensors
    with torch.no_grad():
        return F.cross_entropy(net(x[queries]), y[queries], reduction="none")


def run(model_name: str, args) -> List[Dict[str, object]]:
    _, image, wd, _, damping = MODELS[model_name]
    train_set, val = problems.digits(torch.float64, image=image)
    n = len(train_set)
    queries = torch.arange(min(args.queries, len(val)))
    t0 = time.perf_counter()
    full = train(model_name, train_set, torch.arange(n), args.seed)
    t_full = time.perf_counter() - t0
    masks = subset_masks(n, args.m, args.fraction, args.seed)
    t0 = time.perf_counter()
    outputs = []
    for j in range(args.m):
        init = args.seed if args.init == "same" else args.seed + 1 + j
        outputs.append(test_losses(train(model_name, train_set, masks[j].nonzero().squeeze(1), init), val, queries))
    outputs = torch.stack(outputs)
    t_retrain = time.perf_counter() - t0
    protocol = (f"digits {model_name}, n={n}, Q={len(queries)} test queries, m={args.m} subsets x {args.fraction}, "
                f"Trainer.fit full-batch L-BFGS, L2 {wd:g}, damping {damping:g}, init {args.init}, seed {args.seed}, "
                "output = test loss")
    print(f"# {protocol}; full fit {t_full:.1f} s, {args.m} retrains {t_retrain:.0f} s", flush=True)
    rows = []
    for solver in args.solvers:
        t0 = time.perf_counter()
        try:
            res = compute_influence(full, train_set, val, query_indices=queries.tolist(), solver=solver,
                                    damping=damping,
                                    dtype=torch.float64)
        except Exception as err:  # noqa: BLE001 - a solver that cannot run on this model is a row, not a crash
            print(f"{model_name:7s} {solver:22s} failed: {type(err).__name__}: {err}", flush=True)
            continue
        lds, per_query = linear_datamodeling_score(res.scores, masks, outputs)
        rows.append({"model": model_name, "method": solver, "lds": lds, "seconds": time.perf_counter() - t0})
        print(f"{model_name:7s} {solver:22s} LDS {lds:.3f} (±{float(per_query.std() / len(per_query) ** 0.5):.3f})  "
              f"{rows[-1]['seconds']:.1f} s   [{protocol}]", flush=True)
    for k in args.projection_dims:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            index = build_index_for_run(full, train_set, folder, solver=args.index_solver, damping=damping,
                                        dtype=torch.float64, representation="compressed", projection_dim=k,
                                        seed=args.seed)
            res = index.explain(full, val, queries.tolist())
        lds, per_query = linear_datamodeling_score(res.scores, masks, outputs)
        name = f"index {args.index_solver} k={k}"
        rows.append({"model": model_name, "method": name, "lds": lds, "seconds": time.perf_counter() - t0})
        print(f"{model_name:7s} {name:22s} LDS {lds:.3f} (±{float(per_query.std() / len(per_query) ** 0.5):.3f})  "
              f"{rows[-1]['seconds']:.1f} s   [{protocol}]", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=100, help="retrained subset models (default 100)")
    parser.add_argument("--fraction", type=float, default=0.5, help="share of training examples per subset")
    parser.add_argument("--models", nargs="+", default=["logreg", "mlp", "cnn"], choices=sorted(MODELS))
    parser.add_argument("--solvers", nargs="+", default=SOLVERS)
    parser.add_argument("--queries", type=int, default=100, help="test digits used as queries")
    parser.add_argument("--projection-dims", nargs="*", type=int, default=[256, 1024],
                        help="projection sizes of the compressed index rows")
    parser.add_argument("--index-solver", default="ekfac", help="solver of the compressed index")
    parser.add_argument("--init", choices=["vary", "same"], default="vary",
                        help="retrain from a new init per subset (vary) or the full model's (same)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import importlib
    import logging
    import warnings

    importlib.import_module("pytorch_lightning")  # its loggers exist once imported

    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "pytorch_lightning.utilities.rank_zero",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = []
    for model_name in args.models:
        rows += run(model_name, args)
    print("\n| model | method | LDS | seconds |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['lds']:.3f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
