"""Cleaning in the loop: train with label noise, let ``InfluenceCallback`` name the suspects, fix them, retrain.

For each seed: flip 10% of the digits training labels (random other classes), train a LightningModule with an
``InfluenceCallback(self_influence=True)``, take the ``k`` top suspects from the callback's results
(``cb.results.top_self_influence(k)``, most negative self-influence first; ``k`` = the number of flips by
default), then retrain from scratch (same seed, same schedule) after

* dropping the suspects,
* relabelling the suspects with the trained model's prediction (no human in the loop),
* dropping ``k`` random training examples (the control),

and compare test accuracies (mean ± sd over the seeds). No ground truth is used for cleaning; it only
measures how many suspects were flipped labels.

    python examples/clean_in_loop.py               # about 30 s on 2 shared CPU cores
    python examples/clean_in_loop.py --quick       # seconds: a smoke test

Prints the table, writes ``clean_in_loop.png``, ``clean_in_loop.json`` and an offline W&B run.
"""

from __future__ import annotations

import sys
from typing import Dict, List, Optional

import torch

import _common as C

ARMS = ["no cleaning", "drop suspects", "relabel suspects", "drop random"]


def fit(args, train, test, seed: int, callbacks=()):
    module = C.lightning_classifier(args.model, lr=args.lr, weight_decay=args.weight_decay, seed=seed)
    C.lightning_fit(module, train, test, args.epochs, seed, callbacks=callbacks)
    return module


def one_seed(seed: int, args) -> Dict[str, float]:
    from lightning_influence import InfluenceCallback

    train, test = C.digits(torch.float32, image=args.model == "cnn", n_train=300 if args.quick else C.N_TRAIN,
                           n_test=100 if args.quick else None)
    y_true = train.tensors[1]
    y_noisy, flipped = C.flip_labels(y_true, args.noise, seed)
    noisy = C.with_labels(train, y_noisy)
    cb = InfluenceCallback(num_queries=1, solver=args.solver, self_influence=True, report=False,
                           save_results=False, on_error="raise")
    model = fit(args, noisy, test, seed, callbacks=[cb])
    k = args.k or len(flipped)
    suspects = cb.results.top_self_influence(k).indices
    model.eval()
    with torch.no_grad():
        predicted = model(train.tensors[0]).argmax(1)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[suspects] = False
    relabelled = y_noisy.clone()
    relabelled[suspects] = predicted[suspects]
    g = torch.Generator().manual_seed(10_000 + seed)
    random_keep = torch.ones(len(train), dtype=torch.bool)
    random_keep[torch.randperm(len(train), generator=g)[:k]] = False
    variants = {
        "drop suspects": C.with_labels(train, y_noisy, keep),
        "relabel suspects": C.with_labels(train, relabelled),
        "drop random": C.with_labels(train, y_noisy, random_keep),
    }
    out = {"seed": seed, "k": k, "flipped": len(flipped),
           "suspects_flipped": float(torch.isin(suspects, flipped).double().mean()),
           "relabelled_correctly": float((relabelled[suspects] == y_true[suspects]).double().mean()),
           "no cleaning": C.accuracy(model, test)}
    for arm, data in variants.items():
        out[arm] = C.accuracy(fit(args, data, test, seed).eval(), test)
    print(f"seed {seed}: {out['suspects_flipped']:.0%} of the {k} suspects were flipped; test accuracy "
          + ", ".join(f"{a} {out[a]:.3f}" for a in ARMS), flush=True)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = C.parser_for(__doc__, "clean_in_loop")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (seed, seed+1, ...)")
    parser.add_argument("--model", default="mlp", choices=sorted(C.MODELS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-3, help="Adam's coupled L2 (the damping's base)")
    parser.add_argument("--noise", type=float, default=0.1, help="fraction of training labels flipped")
    parser.add_argument("--k", type=int, default=None, help="suspects cleaned (default: the number of flips)")
    parser.add_argument("--solver", default="ekfac", choices=["lissa", "arnoldi", "ekfac", "kfac", "cg", "exact"],
                        help="ekfac: self-influence in the scoring pass, under a second")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 2, 3
    out = C.prepare_output(args)
    C.quiet_lightning()
    config = dict(vars(args))
    with C.Stopwatch() as t, C.wandb_run(args, "clean_in_loop", config) as run:
        per_seed = [one_seed(args.seed + i, args) for i in range(args.seeds)]
        header = ["cleaning", "test accuracy (mean ± sd)", "seeds"]
        rows = [[a, C.mean_sd([r[a] for r in per_seed]), len(per_seed)] for a in ARMS]
        C.log_table(run, "clean_in_loop/table", header, rows)
        C.log_table(run, "clean_in_loop/per_seed", ["seed", "suspects_flipped", *ARMS],
                    [[r["seed"], r["suspects_flipped"], *[r[a] for a in ARMS]] for r in per_seed])
        fig, (ax,) = C.figure(1, size=(6.0, 4.0))
        means = [float(torch.tensor([r[a] for r in per_seed]).mean()) for a in ARMS]
        sds = [float(torch.tensor([r[a] for r in per_seed]).std()) if len(per_seed) > 1 else 0.0 for a in ARMS]
        ax.bar(range(len(ARMS)), means, yerr=sds, capsize=4, color=["grey", "C0", "C2", "C1"])
        ax.set_xticks(range(len(ARMS)), ARMS)
        lo = min(m - s for m, s in zip(means, sds))
        ax.set(ylabel="test accuracy", ylim=(max(0.0, lo - 0.02), 1.0),
               title=f"{args.model}, {args.noise:.0%} flipped, k = {per_seed[0]['k']}, {len(per_seed)} seeds")
        C.save_figure(fig, out / "clean_in_loop.png", run, "clean_in_loop/accuracy")
    share = C.mean_sd([r["suspects_flipped"] for r in per_seed])
    print(f"\n{args.model}, {args.noise:.0%} of labels flipped, k = {per_seed[0]['k']} suspects by self-influence "
          f"({args.solver}); flipped among the suspects: {share}; {t.seconds:.0f} s\n")
    print(C.markdown_table(header, rows))
    C.save_json(out / "clean_in_loop.json", {"header": header, "rows": rows, "per_seed": per_seed, "args": config})
    print(f"\nclean_in_loop.png and clean_in_loop.json in {out}" + ("" if args.no_wandb else f"; W&B run (offline) in {args.wandb_dir}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
