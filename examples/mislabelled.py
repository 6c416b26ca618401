"""Finding mislabelled training examples (Koh & Liang 2017, Sec. 5.4).

Flip 10% of the training labels (fixed seed), train, then check training examples in the order of three
rankings: most negative self-influence ``I_up,loss(z, z)`` first, highest training loss first, and random.
For each fraction of the training set checked (5–30%) the script reports the fraction of the flipped labels
found, and the test accuracy after fixing the labels found among the checked examples and retraining
(warm-started, full-batch L-BFGS to convergence).

Settings (``--settings``, ``model:flips``):

* ``logreg:random``: logistic regression, each flip to a random other class (the easy case: training loss
  already finds most flips).
* ``logreg:second`` / ``mlp:second``: flips to the clean model's most likely *wrong* class for that example
  (its second choice where it is right): plausible mistakes that the model can fit, where training loss
  finds fewer.

    python examples/mislabelled.py                      # about 80 s on 2 shared CPU cores
    python examples/mislabelled.py --quick              # seconds: a smoke test
    python examples/mislabelled.py --settings mlp:random --solver ekfac

Prints one table of fraction found and one of test accuracy (method × fraction checked) per setting; writes
``mislabelled.png`` (the curves), ``mislabelled.json`` and an offline W&B run.
"""

from __future__ import annotations

import copy
import sys
from typing import Dict, List, Optional

import torch

import _common as C

METHODS = ["self-influence", "training loss", "random"]
SOLVERS = ["exact", "cg", "lissa", "arnoldi", "ekfac", "kfac"]


def rankings(model, train, args) -> Dict[str, torch.Tensor]:
    """Training indices in the order each method checks them."""
    from lightning_influence import compute_influence

    res = compute_influence(model, train, num_queries=1, solver=args.solver, damping=args.weight_decay,
                            self_influence=True, dtype=torch.float64)
    g = torch.Generator().manual_seed(args.seed + 1)
    return {
        "self-influence": torch.argsort(res.self_influence, stable=True),  # most negative first
        "training loss": torch.argsort(C.example_losses(model, train), descending=True, stable=True),
        "random": torch.randperm(len(train), generator=g),
    }


