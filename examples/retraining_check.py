"""How well does influence predict the model retrained without a group of training examples?

Trains multinomial logistic regression with L2 on scikit-learn's digits (float64, L-BFGS to a gradient
tolerance of 1e-10), picks the validation example with the highest loss as the query, and removes its most
harmful and its most helpful training examples (by ``compute_influence`` scores; positive = harmful) in
groups of growing size. For each group it compares the predicted parameter change
``Δθ = (1/n)(H + λI)⁻¹ Σ_G ∇L`` (``lightning_influence.Counterfactual``) with actual retraining (warm-started
L-BFGS on ``(1/n) Σ_{i∉G} L_i + (λ/2)‖θ‖²``), and the predicted change of the query's and the validation
set's loss with the retrained model's.

    python examples/retraining_check.py             # about a minute on 2 CPU cores; W&B offline by default
    python examples/retraining_check.py --help

Prints a markdown table, writes a PNG of the curves and logs both to an offline W&B run. Nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

COLUMNS = ["group", "size", "cosine", "norm_ratio", "query_dloss_first_order", "query_dloss_predicted",
           "query_dloss_retrained", "val_dloss_predicted", "val_dloss_retrained", "val_dacc_predicted",
           "val_dacc_retrained"]
HEADERS = ["group", "k", "cos(Δθ̂, Δθ)", "‖Δθ̂‖/‖Δθ‖", "Δ query loss, −Σscore/n", "Δ query loss at θ̂+Δθ̂",
           "Δ query loss retrained", "Δ val loss predicted", "Δ val loss retrained", "Δ val acc predicted",
           "Δ val acc retrained"]


def load_digits_split(n_train: int) -> tuple:
    """Digits as 64 pixels in [0, 1] (float64): the first ``n_train`` for training, the rest for validation."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float64)
    y = torch.tensor(y, dtype=torch.long)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def fit(model: nn.Module, train: TensorDataset, weight_decay: float, drop: Sequence[int] = ()) -> nn.Module:
    """Minimise ``(1/n) Σ_{i∉drop} CE_i + (wd/2)‖θ‖²`` (``n`` the full training set's size: removal as
    upweighting by ``−1/n``) with full-batch L-BFGS, from the model's current parameters."""
    x, y = train.tensors
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[list(drop)] = False
    opt = torch.optim.LBFGS(model.parameters(), max_iter=1000, tolerance_grad=1e-10, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x[keep]), y[keep], reduction="sum") / len(x)
        loss = loss + 0.5 * weight_decay * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model


def evaluate(model: nn.Module, ds: TensorDataset) -> tuple:
    """Mean cross-entropy (nats) and accuracy (fraction)."""
    x, y = ds.tensors
    with torch.no_grad():
        out = model(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def markdown(rows: List[Dict[str, object]]) -> str:
    def cell(v: object, column: str) -> str:
        if column == "cosine":
            return f"{v:.5f}"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cell(r[c], c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: List[Dict[str, object]], path: Path) -> None:
    """Two panels against the group size: cosine of predicted and actual Δθ with the norm ratio, and the
    query loss change (retrained, predicted at θ̂+Δθ̂, first order). matplotlib, or a plainer pillow chart."""
    groups = ["harmful", "helpful"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pillow(rows, path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for g, colour in zip(groups, ["tab:red", "tab:blue"]):
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_pillow(rows: List[Dict[str, object]], path: Path) -> None:
    """Cosine against log group size, one polyline per direction (no matplotlib)."""
    import math

    from PIL import Image, ImageDraw

    w, h, m = 640, 360, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    ks = sorted({int(r["size"]) for r in rows})
    lo = min(float(r["cosine"]) for r in rows) - 0.005
    span = max(math.log(ks[-1]) - math.log(ks[0]), 1e-9)

    def xy(k: int, c: float) -> tuple:
        return (m + (w - 2 * m) * (math.log(k) - math.log(ks[0])) / span, h - m - (h - 2 * m) * (c - lo) / (1 - lo))

    d.rectangle([m, m, w - m, h - m], outline="black")
    d.text((m, 15), f"cosine(predicted, retrained parameter change) vs k (log); y from {lo:.3f} to 1", fill="black")
    for g, colour in (("harmful", "red"), ("helpful", "blue")):
        pts = [xy(int(r["size"]), float(r["cosine"])) for r in rows if r["group"] == g]
        d.line(pts, fill=colour, width=2)
        d.text((pts[-1][0] - 60, pts[-1][1] + 5), g, fill=colour)
    img.save(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 5, 10, 20, 50], help="group sizes k")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="L2 coefficient λ (also the damping)")
    parser.add_argument("--n-train", type=int, default=1347, help="training examples (the rest validate)")
    parser.add_argument("--solver", default="exact", choices=["exact", "cg", "lissa", "arnoldi", "ekfac", "kfac"],
                        help="inverse-HVP solver for the scores and the counterfactuals")
    parser.add_argument("--query", type=int, default=None,
                        help="validation index of the query (default: the highest-loss validation example)")
    parser.add_argument("--out", default="out/retraining_check", help="folder for the PNG and the table")
    parser.add_argument("--wandb-dir", default=None, help="W&B run folder (default: <out>)")
    parser.add_argument("--no-wandb", action="store_true", help="skip W&B logging")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from lightning_influence import Counterfactual, compute_influence

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    t_start = t0 = time.perf_counter()
    train, val = load_digits_split(args.n_train)
    model = fit(nn.Linear(64, 10).double(), train, args.weight_decay)
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
            retrained = fit(copy.deepcopy(model), train, args.weight_decay, drop)
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

    table = markdown(rows)
    print()
    print(f"Removing the query's most harmful / helpful training examples (n = {n}, λ = {args.weight_decay:g}, "
          f"solver {args.solver}; Δ = after − before, losses in nats, accuracy as a fraction):\n")
    print(table)
    (out / "retraining_check.md").write_text(table + "\n")
    png = out / "retraining_check.png"
    plot(rows, png)
    print(f"\nplot: {png}; {time.perf_counter() - t_start:.0f} s in all")

    if not args.no_wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
        import wandb

        run = wandb.init(project="lightning-influence", job_type="retraining_check", dir=args.wandb_dir or str(out),
                         config={**vars(args), "query": q, "num_train": n, **res.settings})
        run.log({"retraining_check/table": wandb.Table(columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in rows]),
                 "retraining_check/plot": wandb.Image(str(png))})
        for r in rows:
            run.summary[f"retraining_check/cosine_{r['group']}_{r['size']}"] = r["cosine"]
        run.finish()
        print(f"W&B run: {run.dir} ({os.environ['WANDB_MODE']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
