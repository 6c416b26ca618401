"""Lanczos passes of the Arnoldi solver and of the Arnoldi preconditioner (LiSSA's default, CG's), before
and after a change, measured side by side in one run.

For each model (trained once here, in float32 as users have it) and each solver, one ``compute_influence``
call per source tree, alternating between the trees (same machine load), each in its own process with
``PYTHONPATH`` set to that tree. Printed per row: full-data Lanczos passes (the Krylov dimension), the rank
kept and whether the pairs converged, the solver's setup seconds (``timings["solver_setup"]``: Lanczos,
scale, trace, ...) and solve seconds, and the per-query Pearson of the scores against a CG reference (float64,
relative residual 1e-8) on the same model.

    git archive <base-commit> lightning_influence | tar -x -C /tmp/li-base   # the "before" tree
    OMP_NUM_THREADS=1 python benchmarks/bench_lanczos.py --trees before=/tmp/li-base after=.
    python benchmarks/bench_lanczos.py --models mlp --solvers arnoldi --trees after=.   # one tree only

Models: ``logreg`` (650 parameters, L-BFGS to its optimum, λ = 1e-2), ``mlp`` (the digits demo's tanh MLP,
64-64-10, 4,810 parameters, 30 epochs of Adam with coupled L2 1e-2 as in ``examples/digits_demo.py``,
automatic damping with base 1e-2) and ``cnn`` (``tests/problems.small_cnn``, 21,546 parameters, ReLU, Adam
then L-BFGS, λ = 0.1). Solvers: ``arnoldi`` (its defaults), ``lissa`` (the default preconditioner),
``cg-arnoldi`` (CG preconditioned by Arnoldi, what ``solver="auto"`` picks for many queries).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]

SOLVERS = ("arnoldi", "lissa", "cg-arnoldi")


def _settings(name: str) -> Any:
    from lightning_influence import ArnoldiSettings, CGSettings, LissaSettings

    if name.startswith("arnoldi-r"):  # a fixed rank, as pyDVL's ArnoldiInfluence(rank=...)
        return ArnoldiSettings(rank=int(name[len("arnoldi-r"):]))
    return {"arnoldi": ArnoldiSettings(), "lissa": LissaSettings(), "cg-arnoldi": CGSettings(preconditioner="arnoldi"),
            "cg": CGSettings(tol=1e-8, max_iter=5000)}[name]


def pydvl_child(path: str, rank: int, damping: float) -> Dict[str, Any]:
    """pyDVL's ArnoldiInfluence(rank=...).fit on the same model (run under the peers' Python): its setup
    seconds, Hessian-vector products counted by wrapping its operator's ``apply``."""
    import torch.nn.functional as F
    from pydvl.influence.torch import ArnoldiInfluence
    from torch.utils.data import DataLoader

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    m = torch.load(path, weights_only=False)
    loader = DataLoader(m["train"], batch_size=256)
    infl = ArnoldiInfluence(m["model"], F.cross_entropy, regularization=damping, rank=rank)
    t0 = time.perf_counter()
    infl.fit(loader)
    return {"solver": f"pydvl-r{rank}", "wall": time.perf_counter() - t0, "setup": time.perf_counter() - t0,
            "solve": 0.0, "passes": None, "rank": rank, "converged": None}


def _train(name: str) -> Dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from tests import problems

    torch.manual_seed(0)
    if name == "logreg":
        p = problems.trained_logreg()
        model, train, val, damping = p.model.float(), *_f32(p.train, p.val), 1e-2
    elif name == "mlp":
        train, val = problems.digits(torch.float32)
        model = problems.fit_adam(problems.tanh_mlp(64), train, 1e-2, epochs=30)
        damping = "auto:0.01"
    elif name == "cnn":
        p = problems.trained_cnn(dtype=torch.float32)
        model, train, val, damping = p.model, p.train, p.val, p.damping
    else:
        raise SystemExit(f"unknown model {name!r}")
    return {"model": model, "train": train, "val": val, "damping": damping}


def _f32(*sets: Any) -> List[Any]:
    from torch.utils.data import TensorDataset

    return [TensorDataset(ds.tensors[0].float(), ds.tensors[1]) for ds in sets]


def _damping(spec: Any) -> Any:
    from lightning_influence import AutoDamping

    if isinstance(spec, str) and spec.startswith("auto:"):
        return AutoDamping(base=float(spec.split(":")[1]))
    return spec


def _diag(res: Any, names: List[str]) -> Any:
    groups = [d for c in res.diagnostics.get("solve", [])[:1] for d in c["items"]] + list(res.diagnostics.get("setup", []))
    for d in groups:
        key = f"{d['source']}/{d['name']}" if d.get("source") else d["name"]
        if key in names:
            return d["value"]
    return None


