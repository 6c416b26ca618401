"""The functional core: :func:`compute_influence` runs the whole computation on a model and datasets,
without a Trainer. The callback is a thin layer over it.

Data flow: query gradients ``G [Q, P]`` → ``S = (H + λI)⁻¹ G`` (batched over queries) → streamed
training gradients ``g_B [B, P]`` → ``scores[:, B] = −S g_Bᵀ``.

The public phases, which :func:`compute_influence` composes (call them inside :func:`frozen_module`):

1. :func:`bind`: the objective (loss as a function of the attributed parameters) and the training
   examples, checked on a few examples: an :class:`~lightning_influence.problem.InfluenceProblem`.
2. :func:`query_gradients`: the queries (given, or the highest-loss ones), their gradients, losses and
   predictions.
3. :func:`fit_inverse`: the solver fitted to the problem (``settings.fit(problem, damping)``), then
   :func:`solve_queries`: ``s_test`` for every query, batched.
4. :func:`~lightning_influence.scoring.score_shard`: the scores of one shard of the training set
   (:func:`~lightning_influence.scoring.influence_scores` gathers every shard).
5. :func:`self_influence_scores`: ``I_up,loss(z_i, z_i)`` for every training example.

With a :class:`~lightning_influence.distributed.Communicator` over ``W`` processes the same calls on
every process split the work (see :mod:`lightning_influence.distributed`).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .curvature.damping import DEFAULT_DAMPING, AutoDamping, resolve_damping
from .contract import check_first_batch
from .data import Collate, ExampleSource
from .diagnostics import Diagnostic, combine_scalars
from .distributed import Communicator, local_communicator
from .errors import InfluenceConfigError, InfluenceRuntimeError
from .functional import batch_size_of
from .guards import preserved_rng
from .objective import IGNORE_INDEX, LossFn, Objective
from .problem import InfluenceProblem
from .record import DataFacts, RunRecord, RunSettings
from .results import InfluenceResults, diagnostics_layout
from .scoring import checked_grads, influence_scores, self_influence as _solved_self_influence
from .solvers import FactoredInverse, InverseHVP, SolverKind, SolverSettings, resolve_solver
from .solvers.auto import chosen, is_auto, record_of
from .tokens import QueryTokens, check_per_token, concat_tokens, token_gradients
from .validation import RunArguments, check_flag, check_query_indices, check_run_arguments, warn_num_queries

__all__ = ["DEFAULT_DAMPING", "ProgressFn", "QueryGradients", "SolvedQueries", "bind", "compute_influence",
           "default_query_batch", "fit_inverse", "frozen_module", "preflight", "query_gradients",
           "self_influence_scores", "solve_queries"]

#: ``progress(phase, done, total)``, called as each phase advances; phases are ``"query_gradients"``,
#: ``"solve"``, ``"scoring"`` and ``"self_influence"``.
ProgressFn = Callable[[str, int, int], None]

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
    train_indices: Optional[Sequence[int]] = None,
    per_token: bool = False,
) -> None:
    """The cheap checks of :func:`compute_influence`, for running before training starts: parameters,
    the solver's size limit, the training dataset (format, labels and a finite per-example loss on a few
    examples) and, when ``query_dataset`` is given, the queries (the explicit ``query_indices`` in range,
    the batch format, labels and loss on the first few of them, or of the dataset). Random states and
    the model are left as they were. With ``per_token``, that the loss can be split into token terms
    (:func:`~lightning_influence.tokens.check_per_token`, on the first queries when given)."""
    args = check_run_arguments(params=params, dtype=dtype)
    check_flag("per_token", per_token)
    with preserved_rng(), frozen_module(model):
        settings = None if solver is None else resolve_solver(solver)
        objective = bind(model, train_dataset, args, loss_fn=loss_fn, collate_fn=collate_fn,
                         need_hvp=settings is None or needs_hvp(settings), train_indices=train_indices).objective
        if settings is not None:
            settings.check_size(objective.num_params, args.dtype)
        if query_dataset is not None:
            queries = ExampleSource(query_dataset, query_collate_fn, objective.prepare_batch,
                                    indices=query_indices, what="query")
            if query_indices is None and num_queries is not None:
                warn_num_queries(num_queries, len(queries))
            batch = check_first_examples(objective, queries)
            if per_token:
                check_per_token(objective, batch)
        elif per_token:
            check_per_token(objective)


def bind(
    model: nn.Module,
    train_dataset: Dataset,
    args: Optional[RunArguments] = None,
    *,
    loss_fn: Optional[LossFn] = None,
    collate_fn: Optional[Collate] = None,
    comm: Optional[Communicator] = None,
    need_hvp: Union[bool, str] = True,
    train_indices: Optional[Sequence[int]] = None,
) -> InfluenceProblem:
    """Phase 1: the objective and the training examples as an :class:`InfluenceProblem`, checked on a
    few examples (format, labels, a finite per-example loss), and how to differentiate it, probed on the
    same examples (:meth:`Objective.choose_differentiation`: per-example gradients and, with
    ``need_hvp``, Hessian-vector products, through whichever strategy works for the model's layers). Call
    inside :func:`frozen_module`.

    Args:
        model: the trained model; ``args.params`` selects the attributed parameters, ``args.dtype`` the
            dtype of the maths.
        train_dataset: map-style training dataset (column ``i`` of the scores is its example ``i``).
        args: the checked run arguments (default: :func:`check_run_arguments` defaults).
        loss_fn / collate_fn: as in :func:`compute_influence`.
        comm: the processes sharing the work; each holds a contiguous shard of the training set.
        need_hvp: whether the solver takes Hessian-vector products (every kind but the factored ones);
            ``"optional"``: probe them, and go on without them when no strategy works (:func:`needs_hvp`).
        train_indices: the dataset positions of the training examples (default: all; e.g. those a
            ``SubsetRandomSampler`` trained on): ``R`` averages over them and the scores' columns are them.

    Raises:
        UnsupportedModelError: the model cannot be differentiated as the solver needs, naming the op, the
            layer and the solvers that still work.
    """
    args = args or check_run_arguments()
    objective = Objective(model, params=args.params, loss_fn=loss_fn, dtype=args.dtype)
    train_indices = check_query_indices(train_indices, "train_indices", "the training dataset", duplicates="error")
    train = ExampleSource(train_dataset, collate_fn, objective.prepare_batch, indices=train_indices, what="training")
    batch = check_first_examples(objective, train)
    objective.choose_differentiation(batch, need_hvp=need_hvp, indices=train.indices[: batch_size_of(batch)].tolist())
    return InfluenceProblem(objective, train, args.forward_chunk, args.grad_chunk_for(objective.num_params), comm)


def needs_hvp(settings: SolverSettings) -> Union[bool, str]:
    """Whether fitting ``settings`` takes Hessian-vector products: ``True`` for every solver but the
    factored kinds (also when one preconditions an iterative solver); ``"optional"`` for a factored solver
    that calibrates its magnitude with one (it fits without them); ``False`` otherwise."""
    plan = settings.composed()
    if plan.kind is not SolverKind.FACTORED:
        return True
    return "optional" if getattr(plan, "calibrate", False) else False


def check_first_examples(objective: Objective, source: ExampleSource) -> Any:
    """The loss contract on the first :data:`PREFLIGHT_EXAMPLES` examples of ``source``: batch format, the
    model's outputs, targets and labels, one finite loss per example that is the same alone as in the batch
    (:func:`~lightning_influence.contract.check_first_batch`; errors name their dataset indices). Returns
    that prepared batch."""
    return check_first_batch(objective, source, torch.arange(min(len(source), PREFLIGHT_EXAMPLES)))


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


def check_finite_losses(problem: InfluenceProblem) -> None:
    """One forward pass over this process's shard of the training set; raises naming the first example
    whose label is out of range or whose loss is NaN/inf."""
    source = problem.shard
    for start, batch in source.chunks(problem.chunk_size):
        bad = (~torch.isfinite(_checked_losses(problem.objective, source, start, batch, "training"))).nonzero()
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
    solver: Union[str, SolverSettings] = "auto",
    damping: Union[float, str, AutoDamping] = "auto",
    self_influence: bool = False,
    collate_fn: Optional[Collate] = None,
    query_collate_fn: Optional[Collate] = None,
    chunk_size: int = 256,
    grad_chunk_size: Optional[int] = None,
    query_batch_size: Optional[int] = None,
    dtype: Union[torch.dtype, str] = torch.float32,
    progress: Optional[ProgressFn] = None,
    comm: Optional[Communicator] = None,
    train_indices: Optional[Sequence[int]] = None,
    per_token: bool = False,
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
        solver: ``"auto"`` (default: chosen from the problem's size, the number of queries and whether
            self-influence is asked, see :mod:`~lightning_influence.solvers.auto`; the choice and why are
            ``results.settings["auto_choice"]`` / ``["auto_reason"]``), or a registered solver's name
            (``"lissa"``, ``"cg"``, ``"exact"``, ``"arnoldi"``, ``"ekfac"``, ``"kfac"``) or settings object
            (``LissaSettings(...)``…); each is fitted once by ``settings.fit(problem, damping)`` and applied
            to every query chunk.
        damping: ``λ ≥ 0`` added to the Hessian of the mean training loss (the L2 coefficient, plus any
            regularisation the solver needs), in Hessian units. ``"auto"`` (default) or
            :class:`~lightning_influence.curvature.damping.AutoDamping` (e.g.
            ``AutoDamping.from_optimizer(optimizer)``, whose base is the optimizer's coupled L2): the
            damping rule of the solver's kind chooses it. The
            Hessian-vector-product solvers estimate the extreme Hessian eigenvalues by Lanczos
            (``AutoDamping.iters`` full-data HVPs, or the Arnoldi preconditioner's Krylov space) and use
            the smallest damping that makes ``H + λI`` positive definite with a margin (see
            :class:`~lightning_influence.curvature.damping.AutoDamping`; EK-FAC/K-FAC use
            ``max(base, damping_fraction · mean eigenvalue)``;
            ``AutoDamping(base=wd)`` never goes below an L2 coefficient ``wd``); the λ used is
            ``results.settings["damping"]``, the estimates ``lambda_min_estimate`` /
            ``lambda_max_estimate``.
        self_influence: also compute ``I_up,loss(z_i, z_i)`` for every training example.
        collate_fn / query_collate_fn: how examples become batches (default ``default_collate``).
        chunk_size: training examples per forward pass and per full-data HVP chunk.
        grad_chunk_size: training examples per per-example-gradient chunk ``[B, P]`` (default:
            ``chunk_size``, or fewer so that the chunk stays within 256 MiB).
        query_batch_size: right-hand sides solved together (default: as many as keep the iterative
            solvers' state within 1 GiB, :func:`default_query_batch`: all of them below about
            ``2²⁴ / P`` float32 queries); does not change the results beyond the solvers' tolerances.
        dtype: dtype of the influence maths: ``torch.float32`` (default) or ``torch.float64`` (for
            references), or their names ``"float32"``/``"float64"``; half precision is refused.
        progress: optional ``progress(phase, done, total)`` hook.
        comm: the processes sharing the work (default: this one alone). Every process makes the same
            call; each scores its shard of the training set, full-data passes are all-reduced and every
            process returns the same results (see :mod:`lightning_influence.distributed`). A failure on
            one process raises on every process.
        train_indices: the positions of ``train_dataset`` that training drew from (default: all of it), e.g.
            a ``SubsetRandomSampler``'s ``indices``: ``R`` averages over them, and only they are scored
            (``results.train_indices``).
        per_token: also score every target token of each query (a language model's query, whose loss is the
            sum of its token losses): ``results.token_scores[r] = −∇L_t(z_q)ᵀ(H + λI)⁻¹∇L(z_i)`` for token
            ``t = results.token_positions[r]`` of query row ``results.token_rows[r]``, in the same units and
            sign as ``scores``; a query's token rows sum to its row of ``scores``. The token gradients are
            extra right-hand sides of the same fitted solver and are scored in the same pass over the training
            set (memory: ``Q + R`` solved vectors of ``P`` numbers, ``R`` the number of query tokens). A
            token's loss is the query's loss with every other target set to ``-100`` (exact for the default
            loss and any loss that sums token losses ignoring ``-100``, checked on the first queries; see
            :mod:`~lightning_influence.tokens`); ``-100`` (padding) positions get no row. The
            ``influence_loss`` hook path is refused.

    Returns:
        :class:`InfluenceResults` with scores ``[Q, N]`` (positive = harmful, negative = helpful), and with
        ``per_token`` the token scores ``[R, N]``.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence import compute_influence
        >>> _ = torch.manual_seed(0)
        >>> train = TensorDataset(torch.randn(40, 3), torch.randint(0, 2, (40,)))
        >>> res = compute_influence(torch.nn.Linear(3, 2), train, num_queries=2, solver="exact", damping=0.1)
        >>> res.scores.shape, res.settings["solver"], res.damping
        (torch.Size([2, 40]), 'exact', 0.1)
        >>> bool(res.self_influence is None), len(res.top_harmful(0, k=3).indices) <= 3
        (True, True)
    """
    t_start = time.perf_counter()
    args = check_run_arguments(num_queries=num_queries, query_indices=query_indices, params=params,
                               chunk_size=chunk_size, grad_chunk_size=grad_chunk_size,
                               query_batch_size=query_batch_size, dtype=dtype, self_influence=self_influence,
                               damping=damping)
    per_token = check_flag("per_token", per_token)
    settings = resolve_solver(solver)
    damping_spec = resolve_damping(damping)
    if train_dataset is None:
        raise InfluenceConfigError("train_dataset is None; pass the map-style Dataset the model was trained on.")
    if not any(True for _ in model.parameters()):
        raise InfluenceConfigError(f"model {type(model).__name__} has no parameters to attribute to.")
    report = progress or (lambda phase, done, total: None)
    timings: Dict[str, float] = {}

    comm = local_communicator(comm)
    with preserved_rng(), frozen_module(model), comm.agreement():
        problem = bind(model, train_dataset, args, loss_fn=loss_fn, collate_fn=collate_fn, comm=comm,
                       need_hvp=needs_hvp(settings), train_indices=train_indices)
        if not is_auto(settings):
            settings.check_size(problem.num_params, args.dtype)  # before any pass over the data
        check_finite_losses(problem)

        t0 = time.perf_counter()
        queries = query_gradients(problem, query_dataset, query_indices=args.query_indices,
                                  num_queries=args.num_queries, query_collate_fn=query_collate_fn,
                                  collate_fn=collate_fn, progress=report, per_token=per_token)
        timings["query_gradients"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        choice = chosen(settings, problem, len(queries.indices), self_influence)
        if choice is not None:  # solver="auto": the solver the rule picks for this problem
            settings = choice.settings
            settings.check_size(problem.num_params, args.dtype)
        inverse = fit_inverse(problem, settings, damping_spec)
        timings["solver_setup"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        solved = solve_queries(inverse, queries.grads, args.query_batch_size, report)
        tokens = queries.tokens
        token_solved = None
        if tokens is not None:  # the token terms: more right-hand sides of the same fitted inverse
            token_solved = solve_queries(inverse, tokens.grads, args.query_batch_size)  # default: as many as fit
            solved = SolvedQueries(torch.cat([solved.s_test, token_solved.s_test]), solved.batch_size, solved.chunks)
        timings["solve"] = time.perf_counter() - t0

        scores, self_inf, self_diags = _score(problem, inverse, solved, self_influence,
                                              args.query_batch_size or args.forward_chunk, report, timings)
        num_q = len(queries.indices)
        scores, token_scores = scores[:num_q], (scores[num_q:] if tokens is not None else None)

    timings["total"] = time.perf_counter() - t_start
    diagnostics = diagnostics_layout(
        settings.name,
        inverse.setup,
        solved.chunks,
        self_diags,
        [Diagnostic("hvp_calls", inverse.hvp_calls, "HVPs in all",
                    "batched Hessian-vector products over the whole run (setup, solves, self-influence)", "sum")],
    )
    if token_solved is not None:  # the token solves' scalars, combined (their rows are not rows of scores)
        diagnostics["token_solve"] = [d.to_dict() for d in combine_scalars([c[2] for c in token_solved.chunks])]
    return InfluenceResults(
        scores=scores.cpu(),
        query_indices=queries.indices.clone(),
        train_indices=problem.train.indices.clone(),
        query_losses=queries.losses.cpu(),
        self_influence=None if self_inf is None else self_inf.cpu(),
        query_targets=None if queries.targets is None else queries.targets.cpu(),
        query_predictions=None if queries.predictions is None else queries.predictions.cpu(),
        diagnostics=diagnostics,
        timings=timings,
        record=run_record(problem, settings, inverse, args, len(queries.indices), solved.batch_size, record_of(choice)),
        token_scores=None if token_scores is None else token_scores.cpu(),
        token_rows=None if tokens is None else tokens.rows.clone(),
        token_positions=None if tokens is None else tokens.positions.clone(),
        token_targets=None if tokens is None else tokens.targets.clone(),
    )


def _score(problem: InfluenceProblem, inverse: InverseHVP, solved: "SolvedQueries", self_influence: bool,
           self_batch: int, report: ProgressFn, timings: Dict[str, float]
           ) -> Tuple[Tensor, Optional[Tensor], List[Diagnostic]]:
    """Phases 4 and 5: the scores, streamed over the training set, and self-influence when asked (in the same
    pass for a factored inverse, else :func:`self_influence_scores` ``self_batch`` at a time), timed into
    ``timings``."""
    t0 = time.perf_counter()
    factored = isinstance(inverse, FactoredInverse)
    quadratic = _Quadratic(inverse)  # self-influence in the scoring pass (factored inverse)
    scores, self_inf = influence_scores(problem, solved.s_test, _counter(report, "scoring", problem.num_examples),
                                        quadratic if self_influence and factored else None)
    timings["scoring"] = time.perf_counter() - t0
    self_diags = combine_scalars(quadratic.diagnostics)
    if self_influence and not factored:
        t0 = time.perf_counter()
        self_inf, self_diags = self_influence_scores(problem, inverse, self_batch, report)
        timings["self_influence"] = time.perf_counter() - t0
    return scores, self_inf, self_diags


def run_record(problem: InfluenceProblem, settings: SolverSettings, inverse: InverseHVP, args: RunArguments,
               num_queries: int, query_batch_size: int, auto: Optional[Dict[str, Any]] = None) -> RunRecord:
    """The run record of one computation: each part from its owner (the solver's settings and facts, the
    damping choice, the run arguments, the bound problem)."""
    objective = problem.objective
    loss = "influence_loss" if objective.uses_hook else getattr(objective.loss_fn, "__name__", "loss_fn")
    return RunRecord(
        solver={**settings.composed().to_dict(), **inverse.facts, **(auto or {})},
        damping=inverse.choice,
        run=RunSettings(dtype=str(args.dtype).replace("torch.", ""), chunk_size=args.forward_chunk,
                        grad_chunk_size=problem.grad_chunk_size, query_batch_size=int(query_batch_size), loss=loss,
                        differentiation=str(objective.differentiation)),
        data=DataFacts(num_train_total=problem.num_examples, num_queries=int(num_queries),
                       num_params=objective.num_params, params=tuple(objective.param_names),
                       processes=problem.comm.world_size, device=str(objective.device)),
    )


# ---------------------------------------------------------------------------------------------- phases
@dataclass(frozen=True)
class QueryGradients:
    """Phase 2's output: the queries and what the maths and the reports need of them.

    Attributes:
        indices: dataset positions of the queries ``[Q]``.
        grads: ``∇L(z_q, θ̂)`` ``[Q, P]`` (the attributed parameters, flat).
        losses: ``L(z_q, θ̂)`` ``[Q]``.
        predictions: argmax of 2-D outputs ``[Q]``, or ``None``.
        targets: 1-D integer labels ``[Q]`` of ``(inputs, targets)`` batches, or ``None``.
        tokens: with ``per_token``, the token terms of the queries (:class:`~lightning_influence.tokens.QueryTokens`).
    """

    indices: Tensor
    grads: Tensor
    losses: Tensor
    predictions: Optional[Tensor]
    targets: Optional[Tensor]
    tokens: Optional[QueryTokens] = None


def query_gradients(
    problem: InfluenceProblem,
    query_dataset: Optional[Dataset] = None,
    *,
    query_indices: Optional[Sequence[int]] = None,
    num_queries: int = 16,
    query_collate_fn: Optional[Collate] = None,
    collate_fn: Optional[Collate] = None,
    progress: Optional[ProgressFn] = None,
    per_token: bool = False,
) -> QueryGradients:
    """Phase 2: the queries (``query_indices`` of ``query_dataset``, or its ``num_queries`` highest-loss
    examples) with their gradients, losses and predictions, and with ``per_token`` the gradients of their
    token terms (:func:`~lightning_influence.tokens.token_gradients`). ``query_dataset`` defaults to the
    training set (then ``collate_fn`` collates it). The same on every process (no collectives)."""
    objective = problem.objective
    if per_token:
        check_per_token(objective)
    qdata = problem.train.dataset if query_dataset is None else query_dataset
    qcollate = query_collate_fn or (collate_fn if query_dataset is None else None)
    chunk = problem.chunk_size
    if query_indices is None:
        candidates = ExampleSource(qdata, qcollate, objective.prepare_batch, what="query")
        query_indices = select_queries(objective, candidates, num_queries, chunk).tolist()
    queries = ExampleSource(qdata, qcollate, objective.prepare_batch, indices=query_indices, what="query")
    check_first_examples(objective, queries)
    q = len(queries)
    report = progress or (lambda phase, done, total: None)
    grads: List[Tensor] = []
    losses: List[Tensor] = []
    preds: List[Tensor] = []
    targets: List[Tensor] = []
    ignored: List[int] = []
    token_parts: List[QueryTokens] = []
    for start, batch in queries.chunks(chunk):
        ignored += objective.check_targets(batch, queries.indices[start : start + batch_size_of(batch)].tolist(),
                                           "query")
        grads.append(checked_grads(objective.loss, objective.space, objective.theta, batch, "query", start,
                                   indices=queries.indices, plan=objective.differentiation))
        losses.append(objective.losses(batch))
        out = objective.outputs(batch)
        if isinstance(out, Tensor) and out.dim() == 2:
            preds.append(out.argmax(dim=1))
        if not objective.uses_hook and isinstance(batch[1], Tensor) and batch[1].dim() == 1:
            targets.append(batch[1])
        if per_token:
            part = token_gradients(objective, batch, start,
                                   queries.indices[start : start + batch_size_of(batch)].tolist(),
                                   problem.grad_chunk_size, check=start == 0)
            if part is not None:
                token_parts.append(part)
        report("query_gradients", start + grads[-1].shape[0], q)
    if ignored:
        warnings.warn(
            f"query examples {ignored[:10]} have the label {IGNORE_INDEX} (cross-entropy's ignore_index): their "
            "loss and gradient are zero, so their rows of scores are all 0. Choose other query_indices.",
            UserWarning,
            stacklevel=3,
        )
    return QueryGradients(
        indices=queries.indices.clone(),
        grads=torch.cat(grads),
        losses=torch.cat(losses),
        predictions=torch.cat(preds) if len(preds) == len(losses) and preds else None,
        targets=torch.cat(targets) if len(targets) == len(losses) and targets else None,
        tokens=concat_tokens(token_parts) if per_token else None,
    )


def fit_inverse(
    problem: InfluenceProblem,
    solver: Union[str, SolverSettings] = "auto",
    damping: Union[float, str, AutoDamping] = "auto",
) -> InverseHVP:
    """Phase 3: the solver fitted to the problem, ``(H + λI)⁻¹`` ready to apply; the damping rule of the
    solver's kind resolves ``damping`` once (the choice is ``inverse.choice``)."""
    return resolve_solver(solver).fit(problem, resolve_damping(damping))


@dataclass(frozen=True)
class SolvedQueries:
    """``s_test = (H + λI)⁻¹ ∇L(z_q)`` ``[Q, P]``, the query batch size and each batch's
    ``(start, stop, diagnostics)``."""

    s_test: Tensor
    batch_size: int
    chunks: List[Tuple[int, int, List[Diagnostic]]]


#: memory the iterative solvers' state may take for one batch of right-hand sides (bytes). 512 MiB: with 1 GiB,
#: 2,000 queries on a 50,698-parameter MLP peaked at 2,085 MB (CG, chunks of 330; the queries' gradients and
#: solutions, 400 MB each, and the interpreter's 420 MB come on top)
SOLVE_BYTES = 1 << 29
#: ``[P]`` vectors an iterative solver holds per right-hand side: its iterates, residuals and directions
#: (CG: 5, LiSSA: 4 plus one per repeat) and the vmapped HVP's tangents and their gradients
SOLVE_VECTORS_PER_QUERY = 16


def default_query_batch(num_queries: int, num_params: int, itemsize: int, budget: Optional[int] = None) -> int:
    """Right-hand sides per solve when the caller gives none: all ``num_queries`` when their solver state
    (``SOLVE_VECTORS_PER_QUERY`` vectors of ``num_params`` numbers of ``itemsize`` bytes each) fits
    ``budget`` bytes (default :data:`SOLVE_BYTES`), else as many as fit (at least 1), so that memory stays
    bounded however many queries are asked. E.g. 2,000 queries on 50,000 float32 parameters: 167 per solve.

    Example:
        >>> default_query_batch(2000, 50_000, 4), default_query_batch(100, 2_000, 4)
        (167, 100)
    """
    per_query = SOLVE_VECTORS_PER_QUERY * max(1, int(num_params)) * int(itemsize)
    return int(max(1, min(int(num_queries), (SOLVE_BYTES if budget is None else budget) // per_query)))


def solve_queries(inverse: InverseHVP, grads: Tensor, query_batch_size: Optional[int] = None,
                  progress: Optional[ProgressFn] = None) -> SolvedQueries:
    """Phase 3 (continued): ``s_test`` for every row of ``grads`` ``[Q, P]``, ``query_batch_size`` rows
    at a time (default: :func:`default_query_batch`, all of them when they fit; the results do not depend
    on it beyond the solvers' tolerances)."""
    q = grads.shape[0]
    qb = query_batch_size or default_query_batch(q, grads.shape[1], grads.element_size())
    if q <= qb:  # one solve: its solution is the result
        res = inverse.solve(grads)
        if progress:
            progress("solve", q, q)
        return SolvedQueries(res.solution, qb, [(0, q, res.diagnostics)])
    out, chunks = None, []  # written chunk by chunk: never the chunks and their concatenation at once
    for s in range(0, q, qb):
        res = inverse.solve(grads[s : s + qb])
        if out is None:
            out = res.solution.new_empty((q,) + tuple(res.solution.shape[1:]))
        out[s : s + res.solution.shape[0]] = res.solution
        chunks.append((s, s + res.solution.shape[0], res.diagnostics))
        del res
        if progress:
            progress("solve", min(s + qb, q), q)
    return SolvedQueries(out, qb, chunks)


def self_influence_scores(problem: InfluenceProblem, inverse: InverseHVP, batch_size: Optional[int] = None,
                          progress: Optional[ProgressFn] = None) -> Tuple[Tensor, List[Diagnostic]]:
    """Phase 5: ``I_up,loss(z_i, z_i) = −∇L(z_i)ᵀ(H + λI)⁻¹∇L(z_i)`` for every training example ``[N]``
    (≤ 0; the most negative are the likeliest mislabelled or atypical), and the solver's diagnostics of
    those solves. A factored inverse does it in one streamed pass over this process's shard, gathered;
    an iterative one solves the gradients as batches of ``batch_size`` right-hand sides (default
    ``problem.chunk_size``), every process walking the whole training set with the HVPs split by shard."""
    n = problem.num_examples
    quadratic = _Quadratic(inverse)
    if isinstance(inverse, FactoredInverse):  # no queries: the scoring pass computes the quadratic only
        no_queries = torch.zeros(0, problem.num_params, dtype=problem.dtype, device=problem.device)
        _, values = influence_scores(problem, no_queries, _counter(progress, "self_influence", n), quadratic)
        assert values is not None
    else:
        values = _solved_self_influence(problem, quadratic, batch_size or problem.chunk_size,
                                        _counter(progress, "self_influence", n))
    return values, combine_scalars(quadratic.diagnostics)


class _Quadratic:
    """``inverse.quadratic`` as a plain function of the gradients, keeping each call's diagnostics."""

    def __init__(self, inverse: InverseHVP) -> None:
        self.inverse = inverse
        self.diagnostics: List[List[Diagnostic]] = []

    def __call__(self, g: Tensor) -> Tensor:
        values, diags = self.inverse.quadratic(g)
        self.diagnostics.append(diags)
        return values


def _counter(progress: Optional[ProgressFn], phase: str, total: int) -> Optional[Callable[[int], None]]:
    """A ``progress(examples_done_now)`` counter reporting ``(phase, done, total)``."""
    if progress is None:
        return None
    done = [0]

    def step(b: int) -> None:
        done[0] += b
        progress(phase, done[0], total)

    return step
