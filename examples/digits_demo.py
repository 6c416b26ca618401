"""Main demo: train a small network on scikit-learn's digits with a few labels flipped, and let
``InfluenceCallback`` explain the misclassified validation digits and find the flipped labels.

    python examples/digits_demo.py                 # W&B offline by default; about 25 s on 2 CPU cores
    python examples/digits_demo.py --help

Writes an offline W&B run (tables, images, histograms, an artifact) and a self-contained HTML report,
and prints where both are. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SHADES = " .:-=+*#%@"


def load_digits_split(noise: float, seed: int):
    """Digits as ``[1, 8, 8]`` images in [0, 1]: 1,347 training and 450 validation examples; a fraction
    ``noise`` of the training labels is replaced by a different random class. Returns the datasets and
    the indices of the flipped training examples."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    x = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)[perm]
    y = torch.tensor(y, dtype=torch.long)[perm]
    n_train = 1347
    y_train = y[:n_train].clone()
    flipped = torch.randperm(n_train, generator=g)[: int(round(noise * n_train))]
    y_train[flipped] = (y_train[flipped] + torch.randint(1, 10, (len(flipped),), generator=g)) % 10
    return TensorDataset(x[:n_train], y_train), TensorDataset(x[n_train:], y[n_train:]), flipped


def make_module(lr: float, weight_decay: float):
    import pytorch_lightning as pl

    class DigitsClassifier(pl.LightningModule):
        """A small MLP; Adam with coupled L2 weight decay (so the callback's damping is that decay)."""

        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"lr": lr, "weight_decay": weight_decay})
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train/loss", loss, on_epoch=True, on_step=False)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val/loss", F.cross_entropy(logits, y))
            self.log("val/acc", (logits.argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)

    return DigitsClassifier()


def ascii_digit(x: torch.Tensor) -> List[str]:
    img = x.reshape(8, 8).clamp(0, 1)
    return ["".join(SHADES[int(v * (len(SHADES) - 1))] * 2 for v in row) for row in img]


def score_text(score: float) -> str:
    """A score as printed: four significant digits, sign always shown (``-254.3``, ``+0.01234``)."""
    return f"score {score:+.4g}"


def side_by_side(blocks: List[List[str]], titles: List[List[str]]) -> str:
    """Blocks of text side by side, each under its title lines; every column is as wide as its longest line
    plus a gap of two spaces, so nothing is cut and columns never touch."""
    widths = [max(len(line) for line in block + title) + 2 for block, title in zip(blocks, titles)]
    heads = max(len(t) for t in titles)
    rows = [[(t[r] if r < len(t) else "") for t in titles] for r in range(heads)]
    rows += [[b[r] if r < len(b) else "" for b in blocks] for r in range(max(len(b) for b in blocks))]
    return "\n".join("".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/digits_demo", help="output folder (logs, W&B run, report)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--noise", type=float, default=0.03, help="fraction of training labels flipped")
    parser.add_argument("--queries", type=int, default=8, help="validation examples to explain")
    parser.add_argument("--solver", default="auto", choices=["auto", "lissa", "arnoldi", "ekfac", "kfac", "cg", "exact"],
                        help="the library's default (\"auto\": picks the solver from the problem) unless you want to compare")
    parser.add_argument("--damping", type=float, default=None,
                        help="fixed λ (default 'auto': the optimizer's weight decay, raised if the Hessian needs it)")
    parser.add_argument("--no-wandb", action="store_true", help="log to CSV only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")  # never needs a network or an account
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DIR", str(out))

    import pytorch_lightning as pl

    from lightning_influence import InfluenceCallback

    pl.seed_everything(args.seed, verbose=False)
    train, val, flipped = load_digits_split(args.noise, args.seed)
    if args.no_wandb:
        logger = pl.loggers.CSVLogger(str(out), name="csv")
    else:
        logger = pl.loggers.WandbLogger(project="lightning-influence-demo", save_dir=str(out), offline=True)
    influence = InfluenceCallback(num_queries=args.queries, solver=args.solver, self_influence=True, top_k=8,
                                  damping="auto" if args.damping is None else args.damping)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="auto", devices=1, logger=logger, callbacks=[influence],
        default_root_dir=str(out), enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=10,
    )
    model = make_module(lr=3e-3, weight_decay=1e-2)
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256))

    res = influence.results
    if res is None:
        print(f"influence failed: {influence.error}", file=sys.stderr)
        return 1
    print(f"\n{res}\n")
    print("Scores are I_up,loss (Koh & Liang): negative = helpful (removing it would raise the query loss), "
          "positive = harmful (removing it would lower the query loss).\n")
    y_train = train.tensors[1]
    shown = 0
    for q in range(res.num_queries):
        qi = int(res.query_indices[q])
        label = int(val.tensors[1][qi])
        pred = int(res.query_predictions[q]) if res.query_predictions is not None else -1
        if pred == label and shown >= 1:
            continue
        helpful, harmful = res.top_helpful(q, 3), res.top_harmful(q, 3)
        print(f"query val[{qi}]: label {label}, predicted {pred}, loss {float(res.query_losses[q]):.3f}")
        blocks = [ascii_digit(val.tensors[0][qi])]
        titles = [[f"query val[{qi}]", f"y={label} p={pred}"]]
        for kind, ranked in (("helpful", helpful), ("harmful", harmful)):
            for i, s in zip(ranked.indices.tolist(), ranked.scores.tolist()):
                blocks.append(ascii_digit(train.tensors[0][i]))
                titles.append([f"{kind} #{i} y={int(y_train[i])}", score_text(s)])
        print(side_by_side(blocks, titles) + "\n")
        shown += 1
        if shown == 3:
            break

    if res.self_influence is not None and len(flipped):
        k = 2 * len(flipped)
        suspects = res.top_self_influence(k).indices
        found = len(set(suspects.tolist()) & set(flipped.tolist()))
        print(f"Likely mislabelled: {found} of the {len(flipped)} flipped labels are among the {k} training "
              f"examples with the most negative self-influence (chance: {len(flipped) * k / len(train):.1f}).")

    print(f"\nresults file : {influence.results_path}")
    for key, value in influence.outputs.items():
        if isinstance(value, (str, os.PathLike)):
            print(f"{key:13}: {value}")
    if not args.no_wandb:
        print(f"W&B run      : {logger.experiment.dir} (offline; `wandb sync` it to view online)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
