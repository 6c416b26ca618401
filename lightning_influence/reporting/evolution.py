"""How the top training examples move across the runs of one fit (``InfluenceCallback(every_n_epochs=k)``),
as plain data that the HTML and W&B reporters lay out.

For every run (keyed by its :class:`~lightning_influence.record.RunKey`, or by its epoch) and every kind, a :class:`Ranking` lists the top training examples and
how many of them were already in the previous run's list of the same kind and scope:

* ``"harmful"`` / ``"helpful"`` with ``query_id=None``: ranked by the **mean score over the run's
  queries**, i.e. the influence on the mean query loss (positive = harmful, negative = helpful, as for
  one query). Comparable across runs even when the queries change (the default queries are the
  highest-loss validation examples of each run).
* ``"harmful"`` / ``"helpful"`` with a ``query_id``: one query's own ranking; compared with the previous
  run only when that query was also one of its queries (pass ``query_indices=`` to follow fixed queries).
* ``"self_influence"``: the self-influence suspects (most negative ``I_up,loss(z, z)``), when computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..record import RunKey
from ..results import InfluenceResults, Ranked
from ..scoring import top_k

__all__ = ["Ranking", "rankings", "kept_fractions", "ids_text", "KINDS"]

#: the kinds of ranking followed across runs, in display order
KINDS = ("harmful", "helpful", "self_influence")


@dataclass(frozen=True)
class Ranking:
    """The top training examples of one ``kind`` at the run of ``epoch`` (0-based, after that epoch's
    training steps; ``global_step`` optimizer steps), for one query (``query_id``, a position in the query
    dataset) or for all queries (``None``: mean score over the queries; always ``None`` for
    self-influence).

    ``train_ids`` / ``scores`` are ranked, largest influence first (scores in query-loss units per unit
    of up-weighting; self-influence for ``"self_influence"``). ``previous_ranks[i]`` is the 1-based rank
    of ``train_ids[i]`` in the previous run's ranking of the same kind and scope (``None``: it was not
    listed). ``kept`` counts the examples that were listed before; it is ``None`` when there is nothing to
    compare with (first run, or the query was not a query of the previous run).
    """

    epoch: int
    global_step: int
    kind: str
    query_id: Optional[int]
    train_ids: List[int]
    scores: List[float]
    previous_ranks: List[Optional[int]]
    kept: Optional[int]
    #: the run's key in the history (a :class:`~lightning_influence.record.RunKey`, or its epoch)
    run: Any = None

    @property
    def label(self) -> str:
        """How the run is named in reports (``"epoch 2"``, ``"step 300"``, ``"end of training"``)."""
        return self.run.label if isinstance(self.run, RunKey) else f"epoch {self.epoch}"


def _aggregate(results: InfluenceResults, kind: str, k: int) -> Ranked:
    """Top ``k`` by the mean score over the queries: positive ones for harmful, negative for helpful."""
    mean = results.scores.double().mean(0)
    idx, vals = top_k(mean, min(k, results.num_train), largest=kind == "harmful")
    keep = vals > 0 if kind == "harmful" else vals < 0
    return Ranked(results.train_indices[idx[keep]], vals[keep])


def _ranked(results: InfluenceResults, kind: str, query_id: Optional[int], k: int, suspects_k: int) -> Ranked:
    if kind == "self_influence":
        return results.top_self_influence(min(suspects_k, results.num_train))
    if query_id is None:
        return _aggregate(results, kind, k)
    row = results.row_of(query_id)
    return results.top_harmful(row, k) if kind == "harmful" else results.top_helpful(row, k)


def _scopes(results: InfluenceResults, per_query: bool) -> List[Tuple[str, Optional[int]]]:
    scopes: List[Tuple[str, Optional[int]]] = [("harmful", None), ("helpful", None)]
    if results.self_influence is not None:
        scopes.append(("self_influence", None))
    if per_query:
        for q in results.query_indices.tolist():
            scopes += [("harmful", int(q)), ("helpful", int(q))]
    return scopes


def rankings(
    history: Mapping[int, InfluenceResults], k: int, suspects_k: Optional[int] = None, per_query: bool = True
) -> List[Ranking]:
    """Every run's rankings, in epoch order, each compared with the previous run's.

    Args:
        history: ``{run: results}`` (e.g. ``InfluenceCallback.history``), keyed by
            :class:`~lightning_influence.record.RunKey` or by epoch; ranked in training order.
        k: examples per harmful / helpful ranking (fewer when fewer scores have that sign).
        suspects_k: self-influence suspects per run (default ``max(k, 10)``, as in the reports).
        per_query: also rank each query's own examples.
    """
    suspects_k = max(k, 10) if suspects_k is None else suspects_k
    out: List[Ranking] = []
    previous: Dict[Tuple[str, Optional[int]], List[int]] = {}
    for run in sorted(history):
        res = history[run]
        epoch = run.epoch if isinstance(run, RunKey) else int(run)
        step = int(res.settings.get("global_step", -1))
        current: Dict[Tuple[str, Optional[int]], List[int]] = {}
        for kind, query_id in _scopes(res, per_query):
            ranked = _ranked(res, kind, query_id, k, suspects_k)
            ids = [int(i) for i in ranked.indices.tolist()]
            before = previous.get((kind, query_id))
            ranks = [None if before is None or i not in before else before.index(i) + 1 for i in ids]
            out.append(Ranking(int(epoch), step, kind, query_id, ids, [float(s) for s in ranked.scores.tolist()],
                               ranks, None if before is None else sum(r is not None for r in ranks), run))
            current[(kind, query_id)] = ids
        previous = current
    return out


def kept_fractions(history: Mapping[int, InfluenceResults], k: int, suspects_k: Optional[int] = None) -> Dict[str, float]:
    """For the latest run, the fraction (0..1) of each all-queries ranking that was already in the
    previous run's, keyed ``influence/over_epochs/<kind>_kept``; ``{}`` with fewer than two runs. 1 means
    the same examples as before (in any order), 0 an entirely new list."""
    if len(history) < 2:
        return {}
    pair = {e: history[e] for e in sorted(history)[-2:]}
    last = max(pair)
    out: Dict[str, float] = {}
    for r in rankings(pair, k, suspects_k, per_query=False):
        if r.run == last and r.kept is not None and r.train_ids:
            out[f"influence/over_epochs/{r.kind}_kept"] = r.kept / len(r.train_ids)
    return out


def ids_text(ids: Sequence[int]) -> str:
    """``"#3, #17, #5"``."""
    return ", ".join(f"#{i}" for i in ids)
