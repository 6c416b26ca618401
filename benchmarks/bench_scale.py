"""Scale check: the default solver on a ~1M-parameter CNN, 10,000 synthetic images, 100 queries.

    python benchmarks/bench_scale.py                       # 1.0M params, 10,000 images, 100 queries
    python benchmarks/bench_scale.py --train 2000 --queries 20   # a shorter run

Prints the wall time, the peak resident memory (VmHWM) and the split by phase (query gradients, solver
setup = the Arnoldi preconditioner and LiSSA's setup, solve, scoring), and extrapolates to a ResNet-18 on
50,000 CIFAR-10 images from the measured time per full-data pass and per minibatch HVP, scaled by the FLOPs
of one Hessian-vector product per example (``torch.utils.flop_counter``) of the two models. The data are
random images with labels from a random teacher network (no download); the model is briefly trained so the
loss is not at its initial value. A timing, not a test.
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


def cnn_1m(width: int = 64) -> nn.Module:
    """About 1.0M parameters on 3×16×16 inputs: three 3×3 convolutions and a wide classifier."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(width * 16, 880), nn.ReLU(), nn.Linear(880, 10),
    )


def synthetic(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 256, 10))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        y = teacher(x).argmax(1)
    return torch.utils.data.TensorDataset(x, y)


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
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from lightning_influence import compute_influence

    train, val = synthetic(args.train), synthetic(max(args.queries, 100), seed=1)
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
    print(f"model: {n_params:,} parameters; {args.train:,} synthetic 3×16×16 images; {args.queries} queries; "
          f"{args.threads} threads; trained {args.epochs} epoch(s) in {train_s:.0f} s", flush=True)

    t0 = time.perf_counter()
    res = compute_influence(model, train, val, query_indices=list(range(args.queries)), damping="auto")
    wall = time.perf_counter() - t0
    setup = {d.name: d.value for d in res.setup_diagnostics()}
    print(f"default solver: {wall:.0f} s wall, peak RSS {peak_rss_mb():.0f} MB, λ = {res.damping:.3g}")
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res.timings.items()))
    print("preconditioner: rank {}, {} Lanczos passes; LiSSA scale {:.3g}, steps {}".format(
        setup.get("preconditioner_rank"), setup.get("preconditioner_lanczos_passes"), setup.get("scale", float("nan")),
        {d.name: d.value for d in res.solve_chunks()[0].items}.get("steps_max")))

    # extrapolation to a ResNet-18 on 50k CIFAR-10 images: time scales with HVP FLOPs per example × examples
    try:
        import torchvision  # noqa: F401

        resnet = torchvision.models.resnet18(num_classes=10)
        f_resnet = hvp_flops_per_example(resnet, (3, 32, 32))
    except Exception:  # noqa: BLE001 - torchvision is optional: a published figure instead
        f_resnet = 6 * 0.56e9 * 2  # ≈ 0.56 GFLOP forward per 32×32 image; an HVP ≈ 6 forwards, ×2 (MACs→FLOPs)
    f_here = hvp_flops_per_example(model, (3, 16, 16))
    factor = (f_resnet / f_here) * (50_000 / args.train)
    print(f"HVP FLOPs per example: this CNN {f_here / 1e6:.1f} M, ResNet-18 (CIFAR) {f_resnet / 1e9:.2f} G; "
          f"a ResNet-18 on 50k images would take about {factor:.0f}× the data passes above: "
          f"≈ {factor * (res.timings['solver_setup'] + res.timings['solve']) / 3600:.1f} h on this CPU "
          f"(setup + solve), i.e. a GPU job (or params= on the last layers)")


if __name__ == "__main__":
    main()
