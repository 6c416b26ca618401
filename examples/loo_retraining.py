"""Influence against leave-one-out retraining (Koh & Liang 2017, Fig. 2), for every solver.

For one test example (by default the one with the highest loss), each solver predicts how the test loss
changes when one training example is removed, ``−I_up,loss(z, z_test)/n = −score/n``. The script removes each
of the ``k`` training examples with the largest predicted change (by the first solver listed: the exact solve
for logistic regression, CG for the CNN; the same points for every solver), retrains, and compares predicted
with actual changes (Pearson and Spearman, torchmetrics).

* Logistic regression on digits (float64, L2 ``weight_decay`` = damping): retrained from θ̂ by L-BFGS to a
  gradient norm of 1e-12 (the exact leave-one-out optimum).
* A small ReLU CNN (1,626 parameters): trained by Adam then polished by L-BFGS (the exact solver is left
  out unless ``--cnn-exact``: forming its Hessian takes minutes); as in the paper, each retraining starts from θ̂ and runs a fixed number of full-batch steps
  (L-BFGS iterations here). The same steps without removing anything give the baseline the change is
  measured against, so optimisation drift cancels.

    python examples/loo_retraining.py                # about 4 minutes on 2 shared CPU cores
    python examples/loo_retraining.py --quick        # seconds: a smoke test
    python examples/loo_retraining.py --models logreg --solvers exact cg

Prints a markdown table (model, solver, Pearson, Spearman, seconds of the influence computation), writes
``loo_<model>.png`` (predicted vs actual, one panel per solver), ``loo.json`` and an offline W&B run.
"""

from __future__ import annotations

import copy
import sys
from typing import Dict, List, Optional

import torch

import _common as C

SOLVERS = ["exact", "cg", "lissa", "arnoldi", "ekfac", "kfac"]
HEADER = ["model", "solver", "Pearson", "Spearman", "seconds", "k", "damping"]


def query_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(C.example_losses(model, torch.utils.data.TensorDataset(x, y))[0])


class Retrainer:
    """Actual change of the query loss when training example ``i`` is removed, cached by ``i``.

    ``steps=None``: retrain to convergence (L-BFGS to ``tol``) and compare with θ̂. ``steps=T``: exactly ``T``
    full-batch L-BFGS iterations from θ̂, compared with the same ``T`` iterations on the full data."""

    def __init__(self, model, train, weight_decay: float, xq, yq, steps: Optional[int], tol: float = 1e-12) -> None:
        self.model, self.train, self.wd, self.xq, self.yq = model, train, weight_decay, xq, yq
        self.steps, self.tol = steps, tol
        self.cache: Dict[int, float] = {}
        self.base = query_loss(self._fit(None), xq, yq) if steps is not None else query_loss(model, xq, yq)

    def _fit(self, drop: Optional[int]) -> torch.nn.Module:
        m = copy.deepcopy(self.model)
        w = torch.ones(len(self.train), dtype=self.train.tensors[0].dtype)
        if drop is not None:
            w[drop] = 0.0  # (1/n) Σ_{j≠i} L_j: the same 1/n as the full risk, as −score/n assumes
        if self.steps is None:
            return C.fit_lbfgs(m, self.train, self.wd, max_iter=300, tol=self.tol, weights=w)
        return C.fit_lbfgs(m, self.train, self.wd, max_iter=self.steps, tol=0.0, weights=w)

    def change(self, i: int) -> float:
        if i not in self.cache:
            self.cache[i] = query_loss(self._fit(i), self.xq, self.yq) - self.base
        return self.cache[i]


