"""The default callback's whole influence phase next to the training run it follows, on models above 100k
parameters.

    python benchmarks/bench_phase.py                                    # the three models, default callback
    python benchmarks/bench_phase.py --models resnet --epochs 3
    python benchmarks/bench_phase.py --models transformer --time-budget none   # CG whatever it costs (hours)

Each model is trained by ``Trainer.fit`` (Adam with coupled L2 ``weight_decay`` 1e-3, batch 32, no logger,
no checkpoints, one torch thread unless ``--threads``) with ``InfluenceCallback(num_queries=16)`` and
nothing else set: ``solver="auto"``, ``damping="auto"`` and ``time_budget="training"``. A callback listed
before it records when training ends, so the fit splits into **training** (fit start to the end of the
last epoch) and the **influence phase** (the end-of-training run: checks, solver, scores, results file,
HTML report). Printed per model: parameters, examples, the two times and their ratio, the solver the
automatic choice took and its reason (with the cost it estimated for the Hessian solvers), and the phases
of the influence run (``results.timings``).

Models (data generated or shipped with scikit-learn: nothing downloaded):

* ``transformer``: the issue-size transformer classifier of ``bench_transformers.py`` (2 encoder layers,
  d_model 80, 108,883 parameters) on 4,000 token sequences, 5 epochs;
* ``lm``: its causal language model (213,280 parameters) on 2,000 Markov sequences, 5 epochs, the summed
  token loss (``loss_fn``);
* ``resnet``: a ResNet-style block with BatchNorm (``tests/zoo.py``'s ``ResBlockNet``, 128 channels,
  301,962 parameters) on 5,000 augmented 8×8 digits, 5 epochs.

A timing, not a test: times compare within one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import pytorch_lightning as pl  # noqa: E402

from lightning_influence import InfluenceCallback  # noqa: E402

WEIGHT_DECAY = 1e-3


class Lit(pl.LightningModule):
    """A model and its per-example loss, trained with Adam (coupled L2: the callback's damping reads it)."""

    def __init__(self, net: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 lr: float = 3e-3) -> None:
        super().__init__()
        self.net, self.loss, self.lr = net, loss, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss(self.net(x), y).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss(self.net(x), y).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=WEIGHT_DECAY)


class TrainEnd(pl.Callback):
    """Records the fit's start and the end of training (listed before InfluenceCallback)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_end = time.perf_counter()


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def build(name: str) -> Dict[str, Any]:
    """Model, data, loss (``None``: the callback's default cross-entropy) and a description."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name in ("transformer", "lm"):
        import bench_transformers as bt

        key = "classifier" if name == "transformer" else "lm"
        cfg = bt.SIZES["issue"][key]
        n = cfg["n_train"]
        if key == "classifier":
            x, y = bt._majority_tokens(gen, n + bt.N_QUERY_POOL, cfg["seq_len"], cfg["vocab"], bt.N_CLASSES)
        else:
            seqs = bt._markov_sequences(gen, bt._markov_transitions(gen, cfg["vocab"]), n + bt.N_QUERY_POOL,
                                        cfg["seq_len"] + 1)
            x, y = seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()
        net = bt.make_model(key, cfg)
        loss_fn = None if key == "classifier" else bt.lm_sequence_loss
        train, val = TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])
        what = (f"{'transformer classifier' if key == 'classifier' else 'causal LM'} (d_model {cfg['d']}, 2 layers) on "
                f"{n:,} token sequences")
    elif name == "resnet":
        from bench_scale import augmented_digits
        from tests.zoo import ResBlockNet

        data = augmented_digits(5200, seed=0)
        x, y = data.tensors
        net = ResBlockNet(channels=128)
        loss_fn = None
        train, val = TensorDataset(x[:5000], y[:5000]), TensorDataset(x[5000:], y[5000:])
        what = "ResNet block with BatchNorm (128 channels) on 5,000 augmented 8×8 digits"
    else:
        raise ValueError(name)
    return {"net": net, "train": train, "val": val, "loss_fn": loss_fn, "what": what,
            "params": sum(p.numel() for p in net.parameters())}


def run(name: str, epochs: int, time_budget: Any, out_dir: str) -> Dict[str, Any]:
    b = build(name)
    per_example = b["loss_fn"] or cross_entropy
    model = Lit(b["net"], per_example)
    clock = TrainEnd()
    cb = InfluenceCallback(num_queries=16, loss_fn=b["loss_fn"], time_budget=time_budget, on_error="warn")
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=out_dir,
                         callbacks=[clock, cb])
    t0 = time.perf_counter()
    trainer.fit(model, DataLoader(b["train"], batch_size=32, shuffle=True), DataLoader(b["val"], batch_size=256))
    fit_s = time.perf_counter() - t0
    train_s = clock.train_end - clock.fit_start
    influence_s = fit_s - (clock.train_end - t0)
    res = cb.results
    return {"name": name, "what": b["what"], "params": b["params"], "n": len(b["train"]), "train_s": train_s,
            "influence_s": influence_s, "error": None if cb.error is None else f"{type(cb.error).__name__}: {cb.error}",
            "solver": None if res is None else res.solver,
            "reason": None if res is None else res.settings.get("auto_reason", ""),
            "timings": {} if res is None else dict(res.timings)}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["transformer", "lm", "resnet"],
                    choices=["transformer", "lm", "resnet"])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--time-budget", default="training",
                    help="the callback's time_budget: 'training' (default), seconds, or 'none'")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    budget: Any = None if args.time_budget == "none" else args.time_budget
    if budget not in (None, "training"):
        budget = float(budget)
    print(f"torch {torch.__version__}, {args.threads} thread(s), pytorch_lightning {pl.__version__}; "
          f"InfluenceCallback(num_queries=16, time_budget={budget!r}), {args.epochs} epochs of Adam\n")
    print("| model | params | n | training s | influence phase s | ratio | solver | phases (s) |")
    print("|---|---|---|---|---|---|---|---|")
    reasons = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as out:
            r = run(name, args.epochs, budget, out)
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())
        print(f"| {r['what']} | {r['params']:,} | {r['n']:,} | {r['train_s']:.1f} | {r['influence_s']:.1f} | "
              f"{r['influence_s'] / r['train_s']:.2f}× | {r['solver']} | {phases} |", flush=True)
        reasons.append(f"* {name}: {r['error'] or r['reason']}")
    print("\nWhy (the automatic choice's reason):\n" + "\n".join(reasons))


if __name__ == "__main__":
    main()