def run_setting(setting: str, args) -> dict:
    kind, flips = setting.split(":")
    train, test = C.digits(torch.float64, image=kind == "cnn", n_train=400 if args.quick else C.N_TRAIN,
                           n_test=100 if args.quick else None)
    iters = 50 if args.quick else 1000
    clean = C.train_model(kind, train, args.weight_decay, args.seed, adam_epochs=5 if args.quick else 60, lbfgs_iter=iters)
    second = None
    if flips == "second":
        with torch.no_grad():  # the clean model's most likely class other than the true one
            logits = clean(train.tensors[0])
            logits[torch.arange(len(logits)), train.tensors[1]] = -float("inf")
            second = logits.argmax(1)
    y_true = train.tensors[1]
    y_noisy, flipped = C.flip_labels(y_true, args.noise, args.seed, second_choice=second)
    noisy_train = C.with_labels(train, y_noisy)
    model = C.train_model(kind, noisy_train, args.weight_decay, args.seed, adam_epochs=5 if args.quick else 60,
                          lbfgs_iter=iters)
    acc_noisy = C.accuracy(model, test)
    with C.Stopwatch() as t:
        orders = rankings(model, noisy_train, args)
    is_flipped = torch.zeros(len(train), dtype=torch.bool)
    is_flipped[flipped] = True
    n = len(train)
    found: Dict[str, List[float]] = {}
    acc: Dict[str, List[float]] = {}
    for method, order in orders.items():
        found[method], acc[method] = [], []
        for frac in args.fractions:
            checked = order[: int(round(frac * n))]
            found[method].append(float(is_flipped[checked].sum()) / len(flipped))
            y_fixed = y_noisy.clone()
            y_fixed[checked] = y_true[checked]  # a reviewer corrects the wrong labels among those checked
            fixed = C.fit_lbfgs(copy.deepcopy(model), C.with_labels(train, y_fixed), args.weight_decay, max_iter=iters)
            acc[method].append(C.accuracy(fixed, test))
    out = {"setting": setting, "flipped": len(flipped), "n_train": n, "test_accuracy_clean": C.accuracy(clean, test),
           "test_accuracy_noisy": acc_noisy, "ranking_seconds": t.seconds, "found": found, "accuracy": acc}
    print(f"{setting}: {len(flipped)} of {n} labels flipped; test accuracy clean {out['test_accuracy_clean']:.3f}, "
          f"with flips {acc_noisy:.3f}; self-influence ({args.solver}) in {t.seconds:.1f} s", flush=True)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = C.parser_for(__doc__, "mislabelled")
    parser.add_argument("--settings", nargs="+", default=["logreg:random", "logreg:second", "mlp:second"],
                        help="model:flips with model in logreg, mlp, cnn and flips in random, second")
    parser.add_argument("--noise", type=float, default=0.1, help="fraction of training labels flipped")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.25, 0.3],
                        help="fractions of the training set checked")
    parser.add_argument("--solver", default="exact", choices=SOLVERS, help="solver of the self-influence")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="L2 weight decay (= damping)")
    args = parser.parse_args(argv)
    for s in args.settings:
        kind, _, flips = s.partition(":")
        if kind not in C.MODELS or flips not in ("random", "second"):
            parser.error(f"--settings {s!r}: expected model:flips, model in {sorted(C.MODELS)}, flips random or second")
    if args.quick:
        args.settings = args.settings[:1]
    out = C.prepare_output(args)
    config = {k: v for k, v in vars(args).items()}
    pct = [f"{f:.0%}" for f in args.fractions]
    with C.wandb_run(args, "mislabelled", config) as run:
        results = [run_setting(s, args) for s in args.settings]
        fig, axes = C.figure(len(results), size=(4.2, 3.6), nrows=2)
        for ax, acc_ax, r in zip(axes, axes[len(results):], results):
            for m in METHODS:
                ax.plot(args.fractions, r["found"][m], marker="o", label=m)
                acc_ax.plot(args.fractions, r["accuracy"][m], marker="o", label=m)
            ax.set(title=r["setting"], xlabel="fraction of training data checked", ylabel="fraction of flips found",
                   ylim=(0, 1.02))
            acc_ax.axhline(r["test_accuracy_clean"], color="grey", ls="--", lw=0.8, label="no flips")
            acc_ax.axhline(r["test_accuracy_noisy"], color="grey", ls=":", lw=0.8, label="all flips kept")
            acc_ax.set(xlabel="fraction of training data checked", ylabel="test accuracy after fixing")
            ax.legend()
            acc_ax.legend(fontsize="small")
        C.save_figure(fig, out / "mislabelled.png", run, "mislabelled/curves")
        for r in results:
            rows = [[m, *r["found"][m]] for m in METHODS]
            C.log_table(run, f"mislabelled/{r['setting']}/found", ["method", *pct], rows)
            rows = [[m, *r["accuracy"][m]] for m in METHODS]
            C.log_table(run, f"mislabelled/{r['setting']}/accuracy", ["method", *pct], rows)
    for r in results:
        print(f"\n{r['setting']}: fraction of the {r['flipped']} flipped labels found, by fraction of training data checked\n")
        print(C.markdown_table(["method", *pct], [[m, *r["found"][m]] for m in METHODS]))
        print(f"\n{r['setting']}: test accuracy after fixing the checked labels and retraining (with all flips: "
              f"{r['test_accuracy_noisy']:.3f}, no flips: {r['test_accuracy_clean']:.3f})\n")
        print(C.markdown_table(["method", *pct], [[m, *r["accuracy"][m]] for m in METHODS]))
    C.save_json(out / "mislabelled.json", {"fractions": args.fractions, "methods": METHODS, "results": results,
                                           "args": config})
    print(f"\nmislabelled.png and mislabelled.json in {out}" + ("" if args.no_wandb else f"; W&B run (offline) in {args.wandb_dir}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
