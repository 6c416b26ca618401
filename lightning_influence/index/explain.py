"""Answering a batch of new query examples from an index, in the report format of
:func:`~lightning_influence.pipeline.compute_influence` (an :class:`InfluenceResults`)."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Optional, Sequence

from torch import nn
from torch.utils.data import Dataset

from ..data import Collate
from ..guards import preserved_rng
from ..objective import LossFn
from ..results import InfluenceResults, diagnostics_layout
from .fingerprint import IndexMismatchError

if TYPE_CHECKING:  # pragma: no cover
    from .index import InfluenceIndex

__all__ = ["explain"]


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
                                  collate_fn=collate_fn)
        t1 = time.perf_counter()
        scores = index.scores(queries.grads)
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
