"""Shared pieces of the reproduction scripts in ``examples/``: arguments and output folders, the digits data
(scikit-learn, nothing downloaded), label flips, the models, full-batch training, correlations, markdown tables,
PNG plots and the offline W&B run. Not part of the library: the scripts import it as ``_common``."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

#: training examples of the digits split (the rest, 450, are the test/validation set)
N_TRAIN = 1347


# ---------------------------------------------------------------------------------------------- arguments, output
def parser_for(doc: Optional[str], name: str) -> argparse.ArgumentParser:
    """An argument parser with the options every example shares: ``--out``, ``--wandb-dir``, ``--no-wandb``,
    ``--seed`` and ``--quick`` (tiny sizes, seconds: for the tests)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=f"out/{name}", help="output folder: PNGs, JSON, W&B run (default: %(default)s)")
    parser.add_argument("--wandb-dir", default=None, help="folder of the offline W&B run (default: <out>/wandb)")
    parser.add_argument("--no-wandb", action="store_true", help="write the PNGs and JSON only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, label flips and training")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds): a smoke test, not the README numbers")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these models are tiny, and extra threads only help on idle cores)")
    return parser


def prepare_output(args: argparse.Namespace) -> Path:
    """Create ``args.out`` and point W&B at ``args.wandb_dir`` (default ``<out>/wandb``), offline unless the
    caller's environment says otherwise; set torch's CPU threads to ``args.threads``. Returns the output folder,
    resolved."""
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    wandb_dir = Path(args.wandb_dir).resolve() if args.wandb_dir else out / "wandb"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    args.wandb_dir = str(wandb_dir)
    os.environ.setdefault("WANDB_MODE", "offline")  # never needs a network or an account
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_DIR"] = str(wandb_dir)
    return out


@contextlib.contextmanager
def wandb_run(args: argparse.Namespace, name: str, config: Dict[str, Any]) -> Iterator[Any]:
    """An offline W&B run under ``args.wandb_dir`` (``None`` with ``--no-wandb``), finished on exit."""
    if args.no_wandb:
        yield None
        return
    import wandb

    run = wandb.init(project="lightning-influence-examples", name=name, dir=args.wandb_dir, config=config,
                     mode=os.environ.get("WANDB_MODE", "offline"), reinit=True)
    try:
        yield run
    finally:
        run.finish()


