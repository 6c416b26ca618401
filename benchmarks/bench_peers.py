"""Peer comparison: other influence-function libraries next to ours, on the same models and queries.

    python benchmarks/bench_peers.py --timeout 240                     # everything (72 min on 2 cores, references cached)
    python benchmarks/bench_peers.py --models logreg mlp cnn --queries 10 cnn=100 --ours none
    python benchmarks/bench_peers.py --models mlp --queries 10 --methods pydvl-cg kronfluence-ekfac --ours cg
    python benchmarks/bench_peers.py --headline-from benchmarks/results_peers.md   # re-render its headline only

Models: the logistic regression, tanh MLP (λ = 0.01, their weight decay) and ReLU CNN (λ = 0.1) of
``tests/problems.py``, trained once and cached under ``benchmarks/.cache/``. Queries: the first Q validation
digits; ``--queries 10 cnn=100`` gives Q = 10 to every model and 100 to the CNN. Scores cover all 1,347
training digits. Dtype: float64 for logreg and MLP (as trained), float32 for the CNN (``--dtype`` changes it).
Every entry of the test zoo (``tests/zoo.py``: BatchNorm CNN, ResNet block, transformer encoder, LSTM, GRU,
RNN, embedding bag, causal LM, regression MLP, ...) is a model too, by its name, trained here with 100
queries, in float32 with its own loss and damping; its reference is our CG to 1e-10 in float64 (the HVPs of
a fused attention kernel or LSTM have no torch-alone form without the package's fallbacks):

    python benchmarks/bench_peers.py --models lstm_tokens regression_mlp --queries 1 10 100

Reference: the exact damped solve ``(H + λI)⁻¹`` with the dense Hessian of the mean training loss
(``torch.func.hessian``) for logreg and MLP, CG to a relative residual of 1e-6 with ``torch.func`` HVPs for
the CNN, all in float64 and computed here with torch alone (independent of the package and of the
peers); cached in ``benchmarks/.cache/`` (``--fresh-reference`` recomputes).

Every method runs in a fresh subprocess (``spawn`` of bench_lissa.py) that reports its wall time (the
peer's fit + scoring, its package already imported, and torch's own lazy imports done: ``warm_torch_imports``) and peak resident memory (``VmHWM``, which includes
the interpreter, torch and the peer's imports: ``base MB`` is the resident size before the method ran).
A peer that is missing, crashes or times out becomes a row saying so. All scores are normalised to this
project's sign (positive = harmful; see peers.py for each peer's convention) and compared per query to
the reference: Pearson r and Spearman ρ (torchmetrics), median and minimum over queries.
Prints a markdown table and writes it to ``benchmarks/results_peers.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from bench_lissa import _problem, peak_rss_mb, rss_mb, spawn  # noqa: E402
from peers import EXPLICIT, EXPLICIT_MAX_PARAMS, MODULES, NOT_INSTALLABLE, PEERS, package_versions  # noqa: E402

from tests import zoo  # noqa: E402

DIGITS = ("logreg", "mlp", "cnn")
MODELS = DIGITS + zoo.NAMES
LABELS = {"logreg": "logreg", "mlp": "tanh MLP", "cnn": "ReLU CNN", **{z: z for z in zoo.NAMES}}
DEFAULT_DTYPE = {"logreg": "float64", "mlp": "float64", "cnn": "float32", **{z: "float32" for z in zoo.NAMES}}
CACHE = os.path.join(HERE, ".cache")
#: queries of a zoo entry built here (its test-suite default is 40-50: Q = 100 needs more)
ZOO_QUERIES = 100


def zoo_entry(name: str) -> "zoo.ZooModel":
    """The zoo entry ``name`` trained with ``ZOO_QUERIES`` query examples (float32 as trained), cached under
    ``benchmarks/.cache/`` so that every worker scores the same weights."""
    path = os.path.join(CACHE, f"zoo_{name}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    entry = zoo.ZOO[name](n_query=ZOO_QUERIES)
    os.makedirs(CACHE, exist_ok=True)
    torch.save(entry, path)
    return entry


def num_params(name: str) -> int:
    model = zoo_entry(name).model if name in zoo.ZOO else _problem(name, torch.float64, CACHE).model
    return sum(p.numel() for p in model.parameters())


def damping_of(name: str) -> float:
    return zoo_entry(name).damping if name in zoo.ZOO else (0.1 if name == "cnn" else 0.01)


def _data(name: str, dtype: torch.dtype):
    """``(model, train, query set, λ)`` of a benchmark model in ``dtype``; a zoo entry's loss is set for the
    peers' adapters (``peers.use_loss``)."""
    import peers

    if name in zoo.ZOO:
        entry = zoo_entry(name).to(dtype)
        peers.use_loss(entry.loss_fn, entry.task)
        model = entry.model.eval()
        for q in model.parameters():
            q.requires_grad_(True)
        return model, entry.train, entry.query, entry.damping
    peers.use_loss(None)
    p = _problem(name, dtype, CACHE)
    cast = lambda ds: torch.utils.data.TensorDataset(ds.tensors[0].to(dtype), ds.tensors[1])  # noqa: E731
    model = p.model.eval()
    for q in model.parameters():
        q.requires_grad_(True)
    return model, cast(p.train), cast(p.val), p.damping


