"""The functional core: :func:`compute_influence` runs the whole computation on a model and datasets,
without a Trainer. The callback is a thin layer over it.

Data flow: query gradients ``G [Q, P]`` → ``S = (H + λI)⁻¹ G`` (batched over queries) → streamed
training gradients ``g_B [B, P]`` → ``scores[:, B] = −S g_Bᵀ``.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .damping import AutoDamping, resolve_damping
from .data import Collate, ExampleSource
from .diagnostics import Diagnostic, combine_scalars
from .errors import InfluenceConfigError, InfluenceRuntimeError
from .functional import batch_size_of
from .guards import preserved_rng
from .objective import IGNORE_INDEX, LossFn, Objective
from .problem import InfluenceProblem
from .results import InfluenceResults, diagnostics_layout
from .scoring import checked_grads, influence_scores, self_influence as _self_influence
from .solvers import FactoredInverse, SolverSettings, resolve_solver
from .validation import check_run_arguments, resolve_dtype, warn_num_queries

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


#: examples of each dataset checked by :func:`preflight` (format, labels, per-example finite loss)
PREFLIGHT_EXAMPLES = 4


def preflight(
    model: nn.Module,
    train_dataset: Dataset,
    *,
    loss_fn: Optional[LossFn] = None,
    params: Optional[Union[str, Sequence[str]]] = None,
    collate_fn: Optional[Collate] = None,
    dtype: Union[torch.dtype, str] = torch.float32,
    solver: Union[str, SolverSettings, None] = None,
    query_dataset: Optional[Dataset] = None,
    query_collate_fn: Optional[Collate] = None,
    query_indices: Optional[Sequence[int]] = None,
    num_queries: Optional[int] = None,
) -> None:
    """The cheap checks of :func:`compute_influence`, for running before training starts: parameters,
    the solver's size limit, the training dataset (format, labels and a finite per-example loss on a few
    examples) and, when ``query_dataset`` is given, the queries (the explicit ``query_indices`` in range,
    the batch format, labels and loss on the first few of them, or of the dataset). Random states and
    the model are left as they were."""
    dtype = resolve_dtype(dtype)
    with preserved_rng(), frozen_module(model):
        objective, _ = _bind(model, train_dataset, loss_fn, params, collate_fn, dtype)
        if solver is not None:
            resolve_solver(solver).check_size(objective.num_params, dtype)
        if query_dataset is not None:
            queries = ExampleSource(query_dataset, query_collate_fn, objective.prepare_batch,
                                    indices=query_indices, what="query")
            if query_indices is None and num_queries is not None:
                warn_num_queries(num_queries, len(queries))
            positions = torch.arange(min(len(queries), PREFLIGHT_EXAMPLES))
            batch = queries.batch(positions)
            objective.check_targets(batch, queries.indices[positions].tolist(), "query")
            objective.check_per_example(batch)


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
    positions = torch.arange(min(len(train), PREFLIGHT_EXAMPLES))
    batch = train.batch(positions)
    objective.check_targets(batch, positions.tolist(), "training")
    objective.check_per_example(batch)
    return objective, train


def _checked_losses(objective: Objective, source: ExampleSource, start: int, batch: Any, what: str) -> Tensor:
    """Per-example losses of one chunk of ``source``, its labels checked first; a loss that raises (a
    label the loss cannot take, a malformed example) is reported with the chunk's dataset indices."""
    idx = source.indices[start : start + batch_size_of(batch)].tolist()
    objective.check_targets(batch, idx, what)
    try:
        return objective.losses(batch)
    except torch.cuda.OutOfMemoryError:
        raise
    except (IndexError, RuntimeError, ValueError, TypeError, KeyError) as err:
        raise InfluenceRuntimeError(
            f"the loss of {what} examples {idx[0]}..{idx[-1]} (dataset indices) failed: {type(err).__name__}: "
            f"{err}. Check those examples' inputs and labels against the model and the loss."
        ) from err


def check_finite_losses(objective: Objective, source: ExampleSource, chunk_size: int) -> None:
    """One forward pass over ``source``; raises naming the first example whose label is out of range or
    whose loss is NaN/inf."""
    for start, batch in source.chunks(chunk_size):
        bad = (~torch.isfinite(_checked_losses(objective, source, start, batch, "training"))).nonzero()
        if bad.numel():
            i = int(source.indices[start + int(bad[0])])
            raise InfluenceRuntimeError(
                f"the loss of training example {i} (and {bad.numel() - 1} more in its chunk) is NaN/inf at the "
                "trained weights. Influence needs finite losses and gradients: check that example's inputs and label."
            )


