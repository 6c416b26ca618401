"""The GPU path, checked in one run (under 5 minutes on one GPU): train with ``accelerator="gpu"`` and
``precision="bf16-mixed"``, compute influence with every solver on the GPU through the callback, and compare
each with the same computation on the CPU.

    python benchmarks/gpu_check.py                       # on a machine with a CUDA device
    python benchmarks/gpu_check.py --accelerator cpu --solvers exact ekfac --models cnn   # the script itself, on CPU

Steps:

1. The fast suite's GPU test (``tests/integration/test_loop.py::test_gpu_fit_computes_on_the_gpu_and_returns_cpu_results``),
   in a subprocess.
2. For the zoo's BatchNorm CNN (``cnn_bn_digits``) and transformer classifier (``transformer_tokens``): their
   untrained networks fitted by one ``Trainer(accelerator=..., precision="bf16-mixed", max_epochs=...)`` that
   carries one ``InfluenceCallback`` per solver (``state_key`` keeps them apart). Each callback's run happens on
   the training device, in float32 with autocast off. Its peak device memory is read in ``on_results``
   (``torch.cuda.max_memory_allocated``, reset after each) and its time from ``results.timings``.
3. The same computation on the CPU (a copy of the trained model, the same queries and the damping the GPU
   run chose), and the per-query Pearson correlation of the two score matrices.

Prints one table (model, solver, GPU s, CPU s, speed-up, peak GPU MB, Pearson median/min, λ) and exits 1 when a
run failed or a correlation is below ``--min-pearson`` (default 0.99; stochastic solvers differ by their noise).
Without a CUDA device and with the default ``--accelerator gpu`` it says so and exits 0 without running.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

GPU_TEST = "tests/integration/test_loop.py::test_gpu_fit_computes_on_the_gpu_and_returns_cpu_results"
MODELS = {"cnn": "cnn_bn_digits", "transformer": "transformer_tokens"}


def run_gpu_test() -> str:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", GPU_TEST], cwd=ROOT,
                          capture_output=True, text=True)
    tail = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return f"{GPU_TEST}: {tail} ({time.perf_counter() - t0:.0f} s, rc={proc.returncode})"


def check_model(name: str, solvers: List[str], accelerator: str, epochs: int, min_pearson: float) -> List[Dict[str, Any]]:
    import pytorch_lightning as pl
    import torch

    from lightning_influence import InfluenceCallback, compute_influence
    from tests import zoo
    from tests.lit_models import LitClassifier, loaders
    from tests.problems import pearson_rows

    entry = zoo.get(MODELS[name])
    torch.manual_seed(0)
    net = copy.deepcopy(entry.model).train()
    for m in net.modules():  # start from fresh weights: the GPU fit is the one explained
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    peaks: Dict[str, float] = {}

    def record(solver: str):
        def on_results(trainer: Any, module: Any, results: Any) -> None:
            if torch.cuda.is_available() and accelerator == "gpu":
                peaks[solver] = torch.cuda.max_memory_allocated() / 2**20
                torch.cuda.reset_peak_memory_stats()
        return on_results

    callbacks = [InfluenceCallback(num_queries=8, solver=s, on_error="warn", report=False, save_results=False,
                                   on_results=record(s)) for s in solvers]
    model = LitClassifier(net, lr=0.05, weight_decay=entry.weight_decay, optimizer="adam")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(accelerator=accelerator, devices=1, precision="bf16-mixed", max_epochs=epochs,
                             callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp, num_sanity_val_steps=0)
        train_loader, val_loader = loaders(entry.train, entry.query, batch_size=32)
        trainer.fit(model, train_loader, val_loader)
    cpu_model = copy.deepcopy(model).cpu()
    rows = []
    for solver, cb in zip(solvers, callbacks):
        row: Dict[str, Any] = {"model": name, "solver": solver, "params": entry.num_params}
        if cb.results is None:
            row["error"] = f"{type(cb.error).__name__}: {str(cb.error).splitlines()[0][:120]}"
            rows.append(row)
            continue
        res = cb.results
        t0 = time.perf_counter()
        ref = compute_influence(cpu_model, entry.train, entry.query, query_indices=res.query_indices.tolist(),
                                solver=solver, damping=res.damping)
        cpu_s = time.perf_counter() - t0
        r = pearson_rows(res.scores, ref.scores)
        row.update(device=res.settings.get("device"), gpu_s=res.timings["total"], cpu_s=cpu_s,
                   peak_mb=peaks.get(solver), r_med=float(r.median()), r_min=float(r.min()), damping=res.damping,
                   chosen=res.settings.get("auto_choice", solver), ok=float(r.median()) >= min_pearson)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--solvers", nargs="+", default=None, help="default: every registered solver")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--min-pearson", type=float, default=0.99)
    ap.add_argument("--skip-test", action="store_true", help="do not run the fast suite's GPU test")
    args = ap.parse_args()

    import torch

    from lightning_influence.solvers import solver_names

    if args.accelerator == "gpu" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing was run (use --accelerator cpu to check the script).")
        return 0
    solvers = args.solvers or solver_names()
    device = torch.cuda.get_device_name(0) if args.accelerator == "gpu" else "CPU"
    print(f"gpu_check: {device}, torch {torch.__version__}, accelerator={args.accelerator}, precision=bf16-mixed, "
          f"solvers {', '.join(solvers)}")
    if args.accelerator == "gpu" and not args.skip_test:
        print(run_gpu_test())
    failed = False
    print("\n| model | params | solver | chosen | device | λ | GPU run s | CPU run s | speed-up | peak GPU MB | r median | r min |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for row in check_model(name, solvers, args.accelerator, args.epochs, args.min_pearson):
            if "error" in row:
                failed = True
                print(f"| {row['model']} | {row['params']} | {row['solver']} | failed: {row['error']} |||||||||")
                continue
            failed |= not row["ok"]
            peak = "–" if row["peak_mb"] is None else f"{row['peak_mb']:.0f}"
            print(f"| {row['model']} | {row['params']} | {row['solver']} | {row['chosen']} | {row['device']} | "
                  f"{row['damping']:.3g} | {row['gpu_s']:.1f} | {row['cpu_s']:.1f} | {row['cpu_s'] / row['gpu_s']:.1f}× | "
                  f"{peak} | {row['r_med']:.4f} | {row['r_min']:.4f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
