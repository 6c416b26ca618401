"""Explaining a CNN's mistakes with the callback's report, as a user would see it.

A small CNN (a LightningModule) is trained on scikit-learn's digits by a ``Trainer`` with a ``WandbLogger``
(offline) and an ``InfluenceCallback``. When training ends, the validation examples the CNN gets wrong become
the callback's queries (``query_indices=``, set by a two-line callback listed before it), and the callback
writes its HTML report and its W&B tables for them.

The script prints where the report and the run are, and, for three mistakes, the query next to its most
harmful training examples (positive scores: removing them would lower the query's loss) and its most helpful
ones, with their labels; then, over all mistakes, how often the top harmful examples carry the *predicted*
label and the top helpful ones the *true* label.

    python examples/explain_mistakes.py             # about 30 s on 2 shared CPU cores
    python examples/explain_mistakes.py --quick     # seconds: a smoke test
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import torch

import _common as C


def mistakes_as_queries(influence, val):
    """A callback that, at the end of training and before ``influence`` runs (list it first), makes the
    misclassified validation examples the queries."""
    import pytorch_lightning as pl

    class MistakesAsQueries(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            with torch.no_grad():
                was = pl_module.training
                pl_module.eval()
                pred = pl_module(val.tensors[0].to(pl_module.device)).argmax(1).cpu()
                pl_module.train(was)
            wrong = (pred != val.tensors[1]).nonzero().flatten().tolist()
            influence.query_indices = wrong or [0]

    return MistakesAsQueries()


def main(argv: Optional[List[str]] = None) -> int:
    parser = C.parser_for(__doc__, "explain_mistakes")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--solver", default=None, choices=["lissa", "arnoldi", "ekfac", "kfac", "cg", "exact"],
                        help="default: lissa, the library's default (ekfac with --quick)")
    parser.add_argument("--weight-decay", type=float, default=1e-3, help="Adam's coupled L2 (the damping's base)")
    parser.add_argument("--top", type=int, default=5, help="harmful/helpful examples per mistake")
    parser.add_argument("--show", type=int, default=3, help="mistakes printed")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 2
    args.solver = args.solver or ("ekfac" if args.quick else "lissa")
    out = C.prepare_output(args)
    C.quiet_lightning()
    import pytorch_lightning as pl

    from lightning_influence import InfluenceCallback

    train, val = C.digits(torch.float32, image=True, n_train=300 if args.quick else C.N_TRAIN,
                          n_test=100 if args.quick else None)
    logger = False if args.no_wandb else pl.loggers.WandbLogger(project="lightning-influence-examples",
                                                                name="explain_mistakes", save_dir=args.wandb_dir,
                                                                offline=True)
    influence = InfluenceCallback(solver=args.solver, top_k=args.top, damping="auto")
    module = C.lightning_classifier("cnn", weight_decay=args.weight_decay, seed=args.seed)
    with C.Stopwatch() as t:
        C.lightning_fit(module, train, val, args.epochs, args.seed, logger=logger, root=out,
                        callbacks=[mistakes_as_queries(influence, val), influence])
    res = influence.results
    if res is None:
        print(f"influence failed: {influence.error}", file=sys.stderr)
        return 1
    print(f"\n{res}  (fit + influence: {t.seconds:.1f} s)")
    print(f"{res.num_queries} misclassified validation examples of {len(val)} explained; damping {res.damping:.3g} "
          f"({res.settings.get('damping_source', '')})\n")
    print("Scores are I_up,loss (Koh & Liang): positive = harmful (removing it would lower the query's loss), "
          "negative = helpful.\n")
    y_train = train.tensors[1]
    preds = res.query_predictions
    harmful_pred = helpful_true = harmful_n = helpful_n = 0
    for row in range(res.num_queries):
        qi = int(res.query_indices[row])
        label, pred = int(val.tensors[1][qi]), int(preds[row])
        harmful, helpful = res.top_harmful(row, args.top), res.top_helpful(row, args.top)
        harmful_pred += int((y_train[harmful.indices] == pred).sum())
        helpful_true += int((y_train[helpful.indices] == label).sum())
        harmful_n, helpful_n = harmful_n + len(harmful.indices), helpful_n + len(helpful.indices)
        if row >= args.show:
            continue
        blocks, titles = [C.ascii_digit(val.tensors[0][qi])], [[f"query val[{qi}]", f"true {label} pred {pred}"]]
        for kind, ranked in (("harmful", harmful), ("helpful", helpful)):
            for i, s in zip(ranked.indices[:3].tolist(), ranked.scores[:3].tolist()):
                blocks.append(C.ascii_digit(train.tensors[0][i]))
                titles.append([f"{kind} #{i} y={int(y_train[i])}", f"score {s:+.3g}"])
        print(C.side_by_side(blocks, titles))
        print(f"  top {args.top} harmful: " + ", ".join(f"#{i} (y={int(y_train[i])}, {s:+.3g})" for i, s in
                                                 zip(harmful.indices.tolist(), harmful.scores.tolist())))
        print(f"  top {args.top} helpful: " + ", ".join(f"#{i} (y={int(y_train[i])}, {s:+.3g})" for i, s in
                                                 zip(helpful.indices.tolist(), helpful.scores.tolist())) + "\n")
    share_harmful = harmful_pred / max(harmful_n, 1)
    share_helpful = helpful_true / max(helpful_n, 1)
    counts = torch.bincount(y_train, minlength=10).double() / len(y_train)
    print(f"Over all {res.num_queries} mistakes: {share_harmful:.0%} of the top-{args.top} harmful examples carry the "
          f"predicted label and {share_helpful:.0%} of the top-{args.top} helpful ones the true label (a class holds "
          f"{float(counts.mean()):.0%} of the training set).")
    summary = {"mistakes": res.num_queries, "val": len(val), "harmful_with_predicted_label": share_harmful,
               "helpful_with_true_label": share_helpful, "seconds": t.seconds, "solver": args.solver,
               "report": str(influence.outputs.get("html_path", "")), "results": str(influence.results_path)}
    C.save_json(out / "explain_mistakes.json", summary)
    print(f"\nresults file : {influence.results_path}")
    for key, value in influence.outputs.items():
        if isinstance(value, (str, os.PathLike)):
            print(f"{key:13}: {value}")
    if logger:
        print(f"W&B run      : {logger.experiment.dir} (offline; `wandb sync` it to view online)")
        import wandb

        wandb.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
