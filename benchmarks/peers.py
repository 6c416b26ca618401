"""Adapters from other influence-function libraries to this project's convention, for bench_peers.py.

Every adapter takes ``(model, train, val, queries, damping)`` and differentiates the loss :func:`use_loss`
set (cross-entropy unless a zoo entry's is set) — a trained ``nn.Module`` in its working
dtype, two ``TensorDataset``s of ``(x, y)``, the validation positions of the queries and ``λ`` — and
returns ``(scores, settings)``: scores ``[Q, N]`` over all training examples in this project's sign,

    I_up,loss(z_q, z_i) = −∇L(z_q)ᵀ (H + λI)⁻¹ ∇L(z_i),   H = Hessian of the MEAN training loss,

positive = harmful, and a short string of the settings used. How each peer's convention was mapped
(checked in its source, and by the sign of the correlation against the exact solve):

* pyDVL 0.10 ``influences(x_test, y_test, x, y, mode=Up)`` = ``+⟨H⁻¹∇ℓ_test, ∇ℓ⟩`` with ``H`` the mean
  Hessian over the fit loader, ``regularization`` added as ``λI`` → scores are negated.
* dattri 0.3 ``attribute(train_loader, test_loader)`` = ``[N, Q]`` of ``+∇ℓ_trainᵀ (H + λI)⁻¹ ∇ℓ_test``;
  its explicit/CG/Arnoldi attributors sum an inverse per batch of the cached loader, so that loader holds
  the whole training set in one batch (mean Hessian). LiSSA's ``damping`` d enters the recursion as
  ``(1 − d)``, which damps with ``scaling·d``: we pass ``d = λ / scaling``. → transposed and negated.
* kronfluence 1.0 pairwise scores ``[Q, N]`` = ``+g_qᵀ (F̂ + λI)⁻¹ g_i`` with the (E)K-FAC factors of the
  Fisher averaged over examples (``compute_train_loss`` returns a *sum*, labels sampled from the model
  when ``sample=True``: labels for classification, tokens for a language model, Gaussian noise for squared
  error) and ``damping_factor = λ`` → negated.
* pytorch-influence-functions 0.1.1 ``calc_influence_single`` = ``−(1/N) ∇ℓ_iᵀ s_test`` per training example
  (one autograd gradient each) with ``s_test`` from its ``s_test`` recursion ``h ← v + (1 − d)h − H_B h/s``,
  whose fixed point is ``s (H + s·d·I)⁻¹ v``: we pass ``d = λ/s`` → already our sign. Read in its source:
  the loop applies ``H_B`` to the *initial* estimate on every step (``h_init_estimates`` is never
  updated), so the result is one step, ``(2 − d)v − H_B v/s`` for the last minibatch, whatever the depth.
* captum 0.9 ``influence((x, y))`` = ``+∇ℓ_qᵀ H⁻¹ ∇ℓ_i`` with ``H`` the Hessian of the *summed* loss over
  ``hessian_dataset`` plus ``hessian_reg·I`` → ``hessian_reg = N·λ`` (then ``H_sum + NλI = N(H + λI)``:
  a positive factor), negated.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

Adapter = Callable[[nn.Module, TensorDataset, TensorDataset, Sequence[int], float], Tuple[torch.Tensor, str]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


#: the per-example loss ``fn(outputs, targets) -> [B]`` every adapter differentiates, and the task it belongs
#: to (for kronfluence's sampled Fisher); bench_peers sets a zoo entry's with :func:`use_loss`
LOSS: Dict[str, object] = {"fn": cross_entropy_per_example, "task": "classification"}


def use_loss(fn: LossFn | None, task: str = "classification") -> None:
    """Make every adapter use ``fn`` (``None``: cross-entropy on ``[B, C]`` logits) for a ``task`` of
    ``"classification"``, ``"language_model"`` or ``"regression"``."""
    LOSS.update(fn=fn or cross_entropy_per_example, task=task)


def _per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return LOSS["fn"](outputs, targets)  # type: ignore[operator]


def _mean_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _per_example(outputs, targets).mean()


class _PerExampleLoss(nn.Module):
    """The loss as captum wants it: a module with ``reduction = "none"``."""

    reduction = "none"

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _per_example(outputs, targets)


def _sampled_targets(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targets drawn from the model's predictive distribution (the true Fisher): a label per row of
    ``[B, C]`` logits, a token per position of ``[B, T, V]``, ``outputs + N(0, 1/2)`` for the summed squared
    error (the Gaussian whose negative log-likelihood it is, up to a constant)."""
    out = outputs.detach()
    if LOSS["task"] == "regression":
        return out + torch.randn_like(out) * 0.5 ** 0.5
    flat = torch.softmax(out.reshape(-1, out.shape[-1]), -1)
    return torch.multinomial(flat, 1).reshape(out.shape[:-1]).to(targets.dtype)

