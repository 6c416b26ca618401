"""An influence index: the training set's side of influence stored once, so that new queries are answered
without recomputing any training gradient.

Build it from a fitted inverse and the bound training set (:func:`build_index`, or
:func:`build_index_for_run` from a trained model), then answer queries from the folder, in this process or
another (:meth:`InfluenceIndex.load`)::

    index = build_index_for_run(model, train_set, "runs/index", solver="ekfac", representation="compressed")
    results = InfluenceIndex.load("runs/index").explain(model, val_set, [3, 14, 15])  # InfluenceResults

Scores keep Koh & Liang's sign (positive = harmful). An index refuses a model whose attributed weights differ
from those it was built for (:class:`IndexMismatchError`).
"""

from .build import (DEFAULT_PROJECTION_DIM, PROJECTIONS, REPRESENTATIONS, Projection, Representation, build_index,
                    build_index_for_run)
from .explain import explain
from .fingerprint import IndexMismatchError
from .index import InfluenceIndex

__all__ = ["DEFAULT_PROJECTION_DIM", "IndexMismatchError", "InfluenceIndex", "PROJECTIONS", "Projection",
           "REPRESENTATIONS", "Representation",
           "build_index", "build_index_for_run", "explain"]
