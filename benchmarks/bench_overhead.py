"""What ``InfluenceCallback`` adds to the training run it is attached to, measured side by side.

    python benchmarks/bench_overhead.py                       # EK-FAC, 10 epochs, 5 repeats
    python benchmarks/bench_overhead.py --solver lissa --epochs 5 --repeats 1

The same ``trainer.fit`` (scikit-learn digits: 1,347 training and 450 validation examples as 8×8 images,
the tanh MLP of ``examples/digits_demo.py``, Adam, batch 32, validation every epoch, no logger or
checkpoints) is timed three ways, interleaved in one process (one warm-up fit first, then each repeat runs
the three configurations in turn, so that the machine's drift hits all three alike):

* **no callback**: training alone;
* **end only**: ``InfluenceCallback(...)``, influence once when training ends;
* **every epoch**: ``InfluenceCallback(..., every_n_epochs=1)``, influence after every epoch (the end
  reuses the last epoch's run).

It prints a markdown table: per configuration the fit's wall time (minimum and median over the repeats)
and its process CPU time (user + system of all threads, median; less sensitive to other processes on a
shared machine), each as a ratio to training alone, and the influence computations' own wall time
(``sum(results.wall_time)`` over the fit's ``history``); then the machine and the command. Outputs (results files, HTML report) go to a temporary directory.
A timing, not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

CONFIGS = ("no callback", "end only", "every epoch")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fit_once(config: str, args: argparse.Namespace, root: str) -> Dict[str, Any]:
    """One fit of ``config``; returns its wall time (s), the influence time (s) and the number of runs."""
    import pytorch_lightning as pl
    from digits_demo import load_digits_split, make_module
    from torch.utils.data import DataLoader

    from lightning_influence import InfluenceCallback

    train, val, _ = load_digits_split(noise=0.0, seed=0)
    pl.seed_everything(0, verbose=False)
    model = make_module(lr=3e-3, weight_decay=1e-4)
    callbacks: List[Any] = []
    cb: Optional[InfluenceCallback] = None
    if config != "no callback":
        cb = InfluenceCallback(num_queries=args.queries, solver=args.solver, self_influence=args.self_influence,
                               every_n_epochs=1 if config == "every epoch" else None, on_error="raise")
        callbacks.append(cb)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, num_sanity_val_steps=0,
    )
    loaders = (DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=256))
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(model, *loaders)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    influence = sum(r.wall_time for r in cb.history.values()) if cb is not None else 0.0
    return {"wall": wall, "cpu": cpu, "influence": influence, "runs": len(cb.history) if cb is not None else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--solver", default="ekfac", help="InfluenceCallback solver (default ekfac)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--self-influence", action="store_true", help="also compute self-influence in every run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import warnings

    import pytorch_lightning as pl

    import logging

    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    times: Dict[str, List[Dict[str, Any]]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        fit_once("end only", args, os.path.join(tmp, "warmup"))
        for r in range(args.repeats):
            for c in CONFIGS:
                times[c].append(fit_once(c, args, os.path.join(tmp, f"{r}-{c.replace(' ', '_')}")))
                print(f"repeat {r} {c}: {times[c][-1]['wall']:.2f} s", file=sys.stderr, flush=True)

    base_wall = min(t["wall"] for t in times["no callback"])
    base_cpu = statistics.median(t["cpu"] for t in times["no callback"])
    print(f"| configuration | influence runs | fit wall s, min / median of {args.repeats} | × training alone (min wall) | "
          "fit CPU s, median | × training alone (CPU) | influence wall s, median |")
    print("|---|---|---|---|---|---|---|")
    for c in CONFIGS:
        walls = [t["wall"] for t in times[c]]
        cpu = statistics.median(t["cpu"] for t in times[c])
        infl = statistics.median(t["influence"] for t in times[c])
        print(f"| {c} | {times[c][0]['runs']} | {min(walls):.2f} / {statistics.median(walls):.2f} | "
              f"{min(walls) / base_wall:.2f} | {cpu:.2f} | {cpu / base_cpu:.2f} | {infl:.2f} |")
    print()
    print(f"Machine: {_cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, pytorch_lightning {pl.__version__}, Python {platform.python_version()}, "
          f"{platform.system()} {platform.release()}; commit {_commit()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    print(f"Model: tanh MLP 64-64-10 (4,810 parameters), Adam, batch 32, {args.epochs} epochs; solver "
          f"{args.solver!r}, {args.queries} queries, self-influence {'on' if args.self_influence else 'off'}.")
    print(f"Command: `{shlex.join(['python', 'benchmarks/bench_overhead.py', *sys.argv[1:]])}`")


if __name__ == "__main__":
    main()