def log_table(run: Any, key: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Log rows as a W&B table (no-op without a run)."""
    if run is None:
        return
    import wandb

    run.log({key: wandb.Table(columns=list(header), data=[list(r) for r in rows])})


def save_figure(fig: Any, path: Path, run: Any = None, key: Optional[str] = None) -> Path:
    """Write ``fig`` as a PNG and, with a run, log it as an image under ``key``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if run is not None:
        import wandb

        run.log({key or path.stem: wandb.Image(str(path))})
    return path


def figure(ncols: int = 1, size: Tuple[float, float] = (4.6, 4.0), nrows: int = 1):
    """A matplotlib figure with ``nrows × ncols`` axes of ``size`` inches each, returned row by row (Agg
    backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats with 3 decimals."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def mean_sd(values: Sequence[float]) -> str:
    """``mean ± sd`` (sample standard deviation; 0 for one value)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    sd = float(t.std()) if len(t) > 1 else 0.0
    return f"{float(t.mean()):.4f} ± {sd:.4f}"


class Stopwatch:
    """``with Stopwatch() as t: ...; t.seconds``"""

    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start


# ---------------------------------------------------------------------------------------------- data
def digits(dtype: torch.dtype = torch.float64, image: bool = False, n_train: int = N_TRAIN,
           n_test: Optional[int] = None) -> Tuple[TensorDataset, TensorDataset]:
    """scikit-learn digits (ships with scikit-learn), pixels in [0, 1]: the first ``n_train`` examples for
    training, the next ``n_test`` (default: all the rest, 450) for testing. ``image=True``: ``[1, 8, 8]``."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=dtype)
    if image:
        x = x.view(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.long)
    stop = len(x) if n_test is None else n_train + n_test
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:stop], y[n_train:stop])


def flip_labels(y: Tensor, fraction: float, seed: int, second_choice: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Flip ``round(fraction · n)`` labels chosen at random (seeded). Each goes to a different random class, or
    to ``second_choice[i]`` when given (which must differ from ``y[i]``; e.g. a clean model's most likely
    wrong class: a harder, plausible mistake). Returns the noisy labels and the sorted indices of the flipped examples."""
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    flipped = torch.randperm(n, generator=g)[: int(round(fraction * n))].sort().values
    noisy = y.clone()
    if second_choice is None:
        noisy[flipped] = (y[flipped] + torch.randint(1, 10, (len(flipped),), generator=g)) % 10
    else:
        noisy[flipped] = second_choice[flipped]
    assert bool((noisy[flipped] != y[flipped]).all())
    return noisy, flipped


def with_labels(ds: TensorDataset, y: Tensor, keep: Optional[Tensor] = None) -> TensorDataset:
    """``ds``'s inputs with labels ``y``, optionally only the examples ``keep`` (indices or a mask)."""
    x = ds.tensors[0]
    if keep is not None:
        x, y = x[keep], y[keep]
    return TensorDataset(x, y)


# ---------------------------------------------------------------------------------------------- models, training
def logistic_regression() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def tanh_mlp(hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def small_cnn(width: int = 8) -> nn.Module:
    """A small ReLU CNN on ``[1, 8, 8]`` digits: two 3×3 convolutions (``width``, ``2·width`` channels), a 2×2
    max-pool and a linear classifier (3,818 parameters at width 8, 1,626 at width 4)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 16, 10),
    )


MODELS = {"logreg": logistic_regression, "mlp": tanh_mlp, "cnn": small_cnn}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def objective(model: nn.Module, x: Tensor, y: Tensor, weight_decay: float, weights: Optional[Tensor] = None) -> Tensor:
    """``(1/n) Σ w_i L_i + weight_decay/2 · ‖θ‖²`` (``n = len(x)``, ``w = 1`` by default): the Hessian gains
    ``weight_decay · I``, so the damping that matches the training objective is ``weight_decay``."""
    losses = F.cross_entropy(model(x), y, reduction="none")
    if weights is not None:
        losses = losses * weights
    return losses.sum() / len(x) + 0.5 * weight_decay * sum((p * p).sum() for p in model.parameters())


def fit_lbfgs(model: nn.Module, ds: TensorDataset, weight_decay: float, max_iter: int = 500, tol: float = 1e-10,
              weights: Optional[Tensor] = None) -> nn.Module:
    """Full-batch L-BFGS (strong Wolfe line search) until the gradient norm is below ``tol`` or ``max_iter``
    iterations; warm-started from the model's current weights. ``tol=0``: exactly ``max_iter`` iterations."""
    x, y = ds.tensors
    opt = torch.optim.LBFGS(model.parameters(), max_iter=max_iter, tolerance_grad=tol, tolerance_change=0.0 if tol == 0 else 1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(model, x, y, weight_decay, weights)
        loss.backward()
        return loss

    opt.step(closure)
    return model


def fit_adam(model: nn.Module, ds: TensorDataset, weight_decay: float, epochs: int = 60, lr: float = 3e-3,
             seed: int = 0, batch_size: int = 64) -> nn.Module:
    """Minibatch Adam on the same objective (coupled L2)."""
    g = torch.Generator().manual_seed(seed)
    x, y = ds.tensors
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch_size):
            idx = perm[s : s + batch_size]
            opt.zero_grad()
            objective(model, x[idx], y[idx], weight_decay).backward()
            opt.step()
    return model


def train_model(kind: str, ds: TensorDataset, weight_decay: float, seed: int, adam_epochs: int = 60,
                lbfgs_iter: int = 500, **model_args: Any) -> nn.Module:
    """A ``MODELS[kind](**model_args)`` model in ``ds``'s dtype trained to near stationarity: L-BFGS for the
    convex logistic regression; Adam then an L-BFGS polish for the networks."""
    torch.manual_seed(seed)
    model = MODELS[kind](**model_args).to(ds.tensors[0].dtype)
    if kind != "logreg":
        fit_adam(model, ds, weight_decay, epochs=adam_epochs, seed=seed)
    return fit_lbfgs(model, ds, weight_decay, max_iter=lbfgs_iter)


def grad_norm(model: nn.Module, ds: TensorDataset, weight_decay: float) -> float:
    """‖∇ objective‖ at the model's weights (how near stationarity training stopped)."""
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(objective(model, *ds.tensors, weight_decay), params)
    return float(torch.sqrt(sum((g * g).sum() for g in grads)))


@torch.no_grad()
def accuracy(model: nn.Module, ds: TensorDataset) -> float:
    x, y = ds.tensors
    return float((model(x).argmax(1) == y).double().mean())


@torch.no_grad()
def example_losses(model: nn.Module, ds: TensorDataset) -> Tensor:
    x, y = ds.tensors
    return F.cross_entropy(model(x), y, reduction="none")


def correlations(predicted: Tensor, actual: Tensor) -> Tuple[float, float]:
    """Pearson and Spearman correlation (torchmetrics)."""
    from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

    p, a = predicted.double().flatten(), actual.double().flatten()
    return float(pearson_corrcoef(p, a)), float(spearman_corrcoef(p, a))


# ---------------------------------------------------------------------------------------------- Lightning
def lightning_classifier(kind: str = "cnn", lr: float = 3e-3, weight_decay: float = 1e-3, seed: int = 0):
    """A LightningModule wrapping ``MODELS[kind]``, its weights drawn with ``seed``: Adam with coupled L2
    ``weight_decay`` (so the callback's automatic damping starts at that decay), train/val loss and accuracy
    logged."""
    import pytorch_lightning as pl

    pl.seed_everything(seed, verbose=False)

    class DigitsClassifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"model": kind, "lr": lr, "weight_decay": weight_decay})
            self.net = MODELS[kind]()

        def forward(self, x: Tensor) -> Tensor:
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


