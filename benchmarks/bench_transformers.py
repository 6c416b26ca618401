"""Transformers side by side with kronfluence (issue #22): a text classifier and a causal LM.

    OMP_NUM_THREADS=1 PYTHONPATH=. /work/venv-peers/bin/python benchmarks/bench_transformers.py            # small
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_transformers.py --size issue                   # the issue's sizes
    python benchmarks/bench_transformers.py --size tiny --no-peers --inline --out /tmp/t.md               # the smoke test

Models (seeded, built and trained once in the driver, cached in ``benchmarks/.cache/``):

* **classifier**: token embedding + learned positions, ``nn.TransformerEncoder`` of 2 pre-norm
  ``nn.TransformerEncoderLayer(batch_first=True, dropout=0)``, mean pooling, linear head. Task: uniform tokens, the
  label is which of tokens 0/1/2 occurs most (``tests/zoo.py``'s majority task); **10% of the training labels are
  flipped** to another class (the planted flips).
* **lm**: embedding + positions, 2 causal pre-norm encoder layers (``is_causal=True``), final LayerNorm, LM head;
  seeded Markov-grammar text (``tests/zoo.py``'s grammar: every token has two successors with probabilities
  0.75 / 0.2, plus 0.05 spread uniformly). Loss per sequence: the sum of its token cross-entropies.

Both are trained by minibatch Adam for a few epochs on ``mean loss + wd/2·‖θ‖²`` (coupled L2, so the damping has
a base ``wd``). The fixed damping ``λ`` of every method is chosen by the reference run: our CG (``CGSettings(tol)``,
Arnoldi-preconditioned, all parameters) with ``damping=AutoDamping(base=wd)``, i.e. the weight decay or the smallest
damping that makes ``H + λI`` positive definite with a margin, whichever is larger. Every other method then runs at
that ``λ``: ours ``ekfac``, ``kfac`` (magnitude-calibrated, the defaults) and ``EKFACSettings(calibrate=False)``,
``EKFACSettings(calibrate="scalar")`` (one magnitude scale for all parameters, the rule before the two-group one),
``ekfac-tracked`` (our EK-FAC attributing only to the layers kronfluence tracks, to separate coverage from the
factorisation), and kronfluence 1.0's EK-FAC and K-FAC (``damping_factor=λ``, sign negated as in ``peers.py``).
The reference is cached in ``benchmarks/.cache/`` (``--fresh-reference`` recomputes); ``--damping`` fixes λ and
``--plain-cg`` drops the preconditioner (the smoke test's tiny run).

kronfluence hooks only ``nn.Linear``/``nn.Conv2d`` modules whose forward is called; ``nn.MultiheadAttention`` calls
``F.multi_head_attention_forward`` with its raw ``in_proj_weight`` and ``out_proj.weight``, so neither is seen (a
tracked ``out_proj`` receives no activations and its factors fail). ``get_influence_tracked_modules`` therefore
names every ``nn.Linear`` except the attention's ``out_proj``: the feed-forward layers and the head. Its coverage
= tracked parameters / all parameters (embedding, positions, attention and LayerNorms are not attributed: their
gradients are left out of its scores). Ours factors Linear, Embedding and the attention's packed in-projection
(with ``out_proj`` through the Linear adapter) and gives the rest (positions, LayerNorms, ...) a diagonal
curvature: ``kronecker_coverage`` and ``diagonal_params`` of ``res.setup_diagnostics()``.

Per model × method: median and min per-query Pearson r of the scores over all training examples against the CG
reference, mean |score| over the reference's (magnitude; 1 = right size), coverage, wall seconds (the method's own
call(s), imports excluded), peak RSS (``VmHWM`` of the method's fresh process). Classifier only: **planted-flip
recovery**, how many of the k flipped examples are among the top k by self-influence (ours: ``self_influence=True``,
ranked by ``−I(z_i, z_i)``; kronfluence: ``compute_self_scores``) and, as the baseline, by training loss. The
classifier's rows of ours and kronfluence include the self-influence pass in their wall time (the CG reference does
not compute self-influence). Prints a markdown table and writes it to ``benchmarks/results_transformers.md``
(``--out``). A method that fails or times out is a row saying so; the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import shlex
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from bench_lissa import peak_rss_mb, rss_mb, spawn  # noqa: E402
from tests.zoo import (TransformerClassifier, _attention_backend, _majority_tokens, _markov_sequences,  # noqa: E402
                       _markov_transitions, lm_sequence_loss)

CACHE = os.path.join(HERE, ".cache")
MODELS = ("classifier", "lm")
OURS = ("ekfac", "kfac", "ekfac-uncalibrated", "ekfac-scalar", "ekfac-tracked", "ekfac-true-fisher")
PEER_METHODS = ("kronfluence-ekfac", "kronfluence-kfac")

#: per size and model: data and architecture. ``classifier``: vocab, seq_len, d_model, heads, ff, n_train;
#: ``lm``: vocab, seq_len (inputs; sequences are one longer), d_model, heads, ff, n_train.
SIZES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "tiny": {"classifier": dict(vocab=10, seq_len=8, d=8, heads=2, ff=16, n_train=120, epochs=20, queries=4),
             "lm": dict(vocab=8, seq_len=8, d=8, heads=2, ff=16, n_train=80, epochs=20, queries=4)},
    "small": {"classifier": dict(vocab=20, seq_len=16, d=32, heads=4, ff=64, n_train=1000, epochs=8, queries=10),
              "lm": dict(vocab=16, seq_len=16, d=40, heads=4, ff=80, n_train=600, epochs=8, queries=10)},
    "issue": {"classifier": dict(vocab=32, seq_len=24, d=80, heads=4, ff=160, n_train=4000, epochs=5, queries=10),
              "lm": dict(vocab=32, seq_len=24, d=112, heads=4, ff=224, n_train=2000, epochs=5, queries=10)},
}
WEIGHT_DECAY = 1e-3
FLIP_FRACTION = 0.1
N_CLASSES = 3
N_QUERY_POOL = 200


class CausalLM2(nn.Module):
    """Embedding + learned positions, a stack of causal pre-norm ``nn.TransformerEncoderLayer``s (batch first,
    no dropout), final LayerNorm and an LM head: ``[B, T]`` tokens → ``[B, T, V]`` logits."""

    def __init__(self, vocab: int, seq_len: int, d_model: int, nhead: int, ff: int, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.1 * torch.randn(seq_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab)
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)
        self.math_attention = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t]
        with _attention_backend(self.math_attention):
            h = self.encoder(h, mask=self.causal_mask[:t, :t], is_causal=True)
        return self.lm_head(self.norm(h))


class SampledFisherLM(nn.Module):
    """The LM with ``influence_loss(batch, sample=False)``: the same per-sequence loss, and with ``sample=True``
    (the package's Fisher passes) next tokens drawn from the model's own predictive distribution, so EK-FAC/K-FAC
    use the true Fisher, as kronfluence does, instead of the empirical one that ``loss_fn=`` gives."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.inner(tokens)

    def influence_loss(self, batch: Any, sample: bool = False) -> torch.Tensor:
        x, y = batch
        logits = self.inner(x)
        if sample:
            with torch.no_grad():
                y = torch.distributions.Categorical(logits=logits.detach()).sample()
        return lm_sequence_loss(logits, y)


def make_model(name: str, cfg: Dict[str, Any]) -> nn.Module:
    if name == "classifier":
        return TransformerClassifier(cfg["vocab"], cfg["seq_len"], N_CLASSES, d_model=cfg["d"], nhead=cfg["heads"],
                                     ff=cfg["ff"], layers=2)
    return CausalLM2(cfg["vocab"], cfg["seq_len"], cfg["d"], cfg["heads"], cfg["ff"], layers=2)


def per_example_loss(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none") if name == "classifier" else lm_sequence_loss(out, y)


def build(name: str, cfg: Dict[str, Any], seed: int = 0) -> Dict[str, Any]:
    """Seeded data, model and Adam training; returns what the workers load (state dict, data, flips, info)."""
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        n = cfg["n_train"]
        flipped = torch.zeros(0, dtype=torch.long)
        if name == "classifier":
            x, y = _majority_tokens(gen, n + N_QUERY_POOL, cfg["seq_len"], cfg["vocab"], N_CLASSES)
            xt, yt, xq, yq = x[:n], y[:n].clone(), x[n:], y[n:]
            k = int(round(FLIP_FRACTION * n))
            flipped = torch.randperm(n, generator=gen)[:k].sort().values
            yt[flipped] = (yt[flipped] + torch.randint(1, N_CLASSES, (k,), generator=gen)) % N_CLASSES
        else:
            trans = _markov_transitions(gen, cfg["vocab"])
            seqs = _markov_sequences(gen, trans, n + N_QUERY_POOL, cfg["seq_len"] + 1)
            x, y = seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()
            xt, yt, xq, yq = x[:n], y[:n], x[n:], y[n:]
        model = make_model(name, cfg)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(cfg["epochs"]):
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, 32):
                b = perm[s:s + 32]
                opt.zero_grad()
                loss = per_example_loss(name, model(xt[b]), yt[b]).mean()
                loss = loss + 0.5 * WEIGHT_DECAY * sum((p * p).sum() for p in model.parameters())
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            out, outq = model(xt), model(xq)
            losses = per_example_loss(name, out, yt)
            info = {"train_loss": float(losses.mean()), "query_loss": float(per_example_loss(name, outq, yq).mean()),
                    "build_s": time.perf_counter() - t0}
            if name == "classifier":
                clean = torch.ones(n, dtype=torch.bool)
                clean[flipped] = False
                info.update(train_acc=float((out.argmax(-1) == yt).float().mean()),
                            flipped_fit=float((out.argmax(-1) == yt)[flipped].float().mean()),
                            clean_acc=float((out.argmax(-1) == yt)[clean].float().mean()),
                            query_acc=float((outq.argmax(-1) == yq).float().mean()))
            else:
                info.update(train_token_acc=float((out.argmax(-1) == yt).float().mean()),
                            query_token_acc=float((outq.argmax(-1) == yq).float().mean()))
    return {"state": model.state_dict(), "train": (xt, yt), "query": (xq, yq), "flipped": flipped,
            "train_losses": losses, "info": info, "cfg": cfg, "name": name,
            "params": sum(p.numel() for p in model.parameters())}


def load(path: str) -> Tuple[nn.Module, TensorDataset, TensorDataset, Dict[str, Any]]:
    b = torch.load(path, weights_only=False)
    model = make_model(b["name"], b["cfg"])
    model.load_state_dict(b["state"])
    model.eval()
    return model, TensorDataset(*b["train"]), TensorDataset(*b["query"]), b


# --------------------------------------------------------------------------------------------------- methods
def ours(job: Dict[str, Any], model, train, query, b) -> Dict[str, Any]:
    from lightning_influence import ArnoldiSettings, AutoDamping, CGSettings, EKFACSettings, compute_influence

    name, method = b["name"], job["method"]
    loss_fn = None if name == "classifier" else lm_sequence_loss
    queries = job["queries"]
    self_inf = name == "classifier" and method != "cg"
    if method == "cg":
        solver = CGSettings(tol=job["tol"], preconditioner=ArnoldiSettings())
        damping: Any = AutoDamping(base=WEIGHT_DECAY) if job["damping"] is None else job["damping"]
        if job.get("plain_cg"):
            solver = CGSettings(tol=job["tol"])
    else:
        solver = {"ekfac": "ekfac", "kfac": "kfac", "ekfac-uncalibrated": EKFACSettings(calibrate=False),
                  "ekfac-scalar": EKFACSettings(calibrate="scalar"), "ekfac-tracked": "ekfac",
                  "ekfac-true-fisher": "ekfac"}[method]
        damping = job["damping"]
    if method == "ekfac-true-fisher":
        if name != "lm":
            raise ValueError("ekfac-true-fisher is for the LM only (the classifier's default loss already "
                             "uses the true Fisher)")
        model, loss_fn = SampledFisherLM(model), None
    # ekfac-tracked: attribute to kronfluence's tracked modules only (its coverage), to separate the effect of
    # coverage from the effect of the factorisation
    params = kronfluence_tracked(model) if method == "ekfac-tracked" else None
    t0 = time.perf_counter()
    res = compute_influence(model, train, query, query_indices=queries, loss_fn=loss_fn, solver=solver,
                            damping=damping, self_influence=self_inf, dtype=getattr(torch, job["dtype"]),
                            params=params)
    wall = time.perf_counter() - t0
    setup = {d.name: d.value for d in res.setup_diagnostics()}
    shown = {"cg": f"CGSettings(tol={job['tol']:g}" + (")" if job.get("plain_cg") else ", preconditioner=ArnoldiSettings())"),
             "ekfac-uncalibrated": "EKFACSettings(calibrate=False)",
             "ekfac-scalar": "EKFACSettings(calibrate='scalar')",
             "ekfac-tracked": "'ekfac', params=those layers",
             "ekfac-true-fisher": "'ekfac', model.influence_loss(batch, sample) drawing next tokens"}.get(method, repr(method))
    out = {"wall_s": wall, "scores": res.scores, "damping": float(res.settings["damping"]),
           "settings": f"solver={shown}"}
    if method == "cg":
        out["coverage"] = 1.0
        out["treatment"] = "all parameters, exact HVPs"
        tot = {d.name: d.value for d in res.total_diagnostics()}
        out["settings"] += f"; hvp_calls={tot.get('hvp_calls')}"
        for key in ("lambda_min_estimate", "lambda_max_estimate"):
            if key in res.settings:
                out[key] = res.settings[key]
    else:
        out["coverage"] = float(setup["kronecker_coverage"])
        out["treatment"] = "diagonal: " + _compact(str(setup["diagonal_params"])).replace("inner.", "")
        out["settings"] += f"; fisher={setup.get('fisher')}"
        if params is not None:
            total = sum(p.numel() for p in model.parameters())
            attributed = sum(p.numel() for n in params for p in model.get_submodule(n).parameters())
            out["coverage"] *= attributed / total
            out["treatment"] = (f"only kronfluence's {len(params)} tracked Linear layers attributed "
                                f"(the rest left out, as there)")
        if "magnitude_scale" in setup:
            out["settings"] += f"; α={float(setup['magnitude_scale']):.3g}"
    if self_inf:
        out["self"] = -res.self_influence  # ≤ 0 in our sign: larger −I = more self-influential
    return out


def kronfluence_tracked(model: nn.Module) -> List[str]:
    """The modules kronfluence can track here: every ``nn.Linear``/``nn.Conv2d`` whose forward is called, i.e. all
    but the attention's ``out_proj`` (``F.multi_head_attention_forward`` uses its weight directly)."""
    mha_out = {f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in mha_out]


def kronfluence_method(job: Dict[str, Any], model, train, query, b) -> Dict[str, Any]:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    name = b["name"]
    strategy = job["method"].split("-", 1)[1]
    tracked = kronfluence_tracked(model)
    total = sum(p.numel() for p in model.parameters())
    covered = sum(p.numel() for n in tracked for p in model.get_submodule(n).parameters())

    class Seq(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            flat = logits.reshape(-1, logits.shape[-1])
            y = y.reshape(-1)
            if sample:  # true Fisher: labels drawn from the model (per token for the LM)
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(flat.detach(), -1), 1).flatten()
            return F.cross_entropy(flat, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            logits = model(x)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")

        def get_influence_tracked_modules(self):
            return tracked

    dt = next(model.parameters()).dtype
    task = Seq()
    t0 = time.perf_counter()
    model = prepare_model(model, task)
    out_dir = tempfile.mkdtemp(prefix="kronfluence_")
    analyzer = Analyzer(analysis_name="bench", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=out_dir)
    fa = FactorArguments(strategy=strategy, activation_covariance_dtype=dt, gradient_covariance_dtype=dt,
                         per_sample_gradient_dtype=dt, lambda_dtype=dt)
    analyzer.fit_all_factors(factors_name="f", dataset=train, per_device_batch_size=128, factor_args=fa,
                             overwrite_output_dir=True)
    sa = ScoreArguments(damping_factor=job["damping"], per_sample_gradient_dtype=dt, precondition_dtype=dt,
                        score_dtype=dt)
    q = list(job["queries"])
    analyzer.compute_pairwise_scores(scores_name="s", factors_name="f", query_dataset=torch.utils.data.Subset(query, q),
                                     train_dataset=train, per_device_query_batch_size=len(q),
                                     per_device_train_batch_size=256, score_args=sa, overwrite_output_dir=True)
    scores = -analyzer.load_pairwise_scores("s")["all_modules"].detach()
    out: Dict[str, Any] = {}
    if name == "classifier":
        analyzer.compute_self_scores(scores_name="self", factors_name="f", train_dataset=train,
                                     per_device_train_batch_size=256, score_args=sa, overwrite_output_dir=True)
        out["self"] = analyzer.load_self_scores("self")["all_modules"].detach()  # +gᵀ(F̂ + λI)⁻¹g
    wall = time.perf_counter() - t0
    out.update(wall_s=wall, scores=scores, coverage=covered / total, damping=job["damping"],
               treatment=f"not attributed: all but the {len(tracked)} tracked Linear layers",
               settings=f"strategy={strategy}, damping_factor=λ, sampled-label Fisher, tracked = {len(tracked)} "
                        "nn.Linear (not the attention's out_proj)")
    return out


def _compact(names: str) -> str:
    """``pos, a.norm1.weight, a.norm1.bias, …`` → ``pos, 8 LayerNorm tensors``."""
    parts = [p.strip() for p in names.split(",") if p.strip()]
    norms = [p for p in parts if "norm" in p.rsplit(".", 2)[-2 if "." in p else -1]]
    rest = [p for p in parts if p not in norms]
    return ", ".join(rest + ([f"{len(norms)} LayerNorm tensors"] if norms else [])) or "(none)"


def worker(job: Dict[str, Any]) -> Dict[str, Any]:
    torch.set_num_threads(job["threads"])
    model, train, query, b = load(job["data"])
    model = model.to(getattr(torch, job["dtype"]))
    if job["method"].startswith("kronfluence"):
        importlib.import_module("kronfluence")  # the package's import is not timed
    else:  # nor the framework ours runs in: Lightning imports torch._dynamo, which torch.func's first grad would
        importlib.import_module("pytorch_lightning")  # otherwise import inside the timed call (ours() imports ours)
    base = rss_mb()
    fn = kronfluence_method if job["method"].startswith("kronfluence") else ours
    out = fn(job, model, train, query, b)
    torch.save({k: out.pop(k) for k in ("scores", "self") if k in out}, job["out"])
    return {**out, "peak_mb": peak_rss_mb(), "base_mb": base}


def run_job(job: Dict[str, Any], inline: bool, timeout: float) -> Dict[str, Any]:
    if not inline:
        return spawn(job, script=__file__, timeout=timeout)
    try:
        return json.loads(json.dumps(worker(job)))
    except Exception as err:  # noqa: BLE001 - a failed method is a row saying so
        return {"error": f"{type(err).__name__}: {err}"}


# ---------------------------------------------------------------------------------------------------- driver
def correlations(scores: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    a, b = scores.double(), ref.double()
    ac, bc = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = F.cosine_similarity(ac, bc, dim=1)
    return {"r_med": float(r.median()), "r_min": float(r.min()),
            "ratio": float(a.abs().mean() / b.abs().mean())}


def recovered(values: torch.Tensor, flipped: torch.Tensor) -> int:
    k = len(flipped)
    top = set(values.double().topk(k).indices.tolist())
    return len(top & set(flipped.tolist()))


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = [f"torch {torch.__version__}"]
    for dist in ("lightning-influence", "kronfluence"):
        try:
            out.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            out.append(f"{dist} (not installed)" if dist == "kronfluence" else f"{dist} (source tree)")
    try:
        import subprocess

        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        out.append(f"commit {commit.stdout.strip()}")
    except OSError:
        pass
    return ", ".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    ap.add_argument("--ours", default=",".join(OURS), help="comma-separated: " + ", ".join(OURS))
    ap.add_argument("--no-peers", action="store_true", help="skip kronfluence (also skipped when not importable)")
    ap.add_argument("--tol", type=float, default=1e-6, help="the CG reference's relative residual")
    ap.add_argument("--damping", type=float, default=None,
                    help="fixed λ for every method (default: the reference's AutoDamping(base=wd))")
    ap.add_argument("--plain-cg", action="store_true", help="reference CG without the Arnoldi preconditioner")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the CG reference (times and memory only; needs --damping)")
    ap.add_argument("--fresh-reference", action="store_true", help="recompute the cached CG reference")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per method (its subprocess is killed)")
    ap.add_argument("--inline", action="store_true", help="run every method in this process (tests; no fresh RSS)")
    ap.add_argument("--load", default="", help="load note printed with the protocol (e.g. 'load average 4')")
    ap.add_argument("--out", default=os.path.join(HERE, "results_transformers.md"))
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    if args.no_reference and args.damping is None:
        ap.error("--no-reference needs --damping (the λ every method runs at)")
    torch.set_num_threads(args.threads)
    cache = CACHE if not args.inline else tempfile.mkdtemp(prefix="bench_tf_")
    os.makedirs(cache, exist_ok=True)
    ours_methods = [m.strip() for m in args.ours.split(",") if m.strip() and m.strip() != "none"]
    peers: List[str] = []
    peer_note = ""
    if not args.no_peers:
        try:
            importlib.import_module("kronfluence")
            peers = list(PEER_METHODS)
        except ImportError as err:
            peer_note = f"kronfluence not importable ({err}): its rows are skipped"
    elif args.no_peers:
        peer_note = "kronfluence skipped (--no-peers)"

    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:]))
    try:
        load_avg = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        load_avg = "?"
    head = ["# Transformers side by side with kronfluence (`bench_transformers.py`)", "",
            f"* command: `{cmd}`",
            f"* date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
            f"{os.cpu_count()} CPUs, {args.threads} torch thread(s); load average at start {load_avg}"
            + (f" ({args.load})" if args.load else "") + "; timings are noisy (shared cores)",
            f"* {versions()}",
            f"* training: minibatch Adam (lr 3e-3, batch 32) on mean loss + wd/2·‖θ‖², wd = {WEIGHT_DECAY:g}; "
            f"influence maths in {args.dtype}; reference = our CG (tol {args.tol:g}, "
            + ("no preconditioner" if args.plain_cg else "Arnoldi-preconditioned") + ", all parameters) at "
            + (f"λ = {args.damping:g} (fixed)" if args.damping is not None else "λ = AutoDamping(base=wd)")
            + ", and every method at that λ",
            "* r = Pearson per query over all training examples against the reference (median / min); |s| ratio = "
            "mean |score| / the reference's; coverage = Kronecker-factored (ours) or tracked (kronfluence) "
            "parameters / all; wall = the method's call(s); peak = VmHWM of its own process (base = before it ran)"]
    head.append("* imports untimed: kronfluence's; ours and Lightning's (the framework it runs in; Lightning imports "
                "torch._dynamo, which torch.func's first grad imports otherwise, about 1 s inside the timed call)")
    if args.no_reference:
        head.append(f"* no reference (--no-reference): every method at λ = {args.damping:g}; r and |s| not measured")
    if peer_note:
        head.append(f"* {peer_note}")
    rows = ["| model | method | median r | min r | \\|s\\| ratio | coverage | flips found (self-infl. / loss) | "
            "wall s | peak MB | base MB | rest of the parameters / settings |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    protocol: List[str] = []
    results: List[Dict[str, Any]] = []

    def write() -> None:
        with open(args.out, "w") as f:
            f.write("\n".join(head + protocol + [""] + rows) + "\n")

    def emit(row: str) -> None:
        rows.append(row)
        print(row, flush=True)
        write()

    print("\n".join(head), flush=True)
    for name in args.models:
        cfg = SIZES[args.size][name]
        data = os.path.join(cache, f"transformers_{name}_{args.size}.pt")
        if not os.path.exists(data):
            torch.save(build(name, cfg), data)
        b = torch.load(data, weights_only=False)
        info = b["info"]
        queries = list(range(cfg["queries"]))
        label = f"{name} ({b['params']:,} params, {cfg['n_train']:,} seqs)"
        fit = ", ".join(f"{k} {v:.3g}" for k, v in info.items() if k != "build_s")
        desc = (f"vocab {cfg['vocab']}, length {cfg['seq_len']}, d_model {cfg['d']}, {cfg['heads']} heads, ff "
                f"{cfg['ff']}, 2 layers, {cfg['epochs']} epochs")
        if name == "classifier":
            desc += f", {len(b['flipped'])} labels flipped ({FLIP_FRACTION:.0%})"
        base_job = {"data": data, "queries": queries, "threads": args.threads, "dtype": args.dtype, "tol": args.tol,
                    "plain_cg": args.plain_cg}
        out = os.path.join(cache, "scores_tmp.pt")
        ref_path = os.path.join(cache, f"transformers_ref_{name}_{args.size}_{args.dtype}_{args.tol:g}.pt")
        cached = (os.path.exists(ref_path) and not args.fresh_reference and not args.inline and args.damping is None
                  and not args.plain_cg)
        if args.no_reference:
            ref, ref_scores = {"damping": args.damping}, None
        elif cached:
            saved_ref = torch.load(ref_path, weights_only=False)
            ref, ref_scores = saved_ref["info"], saved_ref["scores"]
        else:
            ref = run_job({**base_job, "method": "cg", "damping": args.damping, "out": out}, args.inline, args.timeout)
            if "error" not in ref:
                ref_scores = torch.load(out)["scores"]
                torch.save({"info": ref, "scores": ref_scores}, ref_path)
        if "error" in ref:
            protocol.append(f"* {label}: {desc}; {fit}; **reference failed**: {ref['error'][:300]}")
            emit(f"| {label} | reference (our CG) | failed: {ref['error'][:200].replace('|', '/')} |||||||||")
            continue
        lam = ref["damping"]
        est = ""
        if "lambda_min_estimate" in ref:
            est = f" (λ̂_min(H) = {ref['lambda_min_estimate']:.3g}, λ̂_max(H) = {ref.get('lambda_max_estimate', float('nan')):.3g})"
        protocol.append(f"* {label}: {desc}; {fit}; queries: the first {len(queries)} held-out sequences; "
                        f"**λ = {lam:.4g}** (wd {WEIGHT_DECAY:g}){est}")
        print(f"{name}: λ = {lam:.4g}{est}", flush=True)
        flips = b["flipped"]
        loss_found = recovered(b["train_losses"], flips) if name == "classifier" else None
        how = " (cached from an earlier run of this command)" if cached else ""
        if ref_scores is not None:
            emit(f"| {label} | reference: ours `cg` (tol {args.tol:g}){how} | 1 | 1 | 1 | 1.00 | – / {loss_found if loss_found is not None else '–'}"
                 f"{f' of {len(flips)}' if name == 'classifier' else ''} | {ref['wall_s']:.1f} | {ref['peak_mb']:.0f} | "
                 f"{ref['base_mb']:.0f} | {ref['treatment']}; {ref['settings']} |")
        for method in [m for m in ours_methods if name == "lm" or m != "ekfac-true-fisher"] + peers:
            res = run_job({**base_job, "method": method, "damping": lam, "out": out}, args.inline, args.timeout)
            shown = f"ours `{method}`" if method in OURS else method
            if "error" in res:
                emit(f"| {label} | {shown} | failed: {res['error'][:220].replace('|', '/')} |||||||||")
                continue
            saved = torch.load(out)
            c = (correlations(saved["scores"], ref_scores) if ref_scores is not None
                 else {"r_med": float("nan"), "r_min": float("nan"), "ratio": float("nan")})
            flip = "–"
            if name == "classifier" and "self" in saved:
                found = recovered(saved["self"], flips)
                flip = f"{found} / {loss_found} of {len(flips)}"
                c["flips"], c["flips_loss"] = found, loss_found
            results.append({"model": name, "method": method, "coverage": res["coverage"], "wall": res["wall_s"], **c})
            emit(f"| {label} | {shown} | {c['r_med']:.4f} | {c['r_min']:.4f} | {c['ratio']:.3g} | "
                 f"{res['coverage']:.2f} | {flip} | {res['wall_s']:.1f} | {res['peak_mb']:.0f} | {res['base_mb']:.0f} | "
                 f"{res['treatment']}; {res['settings']} |")
    write()
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
