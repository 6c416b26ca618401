"""Scale check: the default solver on a ~1M-parameter CNN, 10,000 augmented digit images, 100 queries.

    python benchmarks/bench_scale.py                       # 1.0M params, 10,000 images, 100 queries
    python benchmarks/bench_scale.py --train 2000 --queries 20   # a shorter run

Prints the wall time, the peak resident memory (VmHWM) and the split by phase (query gradients, solver
setup = the Arnoldi preconditioner and LiSSA's setup, solve, scoring), and extrapolates to a ResNet-18 on
50,000 CIFAR-10 images by the FLOPs of one Hessian-vector product per example (``torch.utils.flop_counter``)
of the two models times the number of examples. The data are scikit-learn's 8×8 digits, augmented to
10,000 images by random one-pixel shifts and Gaussian noise (no download); the model is briefly trained
with Adam. A timing, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_lissa import peak_rss_mb  # noqa: E402


def cnn_1m(width: int = 64, hidden: int = 960) -> nn.Module:
    """About 1.0M parameters on 1×8×8 digits: two 3×3 convolutions and a wide classifier head."""
    return nn.Sequential(
        nn.Conv2d(1, width // 2, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width // 2, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(width * 16, hidden), nn.ReLU(), nn.Linear(hidden, 10),
    )


def augmented_digits(n: int, seed: int = 0):
    """``n`` 1×8×8 images drawn from scikit-learn's digits, each shifted by up to one pixel and noised."""
    from sklearn.datasets import load_digits

    d = load_digits()
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor(d.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(d.target)
    pick = torch.randint(0, len(base), (n,), generator=g)
    x = base[pick]
    shifts = torch.randint(-1, 2, (n, 2), generator=g)
    x = torch.stack([torch.roll(img, (int(a), int(b)), dims=(0, 1)) for img, (a, b) in zip(x, shifts)])
    x = x + 0.1 * torch.randn(x.shape, generator=g)
    return torch.utils.data.TensorDataset(x.unsqueeze(1), labels[pick])


def hvp_flops_per_example(model: nn.Module, shape) -> float:
    """FLOPs of one Hessian-vector product per example (batch of 8, forward-over-reverse)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_influence.functional import batch_hvp
    from lightning_influence.objective import Objective

    obj = Objective(model)
    batch = (torch.randn(8, *shape), torch.zeros(8, dtype=torch.long))
    v = torch.randn(1, obj.num_params)
    with FlopCounterMode(display=False) as fc:
        batch_hvp(obj.loss, obj.space, obj.theta, batch, v)
    return fc.get_total_flops() / 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--solver", default="lissa", help="a solver name (default: the default solver, lissa)")
    ap.add_argument("--query-batch-size", type=int, default=None,
                    help="queries solved together (default: all at once); bounds the solver's per-query memory")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from lightning_influence import compute_influence

    train, val = augmented_digits(args.train), augmented_digits(max(args.queries, 100), seed=1)
    model = cnn_1m(args.width)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    train_s = time.perf_counter() - t0
    print(f"model: {n_params:,} parameters; {args.train:,} augmented 1×8×8 digits; {args.queries} queries; "
          f"{args.threads} threads; trained {args.epochs} epoch(s) in {train_s:.0f} s", flush=True)
    rss_before = peak_rss_mb()

    t0 = time.perf_counter()
    res = compute_influence(model, train, val, query_indices=list(range(args.queries)), damping="auto",
                            solver=args.solver, query_batch_size=args.query_batch_size)
    wall = time.perf_counter() - t0
    setup = {d.key: d.value for d in res.setup_diagnostics()}
    print(f"solver {args.solver} (query batch {args.query_batch_size or args.queries}): {wall:.0f} s wall, peak RSS {peak_rss_mb():.0f} MB (before influence: {rss_before:.0f} MB), "
          f"λ = {res.damping:.3g}")
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res.timings.items()))
    if args.solver == "lissa":
        chunks = [{d.name: d.value for d in c.items} for c in res.solve_chunks()]
        solve = {"steps_max": max(c.get("steps_max", 0) for c in chunks),
                 "converged": all(c.get("converged", False) for c in chunks)}
        se = sorted(x for c in chunks for x in (c.get("relative_stderr") or [float("nan")]))
        print("preconditioner: rank {}, {} Lanczos passes on {} examples; LiSSA scale {:.3g}, steps {}, "
              "converged {}, relative std. error of the scores median {:.3g} / max {:.3g}".format(
                  setup.get("preconditioner/rank"), setup.get("preconditioner/lanczos_passes"),
                  setup.get("preconditioner/lanczos_examples"), setup.get("scale", float("nan")),
                  solve.get("steps_max"), solve.get("converged"), se[len(se) // 2], se[-1]))

    # extrapolation to a ResNet-18 on 50k CIFAR-10 images: time scales with HVP FLOPs per example × examples
    try:
        import torchvision  # noqa: F401

        resnet = torchvision.models.resnet18(num_classes=10)
        f_resnet = hvp_flops_per_example(resnet, (3, 32, 32))
    except Exception:  # noqa: BLE001 - torchvision is optional: a published figure instead
        f_resnet = 6 * 0.56e9 * 2  # ≈ 0.56 GFLOP forward per 32×32 image; an HVP ≈ 6 forwards, ×2 (MACs→FLOPs)
    f_here = hvp_flops_per_example(model, (1, 8, 8))
    flops = f_resnet / f_here
    data = 50_000 / args.train
    print(f"HVP FLOPs per example: this CNN {f_here / 1e6:.1f} M, ResNet-18 (CIFAR) {f_resnet / 1e9:.2f} G "
          f"({flops:.0f}×). A ResNet-18 on 50k images: between {flops:.0f}× (if nothing grew with N, e.g. "
          f"Lanczos on ≤ 4,096 examples, the recursion) and {flops * data:.0f}× (if everything did) this "
          f"run: ≈ {flops * wall / 3600:.0f}–{flops * data * wall / 3600:.0f} h on this CPU, i.e. a GPU job "
          "(or params= on the last layers)")

if __name__ == "__main__":
    main()