def child(path: str, solver: str, queries: int, dtype: str) -> Dict[str, Any]:
    """One compute_influence call in this process (its PYTHONPATH picks the tree); the row as a dict."""
    from lightning_influence import compute_influence

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    m = torch.load(path, weights_only=False)
    if "@" in solver:  # a fixed damping given with the solver
        solver, lam = solver.split("@")
        m["damping"] = float(lam)
    t0 = time.perf_counter()
    res = compute_influence(m["model"], m["train"], m["val"], query_indices=list(range(queries)),
                            solver=_settings(solver), damping=_damping(m["damping"]), dtype=getattr(torch, dtype))
    wall = time.perf_counter() - t0
    pre = not solver.startswith("arnoldi") and solver != "cg"
    p = "preconditioner/" if pre else ""
    row = {
        "solver": solver, "wall": wall, "setup": res.timings.get("solver_setup"), "solve": res.timings.get("solve"),
        "passes": _diag(res, [p + "lanczos_passes"]), "rank": _diag(res, [p + "rank"]),
        "converged": _diag(res, [p + "converged"]), "ritz_residual": _diag(res, [p + "ritz_residual"]),
        "damping": res.damping, "iterations": _diag(res, ["iterations", "steps_max"]),
        "hvp_calls": _diag(res, ["hvp_calls"]),
    }
    out = Path(path).with_suffix(f".{solver}.{os.getpid()}.scores.pt")
    torch.save(res.scores, out)
    row["scores"] = str(out)
    return row


def main(argv: List[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["logreg", "mlp", "cnn"])
    ap.add_argument("--solvers", nargs="*", default=list(SOLVERS))
    ap.add_argument("--trees", nargs="*", default=[f"after={ROOT}"], help="label=path of a tree holding lightning_influence")
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    ap.add_argument("--pydvl-python", default=None, help="a Python with pydvl[influence]==0.10.0: also time its "
                    "ArnoldiInfluence(rank=--rank).fit against our ArnoldiSettings(rank=--rank) setup")
    ap.add_argument("--rank", type=int, default=10)
    ap.add_argument("--no-reference", action="store_true", help="skip the CG reference (Pearson is nan)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL_FILE", "SOLVER"), help=argparse.SUPPRESS)
    ap.add_argument("--pydvl-child", nargs=2, metavar=("MODEL_FILE", "DAMPING"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pydvl_child:
        print("ROW " + json.dumps(pydvl_child(args.pydvl_child[0], args.rank, float(args.pydvl_child[1]))))
        return
    if args.child:
        print("ROW " + json.dumps(child(args.child[0], args.child[1], args.queries, args.dtype)))
        return
    sys.path.insert(0, str(ROOT))
    from tests.problems import pearson_rows

    trees = [t.split("=", 1) for t in args.trees]
    tmp = Path(tempfile.mkdtemp(prefix="bench_lanczos_"))
    print(f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; {args.queries} queries; "
          f"{args.dtype}; reference CG (tol 1e-8, float64) from {trees[-1][0]}")
    head = (f"{'model':<7} {'P':>6} {'solver':<11} {'tree':<7} {'passes':>6} {'rank':>5} {'conv':>5} {'setup s':>8} "
            f"{'solve s':>8} {'total s':>8} {'pearson min':>11} {'med':>7}")
    print(head + "\n" + "-" * len(head), flush=True)
    rows = []
    for name in args.models:
        m = _train(name)
        path = tmp / f"{name}.pt"
        torch.save(m, path)
        num_params = sum(p.numel() for p in m["model"].parameters())
        ref = None
        if not args.no_reference:
            ref = torch.load(_spawn(trees[-1][1], path, "cg", args.queries, "float64")["scores"])
        for solver in args.solvers:
            for label, tree in trees:
                row = _spawn(tree, path, solver, args.queries, args.dtype)
                r = pearson_rows(torch.load(row["scores"]), ref) if ref is not None else torch.full((1,), float("nan"))
                row.update(model=name, params=num_params, tree=label, pearson_min=float(r.min()),
                           pearson_median=float(r.median()))
                rows.append(row)
                _print(row)
        if args.pydvl_python:
            # pyDVL at a fixed damping: ours at the damping our run chose (automatic for the MLP)
            lam = next((r["damping"] for r in reversed(rows) if r["model"] == name), None)
            lam = lam if lam is not None else float(str(m["damping"]).split(":")[-1])
            for label, tree in trees:
                row = _spawn(tree, path, f"arnoldi-r{args.rank}@{lam!r}", args.queries, args.dtype)
                row.update(model=name, params=num_params, tree=label, pearson_min=float("nan"), pearson_median=float("nan"))
                rows.append(row)
                _print(row)
            env = dict(os.environ, PYTHONPATH="")
            out = subprocess.run([args.pydvl_python, str(Path(__file__).resolve()), "--pydvl-child", str(path), str(lam),
                                  "--rank", str(args.rank)], env=env, capture_output=True, text=True)
            got = [json.loads(x[4:]) for x in out.stdout.splitlines() if x.startswith("ROW ")]
            if not got:
                print(f"pyDVL failed: {out.stderr[-2000:]}")
                continue
            got[0].update(model=name, params=num_params, tree="pydvl", pearson_min=float("nan"), pearson_median=float("nan"))
            rows.append(got[0])
            _print(got[0])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _print(row: Dict[str, Any]) -> None:
    print(f"{row['model']:<7} {row['params']:>6} {row['solver']:<11} {row['tree']:<7} {row['passes'] or 0:>6} "
          f"{row['rank'] or 0:>5} {str(row['converged'])[:5]:>5} {row['setup']:>8.2f} {row['solve']:>8.2f} "
          f"{row['wall']:>8.2f} {row['pearson_min']:>11.5f} {row['pearson_median']:>7.5f}", flush=True)


def _spawn(tree: str, path: Path, solver: str, queries: int, dtype: str) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), solver, "--queries", str(queries),
           "--dtype", dtype]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(Path(tree).resolve()))
    for line in out.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    raise RuntimeError(f"{solver} in {tree} failed:\n{out.stderr[-3000:]}")


if __name__ == "__main__":
    main()