# Peers whose method forms the explicit P×P Hessian: skipped above this many parameters (the CNN's 21,546
# would need 21,546 HVP rows over the data and an eigendecomposition / solve of a 21,546² matrix).
EXPLICIT_MAX_PARAMS = 5000
EXPLICIT = {"pydvl-direct", "dattri-explicit", "captum-naive"}


def _query_tensors(val: TensorDataset, queries: Sequence[int]):
    x, y = val.tensors
    idx = torch.as_tensor(list(queries))
    return x[idx], y[idx]


# ----------------------------------------------------------------------------------------------- pyDVL
def _pydvl(kind: str) -> Adapter:
    def run(model, train, val, queries, damping):
        from pydvl.influence import InfluenceMode
        from pydvl.influence.torch import (ArnoldiInfluence, CgInfluence, DirectInfluence, EkfacInfluence,
                                           LissaInfluence)

        loader = DataLoader(train, batch_size=128)
        if kind == "direct":
            infl, s = DirectInfluence(model, _mean_loss, regularization=damping), "regularization=λ"
        elif kind == "cg":
            infl = CgInfluence(model, _mean_loss, regularization=damping, warn_on_max_iteration=False)
            s = "regularization=λ, defaults rtol=1e-4, atol=1e-6, maxiter=10·P, one CG per query"
        elif kind == "lissa":
            infl = LissaInfluence(model, _mean_loss, regularization=damping, warn_on_max_iteration=False)
            s = "regularization=λ, defaults maxiter=1000, scale=10, dampen=0, rtol=1e-4"
        elif kind == "arnoldi":
            infl, s = ArnoldiInfluence(model, _mean_loss, regularization=damping), "regularization=λ, default rank=10"
        elif kind == "ekfac":
            infl = EkfacInfluence(model, update_diagonal=True, hessian_regularization=damping)
            s = "hessian_regularization=λ, update_diagonal=True (the EK-FAC eigenvalue correction)"
        else:
            raise ValueError(kind)
        s += "; fit loader batch 128"
        infl = infl.fit(loader)
        xq, yq = _query_tensors(val, queries)
        x, y = train.tensors
        scores = infl.influences(xq, yq, x, y, mode=InfluenceMode.Up)
        return -scores.detach(), s

    return run