# --------------------------------------------------------------------------------------------- reference
def reference_scores(model, train, val, queries, damping: float, kind: str, tol: float = 1e-6,
                     max_iter: int = 5000, chunk: int = 25) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """``−∇L(z_q)ᵀ (H + λI)⁻¹ ∇L(z_i)`` in float64 with torch alone: dense solve or batched CG."""
    import torch.nn.functional as F
    from torch.func import functional_call, grad, hessian, jvp, vmap

    model = model.double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def unflat(t):
        return {n: c.view(s) for n, c, s in zip(names, t.split(sizes), shapes)}

    def loss(t, x, y):
        return F.cross_entropy(functional_call(model, unflat(t), (x,)), y)

    x, y = train.tensors[0].double(), train.tensors[1]
    idx = torch.as_tensor(list(queries))
    xq, yq = val.tensors[0][idx].double(), val.tensors[1][idx]
    per_example = vmap(grad(lambda t, a, b: loss(t, a[None], b[None])), in_dims=(None, 0, 0))
    g_train = torch.cat([per_example(theta, x[s:s + 256], y[s:s + 256]) for s in range(0, len(x), 256)])
    g_q = per_example(theta, xq, yq)
    info: Dict[str, Any] = {"params": theta.numel()}
    if kind == "exact":
        h = hessian(loss)(theta, x, y)
        a = h + damping * torch.eye(theta.numel(), dtype=h.dtype)
        sol = torch.linalg.solve(a, g_q.T).T
        info["lambda_min_H"] = float(torch.linalg.eigvalsh(h)[0])
    else:
        gfun = grad(loss)

        def hvp(v):
            return jvp(lambda t: gfun(t, x, y), (theta,), (v,))[1] + damping * v

        def apply(vs):
            return torch.cat([vmap(hvp)(vs[s:s + chunk]) for s in range(0, len(vs), chunk)])

        b = g_q
        sol = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rr = (r * r).sum(1)
        bn = b.norm(dim=1)
        active = torch.ones(len(b), dtype=torch.bool)
        it = 0
        while active.any() and it < max_iter:
            ia = active.nonzero().flatten()
            ap = apply(p[ia])
            alpha = rr[ia] / (p[ia] * ap).sum(1)
            sol[ia] += alpha[:, None] * p[ia]
            r[ia] -= alpha[:, None] * ap
            rr_new = (r[ia] * r[ia]).sum(1)
            p[ia] = r[ia] + (rr_new / rr[ia])[:, None] * p[ia]
            rr[ia] = rr_new
            active[ia] = rr_new.sqrt() > tol * bn[ia]
            it += 1
        info.update(cg_iterations=it, max_rel_residual=float((rr.sqrt() / bn).max()))
    return -(sol @ g_train.T), info


# ------------------------------------------------------------------------------------------------ worker
def warm_torch_imports() -> None:
    """Import what torch itself loads lazily on the first ``torch.func.grad`` (``torch._dynamo``, for its
    compiled-autograd guard: about 1.4 s here) and on the first forward-mode product (the jvp
    decompositions), in every worker before its clock starts: one-time costs of torch, not of any library
    (a Lightning process has paid the first already: ``import pytorch_lightning`` imports ``torch._dynamo``)."""
    for module in ("torch._dynamo", "torch._decomp.decompositions_for_jvp"):
        importlib.import_module(module)