def quiet_lightning() -> None:
    """Keep Lightning's tips and device lines out of the printed tables."""
    import logging
    import warnings

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(num_workers|litlogger|litmodels|does not have many workers).*")


def lightning_fit(module: Any, train: TensorDataset, val: TensorDataset, epochs: int, seed: int,
                  callbacks: Sequence[Any] = (), logger: Any = False, root: Optional[Path] = None,
                  batch_size: int = 64) -> Any:
    """``Trainer.fit`` on the CPU, seeded, without checkpoints or progress bars; returns the trainer."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=list(callbacks),
                         default_root_dir=None if root is None else str(root), enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False,
                         log_every_n_steps=min(10, math.ceil(len(train) / batch_size)))
    g = torch.Generator().manual_seed(seed)
    trainer.fit(module, DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
                DataLoader(val, batch_size=512))
    return trainer


def ascii_digit(x: Tensor) -> List[str]:
    """An 8×8 digit as 8 lines of text."""
    shades = " .:-=+*#%@"
    img = x.reshape(8, 8).clamp(0, 1)
    return ["".join(shades[int(v * (len(shades) - 1))] * 2 for v in row) for row in img]


def side_by_side(blocks: List[List[str]], titles: List[List[str]]) -> str:
    """Text blocks side by side under their titles, columns two spaces apart."""
    widths = [max(len(line) for line in block + title) + 2 for block, title in zip(blocks, titles)]
    heads = max(len(t) for t in titles)
    rows = [[(t[r] if r < len(t) else "") for t in titles] for r in range(heads)]
    rows += [[b[r] if r < len(b) else "" for b in blocks] for r in range(max(len(b) for b in blocks))]
    return "\n".join("".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