# ---------------------------------------------------------------------------------------------- dattri
def _dattri(kind: str) -> Adapter:
    def run(model, train, val, queries, damping):
        from dattri.algorithm import influence_function as dif
        from dattri.task import AttributionTask

        def loss_func(params, data):
            x, y = data
            return _mean_loss(torch.func.functional_call(model, params, (x,)), y)

        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
        if kind == "explicit":
            att, s = dif.IFAttributorExplicit(task=task, device="cpu", regularization=damping), "regularization=λ"
        elif kind == "cg":
            att = dif.IFAttributorCG(task=task, device="cpu", regularization=damping)
            s = "regularization=λ, defaults max_iter=10, tol=1e-7"
        elif kind == "lissa":
            scaling = 50.0
            att = dif.IFAttributorLiSSA(task=task, device="cpu", damping=damping / scaling, scaling=scaling)
            s = "damping=λ/scaling (≡ λI), defaults scaling=50, batch_size=1, recursion_depth=5000, num_repeat=1"
        elif kind == "arnoldi":
            att = dif.IFAttributorArnoldi(task=task, device="cpu", regularization=damping)
            s = "regularization=λ, defaults proj_dim=100, max_iter=100"
        elif kind == "ekfac":
            att = dif.IFAttributorEKFAC(task=task, device="cpu", damping=damping)
            s = "damping=λ, default modules = all nn.Linear (conv layers not attributed)"
        elif kind == "datainf":
            att, s = dif.IFAttributorDataInf(task=task, device="cpu", regularization=damping), "regularization=λ"
        else:
            raise ValueError(kind)
        n = len(train)
        att.cache(DataLoader(train, batch_size=n))  # one batch: the mean-loss Hessian (see module doc)
        q = list(queries)
        with torch.no_grad():
            scores = att.attribute(DataLoader(train, batch_size=256), DataLoader(Subset(val, q), batch_size=len(q)))
        return -scores.T.detach(), s + "; cache loader = all N in one batch"

    return run


# ----------------------------------------------------------------------------------------- kronfluence
def _kronfluence(strategy: str) -> Adapter:
    def run(model, train, val, queries, damping):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task

        class Classification(Task):
            def compute_train_loss(self, batch, model, sample=False):
                x, y = batch
                logits = model(x)
                if sample:  # true Fisher: targets drawn from the model
                    with torch.no_grad():
                        y = _sampled_targets(logits, y)
                return _per_example(logits, y).sum()

            def compute_measurement(self, batch, model):
                x, y = batch
                return _per_example(model(x), y).sum()

        dt = next(model.parameters()).dtype
        task = Classification()
        model = prepare_model(model, task)
        out = tempfile.mkdtemp(prefix="kronfluence_")
        analyzer = Analyzer(analysis_name="bench", model=model, task=task, cpu=True, disable_tqdm=True,
                            output_dir=out)
        fa = FactorArguments(strategy=strategy, activation_covariance_dtype=dt, gradient_covariance_dtype=dt,
                             per_sample_gradient_dtype=dt, lambda_dtype=dt)
        analyzer.fit_all_factors(factors_name="f", dataset=train, per_device_batch_size=128, factor_args=fa,
                                 overwrite_output_dir=True)
        sa = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=dt, precondition_dtype=dt,
                            score_dtype=dt)
        q = list(queries)
        analyzer.compute_pairwise_scores(scores_name="s", factors_name="f", query_dataset=Subset(val, q),
                                         train_dataset=train, per_device_query_batch_size=len(q),
                                         per_device_train_batch_size=256, score_args=sa,
                                         overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("s")["all_modules"]
        return -scores.detach(), (f"strategy={strategy}, damping_factor=λ, true Fisher (sampled labels), "
                                  f"factor batch 128, dtypes = model dtype")

    return run


# ---------------------------------------------------------------------------------------------- captum
def _captum(kind: str) -> Adapter:
    def run(model, train, val, queries, damping):
        from captum.influence import NaiveInfluenceFunction
        from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

        n = len(train)
        ckpt = os.path.join(tempfile.mkdtemp(prefix="captum_"), "model.pt")
        torch.save(model.state_dict(), ckpt)

        def load(m, path):
            m.load_state_dict(torch.load(path))
            return 1.0

        common = dict(checkpoints_load_func=load, loss_fn=_PerExampleLoss(), batch_size=128,
                      hessian_dataset=DataLoader(train, batch_size=n), hessian_reg=n * damping)
        if kind == "naive":  # its default projection_dim=50 keeps only the top-50 eigenpairs of H; all = exact
            p = sum(t.numel() for t in model.parameters())
            inf = NaiveInfluenceFunction(model, train, ckpt, projection_dim=p, **common)
            s = "hessian_reg=N·λ (its H is of the summed loss), projection_dim=P (all eigenpairs; default 50)"
        elif kind == "arnoldi":
            inf = ArnoldiInfluenceFunction(model, train, ckpt, **common)
            s = "hessian_reg=N·λ, defaults projection_dim=50, arnoldi_dim=200, arnoldi_tol=0.1"
        else:
            raise ValueError(kind)
        xq, yq = _query_tensors(val, queries)
        scores = inf.influence((xq, yq))
        return -scores.detach(), s + "; train batch 128"

    return run


# ---------------------------------------------------------------------------- pytorch-influence-functions
def _pif(model, train, val, queries, damping):
    from pytorch_influence_functions.calc_influence_function import calc_influence_single

    scale, depth = 25.0, 100  # its default scale; the depth only costs time (see the module docstring)
    torch.manual_seed(0)
    train_loader = DataLoader(train, batch_size=128, shuffle=True)
    test_loader = DataLoader(Subset(val, list(queries)), batch_size=1)
    # calc_influence_single takes its defaults for damp/scale from calc_s_test_single: pass s_test ourselves
    from pytorch_influence_functions.calc_influence_function import calc_s_test_single

    rows = []
    for q in range(len(queries)):
        z, t = test_loader.dataset[q]
        z, t = test_loader.collate_fn([z]), test_loader.collate_fn([t])
        s_test = calc_s_test_single(model, z, t, train_loader, gpu=-1, damp=damping / scale, scale=scale,
                                    recursion_depth=depth, r=1)
        s_test = [v.detach() for v in s_test]
        influences, *_ = calc_influence_single(model, train_loader, test_loader, q, gpu=-1, recursion_depth=depth,
                                               r=1, s_test_vec=s_test)
        rows.append(torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in influences]))
    return torch.stack(rows), (f"calc_s_test_single(damp=λ/scale, scale={scale:g}, recursion_depth={depth}, r=1), "
                               "train batch 128, then calc_influence_single (one gradient per training example "
                               "per query); its recursion does not recurse (see peers.py)")


