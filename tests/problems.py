"""Small, exactly-solvable problems shared by the tests: sklearn digits with logistic regression, a tanh
MLP and a small CNN, trained to (near) stationarity in float64 where numbers are compared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Pearson correlation of two score matrices ``[Q, N]`` (in float64), ``[Q]``."""
    a, b = a.double(), b.double()
    return F.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), dim=1)


def digits(dtype: torch.dtype = torch.float64, n_train: int = 1347, image: bool = False) -> Tuple[TensorDataset, TensorDataset]:
    """sklearn digits, pixels scaled to [0, 1]; first ``n_train`` for training, the rest for validation.
    ``image=True`` shapes inputs as ``[1, 8, 8]``."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=dtype)
    if image:
        x = x.view(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.long)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def logistic_regression() -> nn.Module:
    return nn.Linear(64, 10)


def tanh_mlp(hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def small_cnn() -> nn.Module:
    """About 20k parameters on 8×8 digits."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 16, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def l2_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """Mean cross-entropy plus ``weight_decay/2 · ‖θ‖²`` (so the Hessian gains ``weight_decay·I``)."""
    return F.cross_entropy(model(x), y) + 0.5 * weight_decay * sum((p * p).sum() for p in model.parameters())


def fit_lbfgs(model: nn.Module, ds: TensorDataset, weight_decay: float, max_iter: int = 500, tol: float = 1e-10) -> nn.Module:
    """Full-batch L-BFGS to a tight gradient tolerance (near a stationary point, as influence assumes)."""
    x, y = ds.tensors
    opt = torch.optim.LBFGS(model.parameters(), max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = l2_objective(model, x, y, weight_decay)
        loss.backward()
        return loss

    opt.step(closure)
    return model


def fit_adam(model: nn.Module, ds: TensorDataset, weight_decay: float, epochs: int = 60, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """Minibatch Adam with coupled L2 (for models where L-BFGS is slow, e.g. the CNN)."""
    g = torch.Generator().manual_seed(seed)
    x, y = ds.tensors
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), 64):
            idx = perm[s : s + 64]
            opt.zero_grad()
            l2_objective(model, x[idx], y[idx], weight_decay).backward()
            opt.step()
    return model


@dataclass
class Problem:
    model: nn.Module
    train: TensorDataset
    val: TensorDataset
    damping: float


def trained_logreg(weight_decay: float = 1e-2, n_train: int = 1347, seed: int = 0) -> Problem:
    torch.manual_seed(seed)
    train, val = digits(torch.float64, n_train)
    model = fit_lbfgs(logistic_regression().double(), train, weight_decay)
    return Problem(model, train, val, weight_decay)


def trained_mlp(weight_decay: float = 1e-2, n_train: int = 1347, seed: int = 0) -> Problem:
    torch.manual_seed(seed)
    train, val = digits(torch.float64, n_train)
    model = fit_lbfgs(tanh_mlp().double(), train, weight_decay, max_iter=1000)
    return Problem(model, train, val, weight_decay)


def trained_cnn(weight_decay: float = 1e-3, n_train: int = 1347, seed: int = 0, dtype: torch.dtype = torch.float64) -> Problem:
    """The ReLU CNN: 60 epochs of Adam, then 300 full-batch L-BFGS iterations (≈ 45 s on 2 cores).
    Adam alone stops at gradient norm 0.19 with Hessian eigenvalues down to −0.148 (a saddle region:
    ``H + 0.1·I`` indefinite); after the polish the gradient norm is 0.003 and ``λ_min(H) ≈ −0.003``
    (Lanczos), so damping 0.1 gives a positive definite ``H + λI``."""
    torch.manual_seed(seed)
    train, val = digits(dtype, n_train, image=True)
    model = fit_adam(small_cnn().to(dtype), train, weight_decay)
    model = fit_lbfgs(model, train, weight_decay, max_iter=300)
    return Problem(model, train, val, 0.1)


def _key(d) -> str:
    return f"{d['source']}/{d['name']}" if d.get("source") else d["name"]


def diag(res, name: str, chunk: int = 0):
    """The value of diagnostic ``name`` of results ``res`` (``source/name`` for a component's, e.g.
    ``preconditioner/rank``): from solve chunk ``chunk`` if it recorded one, else from the solver's setup,
    else from the run's totals (``KeyError`` when absent)."""
    groups = [c["items"] for c in res.diagnostics["solve"][chunk : chunk + 1]]
    groups += [res.diagnostics.get("setup", []), res.diagnostics.get("totals", [])]
    for items in groups:
        for d in items:
            if _key(d) == name:
                return d["value"]
    raise KeyError(name)


def diag_names(res, group: str = "setup"):
    """Keys (``name`` or ``source/name``) of the diagnostics in ``res.diagnostics[group]`` (``"setup"``,
    ``"totals"``)."""
    return [_key(d) for d in res.diagnostics.get(group, [])]
