"""LiSSA benchmark: automatic settings against a hand-tuned grid, and batched against per-query solves.

    python benchmarks/bench_lissa.py                      # everything (long on a laptop CPU)
    python benchmarks/bench_lissa.py --models logreg mlp --skip-loop
    python benchmarks/bench_lissa.py --models cnn --queries 100 --loop-queries 5

Part 1 (``--models``): for each model, accuracy (median/min Pearson over queries of the scores against
an exact damped solve, CG to 1e-6 for the CNN) and wall time of ``LissaSettings()`` and of a grid of
hand-picked fixed settings. Part 2: on the CNN with all training digits scored against ``--queries``
queries, default LiSSA (all queries in one batched recursion) next to the same recursion run one query
at a time (``query_batch_size=1``: identical numbers, one query per HVP); ``--loop-queries`` times only
that many queries of the loop and extrapolates linearly (marked in the table).

Every configuration runs in a fresh subprocess, which reports its wall time and peak resident memory
(``VmHWM``; torch's CPU allocations are invisible to tracemalloc). Prints markdown tables.
``--profile`` prints only the cost of one minibatch HVP per right-hand side against the number solved
together (and the tangent chunk), with FLOP counts and the machine's matmul throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests import problems  # noqa: E402

TRAINERS = {"logreg": problems.trained_logreg, "mlp": problems.trained_mlp, "cnn": problems.trained_cnn}
GRIDS = {  # hand-tuned fixed settings of the kind users pick: (depth, batch_size, scale, repeats)
    "logreg": [(1000, 64, 3.0, 1), (3000, 128, 3.0, 2), (3000, 64, 1.2 * 0.907, 1)],
    "mlp": [(1000, 64, 10.0, 1), (3000, 128, 10.0, 2)],
    "cnn": [(500, 64, 25.0, 1), (1000, 128, 25.0, 1)],
}


def _queries(q: int) -> List[int]:
    return list(range(0, 450, max(1, 450 // q)))[:q]


def _problem(name: str, dtype: torch.dtype, cache: str):
    path = os.path.join(cache, f"{name}.pt")  # trained once, then loaded by every subprocess
    if os.path.exists(path):
        arch = {"logreg": problems.logistic_regression, "mlp": problems.tanh_mlp, "cnn": problems.small_cnn}[name]
        train, val = problems.digits(torch.float64, image=name == "cnn")
        p = problems.Problem(arch().double(), train, val, 0.1 if name == "cnn" else 1e-2)
        p.model.load_state_dict(torch.load(path))
    else:
        p = TRAINERS[name]()
        torch.save(p.model.state_dict(), path)
    p.model.to(dtype)
    return p


def rss_mb() -> float:
    """Resident memory of this process now, in MB (``VmRSS`` of ``/proc/self/status``; NaN elsewhere)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: ``VmHWM`` of ``/proc/self/status`` on Linux.
    (``ru_maxrss`` is wrong for a spawned worker there: it keeps the high-water mark of the parent's
    memory image the worker was forked from, which ``exec`` replaced.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(job: Dict[str, Any]) -> Dict[str, Any]:
    from lightning_influence import CGSettings, ExactSettings, LissaSettings, compute_influence

    torch.set_num_threads(job.get("threads", torch.get_num_threads()))
    dtype = getattr(torch, job["dtype"])
    p = _problem(job["model"], dtype, job["cache"])
    train = p.train
    if dtype != torch.float64:
        x, y = p.train.tensors
        train = torch.utils.data.TensorDataset(x.to(dtype), y)
        x, y = p.val.tensors
        val = torch.utils.data.TensorDataset(x.to(dtype), y)
    else:
        val = p.val
    kind = job["solver"]
    if kind == "exact":
        solver = ExactSettings()
    elif kind == "cg":
        solver = CGSettings(tol=1e-6)
    else:
        solver = LissaSettings(**job.get("lissa", {}))
    queries = job["queries"]
    qbs = job.get("query_batch_size")
    if job.get("loop_queries"):
        queries = queries[: job["loop_queries"]]
    t0 = time.perf_counter()
    res = compute_influence(p.model, train, val, query_indices=queries, solver=solver, damping=p.damping,
                            dtype=dtype, query_batch_size=qbs)
    wall = time.perf_counter() - t0
    total = {d.name: d.value for d in res.total_diagnostics()}
    out = {"wall_s": wall, "timings": res.timings, "maxrss_mb": peak_rss_mb(), "hvp_calls": total.get("hvp_calls")}
    if kind == "lissa":
        setup = {d.name: d.value for d in res.setup_diagnostics()}
        first = {d.name: d.value for d in res.solve_chunks()[0].items}
        out.update(scale=setup["scale"], batch_size=setup["batch_size"], depth=first["steps_max"],
                   stderr_median=float(res.per_query_diagnostics()["relative_stderr"].nanmedian()),
                   setup_hvps=setup["setup_hvps"])
    torch.save(res.scores, job["out"])
    return out


def profile_hvp(cache: str, dtype: torch.dtype, batch: int = 64, sizes=(1, 8, 32, 100)) -> List[str]:
    """Cost of one minibatch HVP on the CNN per right-hand side, batched (vmap over Q tangents) against
    Q = 1, with its FLOP count (``torch.utils.flop_counter``) and the machine's matmul throughput as the
    yardstick: where the time goes, and how much batching can gain on this machine."""
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_influence.data import ExampleSource
    from lightning_influence.objective import Objective
    from lightning_influence.curvature.operator import HessianOperator

    p = _problem("cnn", dtype, cache)
    x, y = p.train.tensors
    train = torch.utils.data.TensorDataset(x.to(dtype), y)
    obj = Objective(p.model, params=None, loss_fn=None, dtype=dtype)
    op = HessianOperator(obj.loss, obj.space, obj.theta, ExampleSource(train, None, obj.prepare_batch))
    mb = next(op.minibatches(batch, 0))

    def timed(fn, reps):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    a = torch.randn(2048, 2048, dtype=dtype)
    gflops_peak = 2 * 2048**3 / timed(lambda: a @ a, 5) / 1e9
    rows = [f"matmul 2048×2048 ({dtype}): {gflops_peak:.0f} GFLOP/s on {torch.get_num_threads()} threads", "",
            "| Q (right-hand sides) | ms per HVP call | ms per query | GFLOP per query | GFLOP/s | speed-up per query vs Q=1 |",
            "|---|---|---|---|---|---|"]
    base = None
    for q, chunk in [(q, None) for q in sizes] + [(max(sizes), c) for c in (32, 16, 8)]:
        v = torch.randn(q, op.num_params, dtype=dtype)
        op.tangent_chunk = chunk
        with FlopCounterMode(display=False) as fc:
            op.batch_hvp(mb, v)
        flops = fc.get_total_flops()
        sec = timed(lambda: op.batch_hvp(mb, v), max(2, 40 // q))
        base = base or sec
        label = f"{q}" + (f", vmapped {chunk} at a time" if chunk else "")
        rows.append(f"| {label} | {sec * 1e3:.1f} | {sec * 1e3 / q:.2f} | {flops / q / 1e9:.3f} | "
                    f"{flops / sec / 1e9:.0f} | {base / (sec / q):.2f}× |")
    return rows


def spawn(job: Dict[str, Any], script: str = __file__, timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run ``script --worker JOB`` in a fresh interpreter; its last stdout line is the JSON result.
    A failure or a timeout comes back as ``{"error": ...}``."""
    try:
        proc = subprocess.run([sys.executable, script, "--worker", json.dumps(job)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc={proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    ac, bc = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return torch.nn.functional.cosine_similarity(ac, bc, dim=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--models", nargs="*", default=["logreg", "mlp", "cnn"])
    ap.add_argument("--grid-queries", type=int, default=10)
    ap.add_argument("--queries", type=int, default=100, help="queries of the CNN batched-vs-loop comparison")
    ap.add_argument("--loop-queries", type=int, default=0, help="time only this many queries of the loop")
    ap.add_argument("--skip-loop", action="store_true")
    ap.add_argument("--skip-grid", action="store_true")
    ap.add_argument("--profile", action="store_true", help="only the per-query HVP cost profile (CNN)")
    ap.add_argument("--dtype", default="float32", help="dtype of the batched-vs-loop comparison")
    ap.add_argument("--depth", type=int, default=0,
                    help="fixed depth for the batched-vs-loop timing (0: the defaults, depth='auto')")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    cache = tempfile.mkdtemp(prefix="bench_lissa_")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs\n")
    if args.profile:
        print("\n".join(profile_hvp(cache, getattr(torch, args.dtype))))
        return
    for m in args.models:  # train each model once, in this process
        _problem(m, torch.float64, cache)

    if not args.skip_grid:
        rows = ["| model | settings | median r | min r | wall s | solve s | depth | batch | scale | peak RSS MB |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for m in args.models:
            q = _queries(args.grid_queries)
            ref_kind = "cg" if m == "cnn" else "exact"
            base = {"model": m, "dtype": "float64", "cache": cache, "queries": q}
            ref = spawn({**base, "solver": ref_kind, "out": os.path.join(cache, f"{m}_ref.pt")})
            if "error" in ref:
                rows.append(f"| {m} | reference {ref_kind} | failed: {ref['error']} |||||||| ")
                continue
            ref_scores = torch.load(os.path.join(cache, f"{m}_ref.pt"))
            rows.append(f"| {m} | reference: {ref_kind} | 1 | 1 | {ref['wall_s']:.1f} | {ref['timings']['solve']:.1f} "
                        f"| | | | {ref['maxrss_mb']:.0f} |")
            configs = [("auto (defaults)", {})] + [
                (f"depth={d}, batch={b}, scale={s:g}, repeats={r}",
                 {"depth": d, "batch_size": b, "scale": s, "repeats": r}) for d, b, s, r in GRIDS[m]]
            for label, lissa in configs:
                out = os.path.join(cache, f"{m}_lissa.pt")
                res = spawn({**base, "solver": "lissa", "lissa": lissa, "out": out})
                if "error" in res:
                    rows.append(f"| {m} | {label} | {res['error'][:120]} |||||||| ")
                    continue
                r = pearson(torch.load(out), ref_scores)
                rows.append(f"| {m} | {label} | {float(r.median()):.4f} | {float(r.min()):.4f} | {res['wall_s']:.1f} | "
                            f"{res['timings']['solve']:.1f} | {res['depth']} | {res['batch_size']} | {res['scale']:.3g} | "
                            f"{res['maxrss_mb']:.0f} |")
                print(rows[-1], flush=True)
        print("\n## Auto settings against a hand-tuned grid (float64, %d queries)\n" % args.grid_queries)
        print("\n".join(rows))

    if not args.skip_loop and "cnn" in args.models:
        q = _queries(args.queries)
        lissa = {"depth": args.depth, "repeats": 1} if args.depth else {}
        base = {"model": "cnn", "dtype": args.dtype, "cache": cache, "queries": q, "solver": "lissa", "lissa": lissa}
        batched = spawn({**base, "out": os.path.join(cache, "cnn_batched.pt")})
        loop = spawn({**base, "query_batch_size": 1, "loop_queries": args.loop_queries,
                      "out": os.path.join(cache, "cnn_loop.pt")})
        ref = None
        if not args.depth:  # accuracy of both against CG to 1e-6 in float64, same queries
            ref_out = os.path.join(cache, "cnn_loop_ref.pt")
            ref = spawn({**base, "dtype": "float64", "solver": "cg", "out": ref_out})
            ref = None if "error" in ref else (torch.load(ref_out), ref)
        how = f"fixed depth={args.depth}, repeats=1 (timing only)" if args.depth else "default settings"
        print(f"\n## CNN, {len(q)} queries × 1347 training digits, {args.dtype}, {how}\n")
        if ref is not None:
            print(f"reference: CG to 1e-6, float64, {ref[1]['timings']['solve']:.1f} s solve, "
                  f"{ref[1]['maxrss_mb']:.0f} MB peak\n")
        print("| run | median r | min r | solve s | total s | peak RSS MB | HVP calls |\n|---|---|---|---|---|---|---|")
        for label, res in (("default LiSSA, all queries batched", batched), ("same recursion, one query at a time", loop)):
            if "error" in res:
                print(f"| {label} | failed: {res['error']} | | | | | |")
                continue
            acc = "| |"
            if ref is not None:
                mine = torch.load(os.path.join(cache, "cnn_batched.pt" if res is batched else "cnn_loop.pt"))
                r = pearson(mine.double(), ref[0][: mine.shape[0]])
                acc = f"{float(r.median()):.4f} | {float(r.min()):.4f} |"
            nq = args.loop_queries if (res is loop and args.loop_queries) else len(q)
            f = len(q) / nq
            note = f" (measured {nq} queries, ×{f:g})" if f != 1 else ""
            print(f"| {label}{note} | {acc} {res['timings']['solve'] * f:.1f} | "
                  f"{res['timings']['solve'] * f + res['wall_s'] - res['timings']['solve']:.1f} | "
                  f"{res['maxrss_mb']:.0f} | {res['hvp_calls']} |")
        if "error" not in batched and "error" not in loop:
            f = len(q) / (args.loop_queries or len(q))
            print(f"\nsolve speed-up of batching: {loop['timings']['solve'] * f / batched['timings']['solve']:.1f}×")


if __name__ == "__main__":
    main()
