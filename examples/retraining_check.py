"""How well does influence predict the model retrained without a group of training examples?

Trains multinomial logistic regression with L2 on scikit-learn's digits (float64, L-BFGS to a gradient
tolerance of 1e-10), picks the validation example with the highest loss as the query, and removes its most
harmful and its most helpful training examples (by ``compute_influence`` scores; positive = harmful) in
groups of growing size. For each group it compares the predicted parameter change
``Δθ = (1/n)(H + λI)⁻¹ Σ_G ∇L`` (``lightning_influence.Counterfactual``) with actual retraining (warm-started
L-BFGS on ``(1/n) Σ_{i∉G} L_i + (λ/2)‖θ‖²``), and the predicted change of the query's and the validation
set's loss with the retrained model's.

    python examples/retraining_check.py             # about a minute on 2 CPU cores; W&B offline by default
    python examples/retraining_check.py --quick     # seconds: a smoke test

Prints a markdown table, writes it (``.md``, ``.json``) and a PNG of the curves under ``--out`` and logs both
to an offline W&B run. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import time
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import _common as C

COLUMNS = ["group", "size", "cosine", "norm_ratio", "query_dloss_first_order", "query_dloss_predicted",
           "query_dloss_retrained", "val_dloss_predicted", "val_dloss_retrained", "val_dacc_predicted",
           "val_dacc_retrained"]
HEADERS = ["group", "k", "cos(Δθ̂, Δθ)", "‖Δθ̂‖/‖Δθ‖", "Δ query loss, −Σscore/n", "Δ query loss at θ̂+Δθ̂",
           "Δ query loss retrained", "Δ val loss predicted", "Δ val loss retrained", "Δ val acc predicted",
           "Δ val acc retrained"]


def retrained_without(model: nn.Module, train: TensorDataset, weight_decay: float, drop: Sequence[int]) -> nn.Module:
    """A copy of ``model`` minimising ``(1/n) Σ_{i∉drop} CE_i + (wd/2)‖θ‖²`` (``n`` the full training set's
    size: removal as upweighting by ``−1/n``), by full-batch L-BFGS warm-started at the trained weights."""
    keep = torch.ones(len(train), dtype=torch.float64)
    keep[list(drop)] = 0.0
    return C.fit_lbfgs(copy.deepcopy(model), train, weight_decay, max_iter=1000, tol=1e-10, weights=keep)


def evaluate(model: nn.Module, ds: TensorDataset) -> tuple:
    """Mean cross-entropy (nats) and accuracy (fraction)."""
    x, y = ds.tensors
    with torch.no_grad():
        out = model(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def cell(v: object, column: str) -> object:
    """Cosines to 5 decimals, small changes in 3 significant digits."""
    if column == "cosine":
        return f"{v:.5f}"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3g}"
    return v


def plot(rows: List[Dict[str, object]]):
    """Two panels against the group size: cosine of predicted and actual Δθ with the norm ratio, and the
    query loss change (retrained, predicted at θ̂+Δθ̂, first order)."""
    fig, axes = C.figure(ncols=2, size=(5.5, 4.0))
    for g, colour in (("harmful", "tab:red"), ("helpful", "tab:blue")):
        rs = [r for r in rows if r["group"] == g]
        k = [r["size"] for r in rs]
        axes[0].plot(k, [r["cosine"] for r in rs], "o-", color=colour, label=f"cosine, most {g}")
        axes[0].plot(k, [r["norm_ratio"] for r in rs], "s--", color=colour, alpha=0.6, label=f"‖pred‖/‖actual‖, most {g}")
        axes[1].plot(k, [r["query_dloss_retrained"] for r in rs], "o-", color=colour, label=f"retrained, most {g}")
        axes[1].plot(k, [r["query_dloss_predicted"] for r in rs], "s--", color=colour, alpha=0.7,
                     label=f"at θ̂+Δθ̂, most {g}")
        axes[1].plot(k, [r["query_dloss_first_order"] for r in rs], "^:", color=colour, alpha=0.7,
                     label=f"first order, most {g}")
    axes[0].set(xscale="log", xlabel="examples removed (k)", ylabel="cosine / norm ratio",
                title="predicted Δθ̂ vs retrained Δθ")
    axes[1].set(xscale="log", xlabel="examples removed (k)", ylabel="Δ query loss (nats)",
                title="query loss change (removing harmful lowers it)")
    axes[1].axhline(0, color="grey", lw=0.5)
    ks = sorted({int(r["size"]) for r in rows})
    for ax in axes:
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    parser = C.parser_for(__doc__, "retraining_check")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 5, 10, 20, 50], help="group sizes k")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="L2 coefficient λ (also the damping)")
    parser.add_argument("--solver", default="exact", choices=["exact", "cg", "lissa", "arnoldi", "ekfac", "kfac"],
                        help="inverse-HVP solver for the scores and the counterfactuals")
    parser.add_argument("--query", type=int, default=None,
                        help="validation index of the query (default: the highest-loss validation example)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = [1, 5]
    out = C.prepare_output(args)

    from lightning_influence import Counterfactual, compute_influence

    torch.manual_seed(args.seed)
    t_start = t0 = time.perf_counter()
    train, val = C.digits(torch.float64, n_train=300 if args.quick else C.N_TRAIN)
    model = C.fit_lbfgs(C.logistic_regression().double(), train, args.weight_decay, max_iter=1000, tol=1e-10)
    n = len(train)
    print(f"trained logistic regression on {n} digits in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    query = None if args.query is None else [args.query]
    res = compute_influence(model, train, val, query_indices=query, num_queries=1, solver=args.solver,
                            damping=args.weight_decay, dtype=torch.float64)
    q = int(res.query_indices[0])
    cf = Counterfactual(model, train, solver=args.solver, damping=args.weight_decay, dtype=torch.float64)
    print(f"query: validation example {q} (loss {float(res.query_losses[0]):.3f}); scores and counterfactual "
          f"solver fitted in {time.perf_counter() - t0:.1f} s")
    query_ds = TensorDataset(val.tensors[0][q : q + 1], val.tensors[1][q : q + 1])
    base_query, _ = evaluate(model, query_ds)
    base_val, base_acc = evaluate(model, val)
    theta = flat(model)

    rows: List[Dict[str, object]] = []
    for group in ("harmful", "helpful"):
        ranked = res.top_harmful(0, k=max(args.sizes)) if group == "harmful" else res.top_helpful(0, k=max(args.sizes))
        for k in args.sizes:
            drop = ranked.indices[:k].tolist()
            predicted = cf.flatten(cf.parameter_change(drop))
            retrained = retrained_without(model, train, args.weight_decay, drop)
            actual = flat(retrained) - theta
            after_query, _ = evaluate(cf.model_without(drop), query_ds)
            metrics = cf.predicted_metrics(drop, val)
            val_loss, val_acc = evaluate(retrained, val)
            rows.append({
                "group": group, "size": k,
                "cosine": float(F.cosine_similarity(predicted, actual, dim=0)),
                "norm_ratio": float(predicted.norm() / actual.norm()),
                "query_dloss_first_order": float(-ranked.scores[:k].sum() / n),
                "query_dloss_predicted": after_query - base_query,
                "query_dloss_retrained": evaluate(retrained, query_ds)[0] - base_query,
                "val_dloss_predicted": metrics.loss_change,
                "val_dloss_retrained": val_loss - base_val,
                "val_dacc_predicted": metrics.accuracy_change,
                "val_dacc_retrained": val_acc - base_acc,
            })
            print(f"  most {group:7s} k={k:3d}: cosine {rows[-1]['cosine']:.4f}")

    table = C.markdown_table(HEADERS, [[cell(r[c], c) for c in COLUMNS] for r in rows])
    print()
    print(f"Removing the query's most harmful / helpful training examples (n = {n}, λ = {args.weight_decay:g}, "
          f"solver {args.solver}; Δ = after − before, losses in nats, accuracy as a fraction):\n")
    print(table)
    (out / "retraining_check.md").write_text(table + "\n")
    C.save_json(out / "retraining_check.json", rows)
    with C.wandb_run(args, "retraining_check", {**vars(args), "query": q, "num_train": n, **res.settings}) as run:
        png = C.save_figure(plot(rows), out / "retraining_check.png", run, "retraining_check/plot")
        C.log_table(run, "retraining_check/table", COLUMNS, [[r[c] for c in COLUMNS] for r in rows])
        if run is not None:
            for r in rows:
                run.summary[f"retraining_check/cosine_{r['group']}_{r['size']}"] = r["cosine"]
    print(f"\nplot: {png}; {time.perf_counter() - t_start:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