def worker(job: Dict[str, Any]) -> Dict[str, Any]:
    torch.set_num_threads(job["threads"])
    warm_torch_imports()
    dtype = getattr(torch, job["dtype"])
    model, train, val, damping = _data(job["model"], dtype)
    queries = job["queries"]
    base = rss_mb()
    settings = ""
    extra: Dict[str, Any] = {}
    if job["kind"] == "reference" and job["model"] in zoo.ZOO:  # our CG to 1e-10 in float64, as bench_zoo.py
        from lightning_influence import CGSettings, compute_influence

        t0 = time.perf_counter()
        res = compute_influence(model, train, val, query_indices=queries, solver=CGSettings(tol=1e-10, max_iter=5000),
                                damping=damping, loss_fn=zoo_entry(job["model"]).loss_fn, dtype=torch.float64)
        scores, extra = res.scores, {}
    elif job["kind"] == "reference":
        t0 = time.perf_counter()
        scores, extra = reference_scores(model, train, val, queries, damping, job["method"])
    elif job["kind"] == "peer":
        importlib.import_module(MODULES[job["method"].split("-")[0]])  # the package's import is not timed
        if not list(model.children()):  # a bare nn.Linear: kronfluence and dattri's EK-FAC hook child modules
            model = torch.nn.Sequential(model)
        t0 = time.perf_counter()
        scores, settings = PEERS[job["method"]](model, train, val, queries, damping)
    else:
        from lightning_influence import compute_influence

        t0 = time.perf_counter()
        solver = ours_solver(job["method"])
        loss_fn = zoo_entry(job["model"]).loss_fn if job["model"] in zoo.ZOO else None
        res = compute_influence(model, train, val, query_indices=queries, solver=solver, damping=damping,
                                loss_fn=loss_fn, dtype=dtype)
        scores, settings = res.scores, f"compute_influence(solver={solver!r}, damping=λ)"
    wall = time.perf_counter() - t0
    scores = torch.as_tensor(scores).detach().double().cpu()
    assert scores.shape == (len(queries), len(train)), f"scores {tuple(scores.shape)}, expected {(len(queries), len(train))}"
    torch.save(scores, job["out"])
    return {"wall_s": wall, "peak_mb": peak_rss_mb(), "base_mb": base, "settings": settings, **extra}


def ours_solver(name: str):
    """Our solver for a benchmark row name: a registry name (``auto`` is the default: the automatic choice)
    or one of the variants below."""
    from lightning_influence import ArnoldiSettings, CGSettings, LissaSettings

    variants = {
        "lissa-plain": LissaSettings(preconditioner=None),  # the default before preconditioning
        "lissa-ekfac": LissaSettings(preconditioner="ekfac"),
        "lissa-rank50": LissaSettings(preconditioner=ArnoldiSettings(rank=50, max_rank=50)),
        "cg-arnoldi": CGSettings(tol=1e-3, preconditioner=ArnoldiSettings(rank=50, max_rank=50)),
        "cg-ekfac": CGSettings(tol=1e-3, preconditioner="ekfac"),
    }
    return variants.get(name, name)