def select_queries(objective: Objective, source: ExampleSource, num_queries: int, chunk_size: int) -> Tensor:
    """Dataset indices of the ``num_queries`` examples of ``source`` with the highest loss (ties: lower
    index). Raises naming the first example whose loss is NaN/inf (it would sort first)."""
    warn_num_queries(num_queries, len(source))
    losses = torch.cat([_checked_losses(objective, source, s, b, "query") for s, b in source.chunks(chunk_size)])
    bad = (~torch.isfinite(losses)).nonzero()
    if bad.numel():
        i = int(source.indices[int(bad[0])])
        raise InfluenceRuntimeError(
            f"the loss of query example {i} (and {bad.numel() - 1} more) is NaN/inf at the trained weights, so the "
            "highest-loss queries cannot be chosen. Check that example's inputs and label, or pass query_indices=."
        )
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
    dtype: Union[torch.dtype, str] = torch.float32,
    progress: Optional[ProgressFn] = None,
) -> InfluenceResults:
    """Influence of every training example on chosen query examples (Koh & Liang, 2017).

    The model stays where it is (its device is the device of the computation) and is never modified;
    it is evaluated in eval mode with autocast off, in ``dtype``. The global random states (torch,
    CUDA, NumPy, Python ``random``) are restored afterwards: the caller's random numbers continue as if
    this had not run.

    Args:
        model: the trained model (any ``nn.Module``, e.g. a LightningModule).
        train_dataset: map-style training dataset; column ``i`` of the scores is its example ``i``.
        query_dataset: dataset the queries come from (default: ``train_dataset``).
        query_indices: positions of the queries in ``query_dataset`` (integers: a sequence, or a 1-D
            integer tensor or array; duplicates warn). Default: the ``num_queries`` examples with the
            highest loss.
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
        dtype: dtype of the influence maths: ``torch.float32`` (default) or ``torch.float64`` (for
            references), or their names ``"float32"``/``"float64"``; half precision is refused.
        progress: optional ``progress(phase, done, total)`` hook.

    Returns:
        :class:`InfluenceResults` with scores ``[Q, N]`` (positive = harmful, negative = helpful).
    """
    t_start = time.perf_counter()
    args = check_run_arguments(num_queries=num_queries, query_indices=query_indices, params=params,
                               chunk_size=chunk_size, query_batch_size=query_batch_size, dtype=dtype)
    query_indices, dtype = args.query_indices, args.dtype
    settings = resolve_solver(solver)
    damping_spec = resolve_damping(damping)
    if train_dataset is None:
        raise InfluenceConfigError("train_dataset is None; pass the map-style Dataset the model was trained on.")
    if not any(True for _ in model.parameters()):
        raise InfluenceConfigError(f"model {type(model).__name__} has no parameters to attribute to.")
    report = progress or (lambda phase, done, total: None)
    timings: Dict[str, float] = {}

    with preserved_rng(), frozen_module(model):
        objective, train = _bind(model, train_dataset, loss_fn, params, collate_fn, dtype)
        settings.check_size(objective.num_params, dtype)  # before any pass over the data
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
        ignored: List[int] = []
        for start, batch in queries.chunks(chunk_size):
            ignored += objective.check_targets(batch, queries.indices[start : start + batch_size_of(batch)].tolist(),
                                               "query")
            grads.append(checked_grads(objective.loss, objective.space, objective.theta, batch, "query", start,
                                       indices=queries.indices))
            losses.append(objective.losses(batch))
            out = objective.outputs(batch)
            if out is not None and out.dim() == 2:
                preds.append(out.argmax(dim=1))
            if not objective.uses_hook and isinstance(batch[1], Tensor) and batch[1].dim() == 1:
                targets.append(batch[1])
            report("query_gradients", start + grads[-1].shape[0], q)
        if ignored:
            warnings.warn(
                f"query examples {ignored[:10]} have the label {IGNORE_INDEX} (cross-entropy's ignore_index): their "
                "loss and gradient are zero, so their rows of scores are all 0. Choose other query_indices.",
                UserWarning,
                stacklevel=2,
            )
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
