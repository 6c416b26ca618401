"""The functional core: :func:`compute_influence` runs the whole computation on a model and datasets,
without a Trainer. The callback is a thin layer over it.

Data flow: query gradients ``G [Q, P]`` → ``S = (H + λI)⁻¹ G`` (batched over queries) → streamed
training gradients ``g_B [B, P]`` → ``scores[:, B] = −S g_Bᵀ``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .damping import AutoDamping, resolve_damping
from .data import Collate, ExampleSource
from .diagnostics import Diagnostic, combine_scalars
from .errors import InfluenceConfigError, InfluenceRuntimeError
from .objective import LossFn, Objective
from .problem import InfluenceProblem
from .results import InfluenceResults, diagnostics_layout
from .scoring import checked_grads, influence_scores, self_influence as _self_influence
from .solvers import FactoredInverse, SolverSettings, resolve_solver

__all__ = ["compute_influence", "ProgressFn", "DEFAULT_DAMPING"]

#: ``progress(phase, done, total)``, called as each phase advances; phases are ``"query_gradients"``,
#: ``"solve"``, ``"scoring"`` and ``"self_influence"``.
ProgressFn = Callable[[str, int, int], None]

#: Damping used when the model was trained without a coupled L2 penalty (Hessian units).
DEFAULT_DAMPING = 1e-3
#: memory for one chunk of per-example gradients ``[B, P]``: the chunk shrinks as the model grows
GRAD_CHUNK_BYTES = 256 * 2**20


def grad_chunk_size(chunk_size: int, num_params: int, dtype: torch.dtype) -> int:
    """Examples per per-example-gradient chunk: ``chunk_size``, or fewer so that ``[B, P]`` stays within
    :data:`GRAD_CHUNK_BYTES` (at least 1)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return int(max(1, min(chunk_size, GRAD_CHUNK_BYTES // max(1, num_params * itemsize))))


@contextlib.contextmanager
def frozen_module(module: nn.Module) -> Iterator[None]:
    """Eval mode and autocast off for the duration; every
    submodule's train/eval mode and every parameter's ``requires_grad`` flag are restored afterwards."""
    modes = {m: m.training for m in module.modules()}
    flags = {p: p.requires_grad for p in module.parameters()}
    device_type = next(module.parameters()).device.type
    module.eval()
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InfluenceConfigError(f"{name}={value!r} must be a positive integer.")


def preflight(
    model: nn.Module,
    train_dataset: Dataset,
    *,
    loss_fn: Optional[LossFn] = None,
    params: Optional[Union[str, Sequence[str]]] = None,
    collate_fn: Optional[Collate] = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """The cheap checks of :func:`compute_influence` (parameters, dataset, per-example finite loss on a
    few training examples), for running before training starts."""
    with frozen_module(model):
        _bind(model, train_dataset, loss_fn, params, collate_fn, dtype)


def _bind(
    model: nn.Module,
    train_dataset: Dataset,
    loss_fn: Optional[LossFn],
    params: Optional[Union[str, Sequence[str]]],
    collate_fn: Optional[Collate],
    dtype: torch.dtype,
) -> Tuple[Objective, ExampleSource]:
    """Objective and training examples, checked on a few examples (call inside :func:`frozen_module`)."""
    objective = Objective(model, params=params, loss_fn=loss_fn, dtype=dtype)
    train = ExampleSource(train_dataset, collate_fn, objective.prepare_batch, what="training")
    objective.check_per_example(train.batch(torch.arange(min(len(train), 4))))
    return objective, train


def check_finite_losses(objective: Objective, source: ExampleSource, chunk_size: int) -> None:
    """One forward pass over ``source``; raises naming the first example whose loss is NaN/inf."""
    for start, batch in source.chunks(chunk_size):
        bad = (~torch.isfinite(objective.losses(batch))).nonzero()
        if bad.numel():
            i = int(source.indices[start + int(bad[0])])
            raise InfluenceRuntimeError(
                f"the loss of training example {i} (and {bad.numel() - 1} more in its chunk) is NaN/inf at the "
                "trained weights. Influence needs finite losses and gradients: check that example's inputs and label."
            )


def select_queries(objective: Objective, source: ExampleSource, num_queries: int, chunk_size: int) -> Tensor:
    """Positions of the ``num_queries`` examples of ``source`` with the highest loss (ties: lower index)."""
    losses = torch.cat([objective.losses(b) for _, b in source.chunks(chunk_size)])
    order = torch.argsort(losses, descending=True, stable=True)[: min(num_queries, losses.numel())]
    return source.indices[order.cpu()]


def compute_influence(
    model: nn.Module,
    train_dataset: Dataset,
    query_dataset: Optional[Dataset] = None,
    *,
    query_indices: Optional[Sequence[int]] = None,
    num_queries: int = 16,
    loss_fn: Optional[LossFn] = None,
    params: Optional[Union[str, Sequence[str]]] = None,
    solver: Union[str, SolverSettings] = "lissa",
    damping: Union[float, str, AutoDamping] = DEFAULT_DAMPING,
    self_influence: bool = False,
    collate_fn: Optional[Collate] = None,
    query_collate_fn: Optional[Collate] = None,
    chunk_size: int = 256,
    query_batch_size: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    progress: Optional[ProgressFn] = None,
) -> InfluenceResults:
    """Influence of every training example on chosen query examples (Koh & Liang, 2017).

    The model stays where it is (its device is the device of the computation) and is never modified;
    it is evaluated in eval mode with autocast off, in ``dtype``.

    Args:
        model: the trained model (any ``nn.Module``, e.g. a LightningModule).
        train_dataset: map-style training dataset; column ``i`` of the scores is its example ``i``.
        query_dataset: dataset the queries come from (default: ``train_dataset``).
        query_indices: positions of the queries in ``query_dataset``. Default: the ``num_queries``
            examples with the highest loss.
        num_queries: how many highest-loss queries to pick when ``query_indices`` is not given.
        loss_fn: ``loss_fn(outputs, targets) -> Tensor[B]`` for ``(inputs, targets)`` batches; default
            per-example cross-entropy. Unused when the model defines ``influence_loss(batch)``.
        params: names or prefixes of the parameters to attribute to (default: all trainable).
        solver: ``"lissa"`` (Arnoldi-preconditioned LiSSA), ``"arnoldi"``, ``"ekfac"``, ``"kfac"``,
            ``"cg"``, ``"exact"`` or a settings object (``LissaSettings(...)``…); each is fitted once by
            ``settings.fit(problem, damping)`` and applied to every query chunk.
        damping: ``λ ≥ 0`` added to the Hessian of the mean training loss (the L2 coefficient, plus any
            regularisation the solver needs), in Hessian units. ``"auto"`` or
            :class:`~lightning_influence.damping.AutoDamping`: each solver applies its own rule. The
            Hessian-vector-product solvers estimate the extreme Hessian eigenvalues by Lanczos
            (``AutoDamping.iters`` full-data HVPs, or the Arnoldi preconditioner's Krylov space) and use
            the smallest damping that makes ``H + λI`` positive definite with a margin (see
            :class:`~lightning_influence.damping.AutoDamping`; EK-FAC/K-FAC use
            ``max(base, damping_fraction · mean eigenvalue)``;
            ``AutoDamping(base=wd)`` never goes below an L2 coefficient ``wd``); the λ used is
            ``results.settings["damping"]``, the estimates ``lambda_min_estimate`` /
            ``lambda_max_estimate``.
        self_influence: also compute ``I_up,loss(z_i, z_i)`` for every training example.
        collate_fn / query_collate_fn: how examples become batches (default ``default_collate``).
        chunk_size: training examples per per-sample-gradient chunk and per full-data HVP chunk.
        query_batch_size: right-hand sides solved together (default: all queries at once); does not
            change the results.
        dtype: floating dtype of the influence maths (float32 default, float64 for references).
        progress: optional ``progress(phase, done, total)`` hook.

    Returns:
        :class:`InfluenceResults` with scores ``[Q, N]`` (positive = harmful, negative = helpful).
    """
    t_start = time.perf_counter()
    _check_positive_int("num_queries", num_queries)
    _check_positive_int("chunk_size", chunk_size)
    _check_positive_int("query_batch_size", query_batch_size, allow_none=True)
    settings = resolve_solver(solver)
    damping_spec = resolve_damping(damping)
    if train_dataset is None:
        raise InfluenceConfigError("train_dataset is None; pass the map-style Dataset the model was trained on.")
    if not any(True for _ in model.parameters()):
        raise InfluenceConfigError(f"model {type(model).__name__} has no parameters to attribute to.")
    report = progress or (lambda phase, done, total: None)
    timings: Dict[str, float] = {}

    with frozen_module(model):
        objective, train = _bind(model, train_dataset, loss_fn, params, collate_fn, dtype)
        n = len(train)
        check_finite_losses(objective, train, chunk_size)
        qdata = train_dataset if query_dataset is None else query_dataset
        qcollate = query_collate_fn or (collate_fn if query_dataset is None else None)
        if query_indices is None:
            candidates = ExampleSource(qdata, qcollate, objective.prepare_batch, what="query")
            query_indices = select_queries(objective, candidates, num_queries, chunk_size).tolist()
        queries = ExampleSource(qdata, qcollate, objective.prepare_batch, indices=query_indices, what="query")
        q = len(queries)

        # 1. query gradients, losses, predictions
        t0 = time.perf_counter()
        grads: List[Tensor] = []
        losses: List[Tensor] = []
        preds: List[Tensor] = []
        targets: List[Tensor] = []
        for start, batch in queries.chunks(chunk_size):
            grads.append(checked_grads(objective.loss, objective.space, objective.theta, batch, "query", start))
            losses.append(objective.losses(batch))
            out = objective.outputs(batch)
            if out is not None and out.dim() == 2:
                preds.append(out.argmax(dim=1))
            if not objective.uses_hook and isinstance(batch[1], Tensor) and batch[1].dim() == 1:
                targets.append(batch[1])
            report("query_gradients", start + grads[-1].shape[0], q)
        g_query = torch.cat(grads)
        timings["query_gradients"] = time.perf_counter() - t0

        # 2. s_test = (H + λI)⁻¹ ∇L(z_q), batched over queries; the solver resolves the damping by its rule
        t0 = time.perf_counter()
        problem = InfluenceProblem(objective, train, chunk_size, grad_chunk_size(chunk_size, objective.num_params, dtype))
        inverse = settings.fit(problem, damping_spec)
        timings["solver_setup"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        qb = query_batch_size or q
        s_parts, solve_chunks = [], []
        for s in range(0, q, qb):
            res = inverse.solve(g_query[s : s + qb])
            s_parts.append(res.solution)
            solve_chunks.append((s, s + res.solution.shape[0], res.diagnostics))
            report("solve", min(s + qb, q), q)
        s_test = torch.cat(s_parts)
        timings["solve"] = time.perf_counter() - t0

        # 3. scores, streamed over the training set; self-influence in the same pass for a factored inverse
        t0 = time.perf_counter()
        done = [0]

        def scoring_progress(b: int) -> None:
            done[0] += b
            report("scoring", done[0], n)

        factored = isinstance(inverse, FactoredInverse)
        self_diags: List[List[Diagnostic]] = []

        def quadratic(g: Tensor) -> Tensor:
            values, diags = inverse.quadratic(g)
            self_diags.append(diags)
            return values

        scores, self_inf = influence_scores(problem, s_test, scoring_progress,
                                            quadratic if self_influence and factored else None)
        timings["scoring"] = time.perf_counter() - t0

        # 4. self-influence of an iterative solver: its training gradients solved as batches of right-hand sides
        if self_influence and not factored:
            t0 = time.perf_counter()
            done[0] = 0

            def self_progress(b: int) -> None:
                done[0] += b
                report("self_influence", done[0], n)

            self_inf = _self_influence(problem, quadratic, query_batch_size or chunk_size, self_progress)
            timings["self_influence"] = time.perf_counter() - t0

    timings["total"] = time.perf_counter() - t_start
    run_settings: Dict[str, Any] = {
        **settings.to_dict(),
        **inverse.damping_record,
        "dtype": str(dtype).replace("torch.", ""),
        "params": list(objective.param_names),
        "num_params": objective.num_params,
        "num_train_total": n,
        "num_queries": q,
        "chunk_size": chunk_size,
        "grad_chunk_size": problem.grad_chunk_size,
        "query_batch_size": qb,
        "loss": "influence_loss" if objective.uses_hook else getattr(objective.loss_fn, "__name__", "loss_fn"),
        "fisher": objective.fisher,
        "device": str(objective.device),
    }
    diagnostics = diagnostics_layout(
        settings.name,
        inverse.setup,
        solve_chunks,
        combine_scalars(self_diags),
        [Diagnostic("hvp_calls", inverse.hvp_calls, "HVPs in all",
                    "batched Hessian-vector products over the whole run (setup, solves, self-influence)", "sum")],
    )
    return InfluenceResults(
        scores=scores.cpu(),
        query_indices=torch.as_tensor(list(query_indices), dtype=torch.long),
        train_indices=train.indices.clone(),
        query_losses=torch.cat(losses).cpu(),
        self_influence=None if self_inf is None else self_inf.cpu(),
        query_targets=torch.cat(targets).cpu() if len(targets) == len(losses) and targets else None,
        query_predictions=torch.cat(preds).cpu() if len(preds) == len(losses) and preds else None,
        settings=run_settings,
        diagnostics=diagnostics,
        timings=timings,
    )