# ------------------------------------------------------------------------------------------------ driver
def correlations(scores: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

    a, b = scores.double().T.contiguous(), ref.double().T.contiguous()  # [N, Q]: one correlation per query
    if a.shape[1] == 1:
        a, b = a[:, 0], b[:, 0]
    r = pearson_corrcoef(a, b).reshape(-1)
    rho = spearman_corrcoef(a, b).reshape(-1)
    return {"r_med": float(r.median()), "r_min": float(r.min()), "rho_med": float(rho.median()),
            "rho_min": float(rho.min())}


def parse_queries(items: List[str], models: List[str]) -> Dict[str, List[int]]:
    default = [int(i) for i in items if "=" not in i] or [10]
    per: Dict[str, List[int]] = {}
    for i in items:
        if "=" in i:
            m, q = i.split("=", 1)
            per.setdefault(m, []).append(int(q))
    return {m: sorted(set(per.get(m, default))) for m in models}


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def get_reference(model: str, q: int, args, threads: int) -> Tuple[Optional[torch.Tensor], Dict[str, Any]]:
    kind = "zoo-cg" if model in zoo.ZOO else "cg" if model == "cnn" else "exact"
    path = os.path.join(CACHE, f"ref_{model}_{kind}.pt")
    if os.path.exists(path) and not args.fresh_reference:
        saved = torch.load(path)
        if saved["scores"].shape[0] >= q:
            return saved["scores"][:q], {**saved["info"], "cached": True}
    out = os.path.join(CACHE, f"ref_{model}_tmp_{os.getpid()}.pt")
    res = spawn({"kind": "reference", "method": kind, "model": model, "dtype": "float64", "queries": list(range(q)),
                 "threads": threads, "out": out}, script=__file__, timeout=args.reference_timeout)
    if "error" in res:
        return None, res
    scores = torch.load(out)
    info = {"kind": kind, **res}
    torch.save({"scores": scores, "info": info}, path)
    os.remove(out)
    return scores, {**info, "cached": False}


#: two median Pearsons this close are equally accurate in the headline (half the printed precision)
R_TIE = 5e-5


def headline(measured: List[Dict[str, Any]], timed_out: Optional[Dict[Tuple[str, int], List[str]]] = None,
             target: float = 0.99) -> List[str]:
    """The headline tables: speed ratios at matched accuracy, from the measured rows.

    * For every model and Q: the fastest of ours and the fastest peer whose median Pearson r reaches
      ``target``, the ratio of their wall times (> 1: ours is faster), our default (``auto``) for
      reference, and the methods that timed out there (``timed_out``: ``{(model, Q): [names]}``).
    * For every peer row: the fastest of our rows at least as accurate (median r ≥ the peer's, to
      ``R_TIE``: rows equal to the printed digits tie), and the ratio peer wall / our wall; "none" when no
      row of ours reached the peer's accuracy.
    """
    if not measured:
        return []
    timed_out = timed_out or {}
    out = ["## Headline: wall-time ratios at matched accuracy", "",
           f"Fastest method reaching median Pearson r ≥ {target} against the reference (ratio = peer s / ours s; "
           "> 1 means ours is faster); our default solver (`auto`) for reference; methods that timed out:", "",
           "| model | Q | fastest of ours ≥ target | s | fastest peer ≥ target | s | ratio | default `auto`: r, s "
           "| timed out |", "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["q"]) for r in measured}, key=lambda k: (MODELS.index(k[0]), k[1]))

    def fastest(rows):
        return min(rows, key=lambda r: r["wall"]) if rows else None

    def cell(r):
        return f"{r['method']} | {r['wall']:.1f}" if r else "none | –"

    for m, q in keys:
        rows = [r for r in measured if (r["model"], r["q"]) == (m, q)]
        here = [r for r in rows if r["r_med"] >= target]
        o, p = fastest([r for r in here if r["ours"]]), fastest([r for r in here if not r["ours"]])
        ratio = f"{p['wall'] / o['wall']:.1f}×" if o and p else "–"
        d = next((r for r in rows if r["method"] == "ours: auto"), None)
        default = f"{d['r_med']:.4f}, {d['wall']:.1f}" if d else "–"
        out.append(f"| {LABELS[m]} | {q} | {cell(o)} | {cell(p)} | {ratio} | {default} | "
                   f"{', '.join(timed_out.get((m, q), [])) or '–'} |")
    out += ["", "Every peer row against the fastest row of ours at least as accurate (median r ≥ the peer's):", "",
            "| model | Q | peer | peer r | peer s | ours (≥ r) | our r | our s | ratio |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in measured if not r["ours"]), key=lambda r: (MODELS.index(r["model"]), r["q"])):
        head = f"| {LABELS[r['model']]} | {r['q']} | {r['method']} | {r['r_med']:.4f} | {r['wall']:.1f} | "
        if r["r_med"] != r["r_med"]:  # NaN: the peer's scores were constant for a query
            out.append(head + "r is NaN (constant scores) | | | |")
            continue
        o = fastest([x for x in measured if x["ours"] and (x["model"], x["q"]) == (r["model"], r["q"])
                     and x["r_med"] >= r["r_med"] - R_TIE])
        if o is None:
            out.append(head + "none as accurate | | | |")
        else:
            out.append(head + f"{o['method']} | {o['r_med']:.4f} | {o['wall']:.1f} | {r['wall'] / o['wall']:.1f}× |")
    return out + [""]


def rows_of(path: str) -> Tuple[List[Dict[str, Any]], Dict[Tuple[str, int], List[str]]]:
    """The measured rows and timeouts of a results file this script wrote (for ``--headline-from``)."""
    measured: List[Dict[str, Any]] = []
    timed_out: Dict[Tuple[str, int], List[str]] = {}
    with open(path) as f:
        for line in f:
            cols = [c.strip() for c in line.strip().strip("|").split("|")]
            model = next((m for m in MODELS if cols[0].startswith(LABELS[m] + " (")), None)
            if model is None or len(cols) < 4 or not cols[1].isdigit():
                continue
            q, name = int(cols[1]), cols[2]
            if "timeout after" in cols[3] or "timed out at" in cols[3]:
                timed_out.setdefault((model, q), []).append(name)
                continue
            try:
                nums = [float(c) for c in cols[3:9]]
            except ValueError:  # a row saying skipped / failed / not installable
                continue
            measured.append({"model": model, "q": q, "method": name, "ours": name.startswith("ours: "),
                             "r_med": nums[0], "r_min": nums[1], "rho_med": nums[2], "rho_min": nums[3],
                             "wall": nums[4], "peak": nums[5]})
    return measured, timed_out


def rewrite_headline(path: str) -> None:
    """Replace the headline section of a results file by one rendered from its rows."""
    measured, timed_out = rows_of(path)
    with open(path) as f:
        lines = f.read().split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith("## Headline")), None)
    if start is None:  # no headline yet: put it after the header bullets
        start = end = next(i for i, line in enumerate(lines) if line.startswith("* reference") or line.startswith("| "))
    else:
        end = next(i for i, line in enumerate(lines) if i > start and (line.startswith("* reference") or
                                                                          line.startswith("| model")))
    lines[start:end] = headline(measured, timed_out)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--models", nargs="*", default=list(DIGITS), choices=MODELS + ("zoo",),
                    help="digits models and zoo entries by name; 'zoo' = every zoo entry (default: the digits models)")
    ap.add_argument("--queries", nargs="*", default=["1", "10", "100"],
                    help="Q values (first Q validation digits); MODEL=Q for one model only, e.g. 10 cnn=100")
    ap.add_argument("--methods", nargs="*", default=list(PEERS) + list(NOT_INSTALLABLE),
                    help="peer methods (default: all of %s)" % ", ".join(list(PEERS) + list(NOT_INSTALLABLE)))
    ap.add_argument("--ours", default="auto,exact,cg,cg-arnoldi,arnoldi,lissa,ekfac,kfac",
                    help="comma-separated solver names of ours ('none' or '' for no rows of ours): registry names "
                         "or lissa-plain (no preconditioner: the previous default), lissa-ekfac, lissa-rank50, cg-arnoldi, "
                         "cg-ekfac")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float64"],
                    help="working dtype of every method (auto: float64 logreg/MLP, float32 CNN)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per method (its subprocess is killed after)")
    ap.add_argument("--reference-timeout", type=float, default=3600.0)
    ap.add_argument("--fresh-reference", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results_peers.md"))
    ap.add_argument("--headline-from", metavar="FILE",
                    help="run nothing: re-render the headline of a results file from its rows")
    args = ap.parse_args()
    if args.headline_from:
        rewrite_headline(args.headline_from)
        return
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    os.makedirs(CACHE, exist_ok=True)
    args.models = [z for m in args.models for z in (zoo.NAMES if m == "zoo" else (m,))]
    ours = [s.strip() for s in args.ours.split(",") if s.strip() and s.strip() != "none"]
    plan = parse_queries(args.queries, args.models)
    n_params = {m: num_params(m) for m in args.models}  # trains each once, in this process (cached for the workers)

    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    head = ["# Peer comparison: influence scores against an exact reference", "",
            f"* command: `{cmd}`",
            f"* date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
            f"* machine: {machine()}; {args.threads} torch threads; no GPU. Timings are noisy (shared cores).",
            f"* torch {torch.__version__}; " + ", ".join(f"{k} {v}" for k, v in package_versions().items()),
            "* scores over all training examples (1,347 digits for logreg/MLP/CNN), sign normalised to ours (positive = harmful); r = Pearson,"
            " ρ = Spearman per query against the reference, median and min over queries; wall = fit + scoring"
            " (package import and torch's lazy imports excluded); peak = VmHWM of the method's own process (base = resident before it ran)",
            ""]
    print("\n".join(head), flush=True)
    rows = ["| model | Q | method | median r | min r | median ρ | min ρ | wall s | peak MB | base MB | settings / notes |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    refs_text = []

    measured: List[Dict[str, Any]] = []  # rows with numbers, for the headline
    timed_out: Dict[Tuple[str, int], List[str]] = {}
    gave_up: Dict[Tuple[str, str], str] = {}  # (model, method) -> why, once it timed out or failed at a smaller Q

    def write(final: bool) -> None:  # after every row, so that a stopped run keeps what it measured
        note = [] if final else ["* **partial**: the run was still going (or was stopped) when this was written", ""]
        text = "\n".join(head + note + headline(measured, timed_out) + refs_text + [""] + rows) + "\n"
        with open(args.out, "w") as f:
            f.write(text)

    def emit(row: str) -> None:
        rows.append(row)
        print(row, flush=True)
        write(final=False)

    for m in args.models:
        dtype = DEFAULT_DTYPE[m] if args.dtype == "auto" else args.dtype
        for q in plan[m]:
            ref, rinfo = get_reference(m, q, args, args.threads)
            label = f"{LABELS[m]} ({n_params[m]:,} params, λ={damping_of(m):g}, {dtype})"
            if ref is None:
                emit(f"| {label} | {q} | reference | failed: {rinfo['error'][:200]} |||||||| ")
                continue
            how = ("exact dense solve, float64" if rinfo["kind"] == "exact" else
                   "our CG to a relative residual of 1e-10 in float64" if rinfo["kind"] == "zoo-cg"
                   else f"CG to 1e-6 in float64 ({rinfo.get('cg_iterations')} iterations)")
            cached = " (cached)" if rinfo.get("cached") else ""
            cost = (f"{rinfo['wall_s']:.1f} s, {rinfo['peak_mb']:.0f} MB peak" if "wall_s" in rinfo else
                    "cost not recorded (cached by bench_lissa.py)")
            refs_text.append(f"* reference {LABELS[m]}, Q={q}: {how}; {cost}{cached}")
            jobs = [("peer", meth) for meth in args.methods] + [("ours", s) for s in ours]
            for kind, meth in jobs:
                name = meth if kind == "peer" else f"ours: {meth}"
                if kind == "peer" and meth in NOT_INSTALLABLE:
                    emit(f"| {label} | {q} | {name} | not installable: {NOT_INSTALLABLE[meth]} |||||||| ")
                    continue
                if kind == "peer" and meth not in PEERS:
                    emit(f"| {label} | {q} | {name} | unknown method |||||||| ")
                    continue
                if kind == "peer" and meth in EXPLICIT and n_params[m] > EXPLICIT_MAX_PARAMS:
                    emit(f"| {label} | {q} | {name} | skipped: explicit {n_params[m]:,}² Hessian "
                         f"(> {EXPLICIT_MAX_PARAMS:,} params) |||||||| ")
                    continue
                if (m, name) in gave_up:
                    emit(f"| {label} | {q} | {name} | skipped: {gave_up[(m, name)]} |||||||| ")
                    if gave_up[(m, name)].startswith("timed out"):
                        timed_out.setdefault((m, q), []).append(name)
                    continue
                out = os.path.join(CACHE, f"scores_tmp_{os.getpid()}.pt")  # one per driver: runs may overlap
                res = spawn({"kind": kind, "method": meth, "model": m, "dtype": dtype, "queries": list(range(q)),
                             "threads": args.threads, "out": out}, script=__file__, timeout=args.timeout)
                if "error" in res and kind == "peer" and dtype == "float64" and "dtype" in res["error"]:
                    # the peer assumes float32 somewhere: measure it in float32 and say so
                    f64 = res["error"]
                    res = spawn({"kind": kind, "method": meth, "model": m, "dtype": "float32",
                                 "queries": list(range(q)), "threads": args.threads, "out": out},
                                script=__file__, timeout=args.timeout)
                    if "error" not in res:
                        res["settings"] += f"; **run in float32**: float64 fails ({f64[:90]})"
                if "error" in res:
                    what = "not available" if kind == "ours" else "failed"
                    err = res["error"].replace("|", "/")[:220]
                    emit(f"| {label} | {q} | {name} | {what}: {err} |||||||| ")
                    gave_up[(m, name)] = f"{'timed out' if 'timeout' in err else what} at Q={q}"
                    if "timeout" in err:
                        timed_out.setdefault((m, q), []).append(name)
                    continue
                c = correlations(torch.load(out), ref)
                os.remove(out)
                measured.append({"model": m, "q": q, "method": name, "ours": kind == "ours", "wall": res["wall_s"],
                                 "peak": res["peak_mb"], **c})
                emit(f"| {label} | {q} | {name} | {c['r_med']:.4f} | {c['r_min']:.4f} | {c['rho_med']:.4f} | "
                     f"{c['rho_min']:.4f} | {res['wall_s']:.1f} | {res['peak_mb']:.0f} | {res['base_mb']:.0f} | "
                     f"{res['settings']} |")
    write(final=True)
    print("\n" + "\n".join(headline(measured, timed_out) + refs_text))
    print(f"\nwritten to {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
