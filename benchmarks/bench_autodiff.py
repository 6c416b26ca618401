"""Cost of each differentiation strategy of ``lightning_influence.autodiff``, per HVP and per example gradient.

    python benchmarks/bench_autodiff.py                          # transformer, LSTM, GRU, MLP; float32; CPU
    python benchmarks/bench_autodiff.py --models tf lstm --device cuda --batch 128 --vectors 32
    python benchmarks/bench_autodiff.py --fd-error                # finite differences' error, float32 and float64

Models (token classifiers, 24 tokens, 10 classes, vocabulary 1,000, width 64): ``tf`` a 2-layer
``nn.TransformerEncoder`` (4 heads, ReLU feed-forward 128; 131,594 parameters), ``lstm`` one ``nn.LSTM``
layer (97,930), ``gru`` one ``nn.GRU`` layer (89,610), ``mlp`` a 256-128-128-10 tanh MLP on random features
(50,698). Every strategy (plain kernels and ``composite_kernels(embedding_bag=False)``, as the probe runs
models without an EmbeddingBag) runs once to warm up, then ``--repeats`` rounds time each one in turn; the
table gives the minimum over rounds per HVP (``--vectors`` right-hand sides vmapped together on ``--batch``
examples) and per example (per-example gradients of the batch), and each HVP's cost relative to forward
over reverse with composite kernels. Strategies that raise are listed as such. A timing, not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_influence import autodiff as ad  # noqa: E402
from lightning_influence.functional import ParamSpace  # noqa: E402

VOCAB, WIDTH, STEPS, CLASSES = 1000, 64, 24, 10


class Net(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "mlp":
            self.body: nn.Module = nn.Sequential(nn.Linear(256, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh())
            self.head = nn.Linear(128, CLASSES)
            return
        self.emb = nn.Embedding(VOCAB, WIDTH)
        if kind == "tf":
            layer = nn.TransformerEncoderLayer(WIDTH, 4, 2 * WIDTH, dropout=0.0, batch_first=True)
            self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        else:
            self.body = {"lstm": nn.LSTM, "gru": nn.GRU}[kind](WIDTH, WIDTH, batch_first=True)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "mlp":
            return self.head(self.body(x))
        h = self.emb(x)
        if self.kind == "tf":
            return self.head(self.body(h).mean(1))
        out, _ = self.body(h)
        return self.head(out[:, -1])


def problem(kind: str, batch: int, dtype: torch.dtype, device: str) -> Tuple[Callable[..., Tensor], ParamSpace, Tensor, Any]:
    torch.manual_seed(0)
    model = Net(kind).to(device=device, dtype=dtype).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    space = ParamSpace.from_params(params)
    if kind == "mlp":
        x = torch.randn(batch, 256, dtype=dtype, device=device)
    else:
        x = torch.randint(0, VOCAB, (batch, STEPS), device=device)
    y = torch.randint(0, CLASSES, (batch,), device=device)

    def loss(p: Dict[str, Tensor], b: Any) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (b[0],)), b[1], reduction="none")

    return loss, space, space.flatten(params), (x, y)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timings(kind: str, args: argparse.Namespace) -> List[str]:
    loss, space, theta, batch = problem(kind, args.batch, torch.float32, args.device)
    vectors = torch.randn(args.vectors, space.num_params, device=args.device)
    calls: Dict[Tuple[str, str, bool], Callable[[], Tensor]] = {}
    failed: List[str] = []
    for path, strategies in (("hvp", ad.HVP_STRATEGIES), ("grads", ad.GRAD_STRATEGIES)):
        for strategy in strategies:
            for composite in (False, True):
                if path == "hvp":
                    plan = ad.Differentiation(hvp=strategy, hvp_composite=composite, embedding_bag=False)
                    call = lambda plan=plan: ad.batch_hvp(plan, loss, space, theta, batch, vectors)  # noqa: E731
                else:
                    plan = ad.Differentiation(hvp=None, grads=strategy, grads_composite=composite, embedding_bag=False)
                    call = lambda plan=plan: ad.per_sample_grads(plan, loss, space, theta, batch)  # noqa: E731
                try:
                    call()
                    calls[(path, strategy, composite)] = call
                except Exception as exc:  # noqa: BLE001 - a strategy that fails is a result
                    failed.append(f"{path} {strategy} ({'composite' if composite else 'plain'}): "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}")
    times: Dict[Tuple[str, str, bool], List[float]] = {k: [] for k in calls}
    for _ in range(args.repeats):
        for key, call in calls.items():
            sync(args.device)
            t0 = time.perf_counter()
            call()
            sync(args.device)
            times[key].append(time.perf_counter() - t0)
    base = min(times.get(("hvp", "forward_over_reverse", True), [float("nan")]))
    rows = [f"\n### {kind}: {space.num_params:,} parameters, batch {args.batch}, {args.vectors} right-hand sides, "
            f"{args.device}, {torch.get_num_threads()} thread(s)\n",
            "| computation | strategy | kernels | ms (min) | ms (median) | relative |", "|---|---|---|---|---|---|"]
    for (path, strategy, composite), ts in times.items():
        ts = sorted(ts)
        per = args.vectors if path == "hvp" else args.batch
        what = "per HVP" if path == "hvp" else "per example"
        rel = f"{ts[0] / base:.2f}" if path == "hvp" else ""
        rows.append(f"| {path} {what} | {strategy} | {'composite' if composite else 'plain'} | "
                    f"{ts[0] * 1e3 / per:.2f} | {ts[len(ts) // 2] * 1e3 / per:.2f} | {rel} |")
    rows.extend(f"- fails: {f}" for f in failed)
    return rows


def fd_errors(args: argparse.Namespace) -> List[str]:
    rows = ["\n### finite-difference HVPs: largest relative row error against reverse over reverse "
            "(composite kernels), 4 random vectors, 16 examples\n",
            "| model | dtype | " + " | ".join(f"c = {c}" for c in args.scales) + " |",
            "|---|---|" + "---|" * len(args.scales)]
    for kind in args.models:
        for dtype in (torch.float64, torch.float32):
            loss, space, theta, batch = problem(kind, 16, dtype, args.device)
            gen = torch.Generator().manual_seed(1)
            vectors = torch.randn(4, space.num_params, generator=gen, dtype=torch.float64).to(args.device, dtype)
            exact = ad.batch_hvp(ad.Differentiation(hvp="reverse_over_reverse", hvp_composite=True, embedding_bag=False),
                                 loss, space, theta, batch, vectors)
            errs = []
            for c in args.scales:
                fd = ad._hvp_finite_difference(loss, space, theta, batch, vectors, None, scale=c)
                errs.append(f"{ad._relative_error(fd, exact):.1e}")
            rows.append(f"| {kind} | {str(dtype).replace('torch.', '')} | " + " | ".join(errs) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tf", "lstm", "gru", "mlp"], choices=["tf", "lstm", "gru", "mlp"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vectors", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fd-error", action="store_true", help="measure finite differences' error instead")
    parser.add_argument("--scales", nargs="+", type=float, default=[0.1, 0.3, 1.0, 3.0])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}")
    if args.fd_error:
        print("\n".join(fd_errors(args)))
        return
    for kind in args.models:
        print("\n".join(timings(kind, args)), flush=True)


if __name__ == "__main__":
    main()