PEERS: Dict[str, Adapter] = {
    "pydvl-direct": _pydvl("direct"),
    "pydvl-cg": _pydvl("cg"),
    "pydvl-lissa": _pydvl("lissa"),
    "pydvl-arnoldi": _pydvl("arnoldi"),
    "pydvl-ekfac": _pydvl("ekfac"),
    "dattri-explicit": _dattri("explicit"),
    "dattri-cg": _dattri("cg"),
    "dattri-lissa": _dattri("lissa"),
    "dattri-arnoldi": _dattri("arnoldi"),
    "dattri-ekfac": _dattri("ekfac"),
    "kronfluence-ekfac": _kronfluence("ekfac"),
    "kronfluence-kfac": _kronfluence("kfac"),
    "captum-naive": _captum("naive"),
    "captum-arnoldi": _captum("arnoldi"),
    "pif-lissa": _pif,
}

# Libraries asked about that cannot be installed here, reported as rows without running anything.
NOT_INSTALLABLE = {
    "torch-influence": "not on PyPI (`pip install torch-influence`: no matching distribution); "
                       "GitHub-only, and this machine reaches only the package registries",
}

PACKAGES = {"pydvl": "pydvl", "dattri": "dattri", "kronfluence": "kronfluence", "captum": "captum",
            "pif": "pytorch-influence-functions"}
#: the module a method's package imports as (method names start with the key)
MODULES = {"pydvl": "pydvl", "dattri": "dattri", "kronfluence": "kronfluence", "captum": "captum",
           "pif": "pytorch_influence_functions"}


def package_versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name, dist in PACKAGES.items():
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def default_methods() -> List[str]:
    return list(PEERS)