def run_model(kind: str, args, run) -> List[list]:
    from lightning_influence import AutoDamping, compute_influence

    n_train = 200 if args.quick else C.N_TRAIN
    train, test = C.digits(torch.float64, image=kind == "cnn", n_train=n_train, n_test=100 if args.quick else None)
    wd = args.weight_decay[kind]
    with C.Stopwatch() as t_fit:
        model = C.train_model(kind, train, wd, args.seed, adam_epochs=3 if args.quick else args.cnn_epochs,
                              lbfgs_iter=30 if args.quick else 500, **({"width": args.cnn_width} if kind == "cnn" else {}))
    q = int(C.example_losses(model, test).argmax()) if args.query is None else args.query
    xq, yq = test.tensors[0][q : q + 1], test.tensors[1][q : q + 1]
    print(f"{kind}: {C.num_params(model)} parameters, trained in {t_fit.seconds:.1f} s, gradient norm "
          f"{C.grad_norm(model, train, wd):.1e}, test accuracy {C.accuracy(model, test):.3f}; query test[{q}] "
          f"(label {int(yq)}, predicted {int(model(xq).argmax())}, loss {query_loss(model, xq, yq):.3f})", flush=True)
    retrain = Retrainer(model, train, wd, xq, yq, None if kind == "logreg" else args.cnn_steps)
    # convex logistic regression: damping = weight decay. The CNN: the weight decay, raised by the HVP solvers'
    # automatic rule if the Hessian has a more negative eigenvalue; the first solver's value is kept for all.
    damping = wd if kind == "logreg" else AutoDamping(base=wd)
    solvers = [s for s in args.solvers if not (kind == "cnn" and s == "exact" and not args.cnn_exact)]
    rows, panels, top = [], [], None
    for solver in solvers:
        with C.Stopwatch() as t:
            res = compute_influence(model, train, test, query_indices=[q], solver=solver, damping=damping,
                                    dtype=torch.float64)
        damping = res.damping
        predicted = res.predicted_loss_change()[0]
        if top is None:  # the reference solver's top-k by |predicted change|, the same points for every solver
            top = torch.argsort(predicted.abs(), descending=True)[: args.k]
            actual = torch.tensor([retrain.change(i) for i in top.tolist()], dtype=torch.float64)
        pearson, spearman = C.correlations(predicted[top], actual)
        rows.append([kind, solver, pearson, spearman, round(t.seconds, 2), len(top), f"{res.damping:.3g}"])
        panels.append((solver, predicted[top], actual, pearson))
        print(f"  {solver:8} Pearson {pearson:.3f}  Spearman {spearman:.3f}  ({t.seconds:.1f} s)", flush=True)

    fig, axes = C.figure(len(panels), size=(3.4, 3.4))
    for ax, (solver, p, a, r) in zip(axes, panels):
        lim = float(torch.cat([p, a]).abs().max()) * 1.05
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
        ax.scatter(a.numpy(), p.numpy(), s=8)
        ax.set(title=f"{kind} / {solver}: r = {r:.3f}", xlabel="actual change in test loss",
               ylabel="predicted  −score/n", xlim=(-lim, lim), ylim=(-lim, lim))
    C.save_figure(fig, args.out_dir / f"loo_{kind}.png", run, f"loo/{kind}")
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = C.parser_for(__doc__, "loo_retraining")
    parser.add_argument("--models", nargs="+", default=["logreg", "cnn"], choices=["logreg", "cnn"])
    parser.add_argument("--solvers", nargs="+", default=SOLVERS, choices=SOLVERS)
    parser.add_argument("--k", type=int, default=100, help="training examples removed per solver (its top-k by |predicted change|)")
    parser.add_argument("--query", type=int, default=None, help="test example (default: the highest-loss one)")
    parser.add_argument("--wd-logreg", type=float, default=0.01, help="L2 weight decay of logistic regression (= damping)")
    parser.add_argument("--wd-cnn", type=float, default=0.01, help="L2 weight decay of the CNN")
    parser.add_argument("--cnn-width", type=int, default=4, help="channels of the CNN's first convolution")
    parser.add_argument("--cnn-epochs", type=int, default=30, help="Adam epochs before the CNN's L-BFGS polish")
    parser.add_argument("--cnn-steps", type=int, default=30, help="full-batch L-BFGS iterations per CNN retraining")
    parser.add_argument("--cnn-exact", action="store_true",
                        help="also run the exact solver on the CNN (minutes: its Hessian has P² entries)")
    args = parser.parse_args(argv)
    if args.quick:
        args.k, args.cnn_steps = min(args.k, 10), min(args.cnn_steps, 5)
        args.solvers = [s for s in args.solvers if s in ("exact", "cg", "ekfac")]
    args.out_dir = C.prepare_output(args)
    args.weight_decay = {"logreg": args.wd_logreg, "cnn": args.wd_cnn}

    config = {k: v for k, v in vars(args).items() if k not in ("out_dir", "weight_decay")}
    with C.wandb_run(args, "loo_retraining", config) as run:
        rows = [r for kind in args.models for r in run_model(kind, args, run)]
        C.log_table(run, "loo/table", HEADER, rows)
    print("\nPredicted (−score/n) against actual leave-one-out change of the test loss:\n")
    print(C.markdown_table(HEADER, rows))
    C.save_json(args.out_dir / "loo.json", {"header": HEADER, "rows": rows, "args": config})
    print(f"\nPNGs and loo.json in {args.out_dir}; W&B run (offline) in {args.wandb_dir}" if not args.no_wandb
          else f"\nPNGs and loo.json in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
