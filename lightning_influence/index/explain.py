"""Answering a batch of new query examples from an index, in the report format of
:func:`~lightning_influence.pipeline.compute_influence` (an :class:`InfluenceResults`)."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..data import Collate
from ..guards import preserved_rng
from ..objective import LossFn
from ..results import InfluenceResults, diagnostics_layout
from .fingerprint import IndexMismatchError

if TYPE_CHECKING:  # pragma: no cover
    from ..problem import InfluenceProblem
    from .index import InfluenceIndex

__all__ = ["explain"]


def _sketched_queries(index: "InfluenceIndex", problem: "InfluenceProblem", dataset: Dataset, indices: List[int],
                      collate_fn: Optional[Collate]) -> Optional[Tensor]:
    """A sketched index's query side from the layers' captured factors (as its rows were built: no rotation
    of formed gradients, :meth:`~lightning_influence.index.sketch.KroneckerWhitening.batch_sketch`), or
    ``None`` (not a sketch, or the model's layer plan differs from the index's: then ``index.scores`` of the
    formed gradients, which gives the same numbers more slowly)."""
    from ..data import ExampleSource
    from ..solvers.kronecker.capture import plan_layers

    if index.projection != "sketch" or not indices:
        return None
    whitening, sketch = index._sketch
    objective = problem.objective
    source = ExampleSource(dataset, collate_fn, objective.prepare_batch, indices=indices, what="query")
    chunks = list(source.chunks(problem.grad_chunk_size))
    bound = whitening.with_plan(plan_layers(objective, chunks[0][1]))
    if bound is None:
        return None
    return torch.cat([bound.batch_sketch(objective, batch, sketch, start)[0] for start, batch in chunks])


def explain(
    index: "InfluenceIndex",
    module: nn.Module,
    dataset: Dataset,
    indices: Optional[Sequence[int]] = None,
    *,
    num_queries: int = 16,
    loss_fn: Optional[LossFn] = None,
    collate_fn: Optional[Collate] = None,
    chunk_size: int = 256,
) -> InfluenceResults:
    """The influence of every indexed training example on the query examples ``indices`` of ``dataset``
    (default: its ``num_queries`` highest-loss examples), from ``index`` without touching the training set:
    the queries' gradients (the index's parameters and dtype, the same loss: ``loss_fn`` or the module's
    ``influence_loss``), then :meth:`InfluenceIndex.scores`.

    Returns:
        :class:`InfluenceResults` as :func:`~lightning_influence.pipeline.compute_influence` returns them:
        scores ``[Q, N]`` (positive = harmful), the queries' indices, losses, labels and predictions, the
        index's self-influence when it holds one, and the build's record (``num_queries`` = ``Q``).
        The model is not modified; the random states are restored.

    Raises:
        IndexMismatchError: ``module``'s attributed weights, or the loss, are not those the index was built
            for (the message names what differs; the fix is to rebuild the index).
    """
    from ..pipeline import bind, frozen_module, query_gradients
    from ..validation import check_run_arguments

    t_start = time.perf_counter()
    index.check_module(module)
    args = check_run_arguments(num_queries=num_queries, query_indices=indices, params=list(index.params),
                               chunk_size=chunk_size, dtype=index.dtype)
    with preserved_rng(), frozen_module(module):
        problem = bind(module, dataset, args, loss_fn=loss_fn, collate_fn=collate_fn, need_hvp=False)
        objective = problem.objective
        loss = "influence_loss" if objective.uses_hook else getattr(objective.loss_fn, "__name__", "loss_fn")
        built = index.meta.get("loss")
        if built is not None and loss != built:
            raise IndexMismatchError(
                f"the index at {index.path} was built with the loss {built!r}, this query uses {loss!r}: scores would "
                "mix two objectives. Pass the loss_fn the index was built with, or rebuild the index with this one.")
        if tuple(objective.param_names) != index.params:
            raise IndexMismatchError(f"the query's parameters {list(objective.param_names)[:5]} are not the index's "
                                     f"{list(index.params)[:5]}; rebuild the index or pass the same module.")
        t0 = time.perf_counter()
        queries = query_gradients(problem, dataset, query_indices=args.query_indices, num_queries=args.num_queries,
                                  query_collate_fn=collate_fn)
        t1 = time.perf_counter()
        z = _sketched_queries(index, problem, dataset, queries.indices.tolist(), collate_fn)
        scores = index.scores(queries.grads) if z is None else index.scores_from_projection(z)
        t2 = time.perf_counter()
    record = index.record
    if record.data is not None:
        record = dataclasses.replace(record, data=dataclasses.replace(record.data, num_queries=len(queries.indices)))
    self_inf = index.self_influence
    return InfluenceResults(
        scores=scores.cpu(),
        query_indices=queries.indices.clone(),
        train_indices=index.train_indices.clone(),
        query_losses=queries.losses.cpu(),
        self_influence=None if self_inf is None else self_inf.clone(),
        query_targets=None if queries.targets is None else queries.targets.cpu(),
        query_predictions=None if queries.predictions is None else queries.predictions.cpu(),
        diagnostics=diagnostics_layout(index.solver),
        timings={"query_gradients": t1 - t0, "index_scores": t2 - t1, "total": time.perf_counter() - t_start},
        record=record,
    )
