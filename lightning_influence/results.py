"""``InfluenceResults``: the one object every report and user reads."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .checks import is_int
from .diagnostics import Diagnostic, combine_scalars, from_dicts
from .errors import InfluenceConfigError, ResultsFileError
from .persistence import atomic_save, check_results_state, load_state, state_checksum, tensor_checksum, tensors_of
from .record import RunKey, RunRecord
from .scoring import top_k

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["InfluenceResults", "Ranked", "SolveChunk", "TokenScores", "diagnostics_layout"]

#: 2: ``diagnostics`` holds typed diagnostics (``solver``, ``setup``, ``solve`` chunks, ``self_influence``,
#: ``totals``; see :class:`InfluenceResults`); 3: a typed ``record`` replaces the flat ``settings``, and the
#: checksum covers the metadata too; 4: optional per-token scores (``token_scores``, ``token_rows``,
#: ``token_positions``, ``token_targets``). Files of formats 2 and 3 are read (they have no token scores).
_FORMAT_VERSION = 4
_READABLE = (2, 3, _FORMAT_VERSION)
_GROUP_LABELS = {"setup": "setup", "solve": "query solves", "self_influence": "self-influence solves",
                 "total": "whole run"}


class TokenScores(NamedTuple):
    """One query's per-token scores: the flat ``positions`` of its scored targets ``[T_q]``, the target
    token ids there ``[T_q]`` and ``scores [T_q, N]`` (row ``j``: token ``positions[j]``; sum over ``j`` =
    the query's row of ``scores``)."""

    positions: Tensor
    targets: Tensor
    scores: Tensor


class Ranked(NamedTuple):
    """Training examples ranked for one query: dataset ``indices`` and their ``scores``."""

    indices: Tensor
    scores: Tensor


class SolveChunk(NamedTuple):
    """One chunk of queries the solver handled together: rows ``start:stop`` of ``scores`` and the
    diagnostics the solver returned for them."""

    start: int
    stop: int
    items: List[Diagnostic]


def diagnostics_layout(
    solver: str,
    setup: Sequence[Diagnostic] = (),
    chunks: Sequence[Tuple[int, int, Sequence[Diagnostic]]] = (),
    self_influence: Sequence[Diagnostic] = (),
    totals: Sequence[Diagnostic] = (),
) -> Dict[str, Any]:
    """``InfluenceResults.diagnostics`` as plain data: the solver's name, ``inverse.setup``, one
    ``(start, stop, solve_result.diagnostics)`` per query chunk (rows ``start:stop`` of the scores), the
    self-influence solves' scalars (already combined) and whole-run totals."""
    return {
        "solver": str(solver),
        "setup": [d.to_dict() for d in setup],
        "solve": [{"start": int(a), "stop": int(b), "items": [d.to_dict() for d in items]} for a, b, items in chunks],
        "self_influence": [d.to_dict() for d in self_influence],
        "totals": [d.to_dict() for d in totals],
    }


def _number(v: Any) -> float:
    """A per-query value as a float: numbers as they are, booleans 0/1, anything else NaN."""
    return float(v) if isinstance(v, (int, float)) else math.nan


_TENSORS = ("scores", "query_indices", "train_indices", "query_losses", "self_influence", "query_targets",
            "query_predictions")
_TOKEN_TENSORS = ("token_scores", "token_rows", "token_positions", "token_targets")
_DATA = ("record", "diagnostics", "timings")


def _expected_checksum(state: Dict[str, Any], version: Any, source: str) -> str:
    """The checksum ``state`` should carry; content that cannot even be hashed (a flipped byte that turned a
    key into another type) is a corrupted file."""
    try:
        return tensor_checksum(tensors_of(state)) if version == 2 else state_checksum({**state, "format_version": version})
    except (TypeError, ValueError, RecursionError) as err:
        raise ResultsFileError(
            f"{source} is corrupted: its metadata cannot be read back as written ({type(err).__name__}: {err}; bytes "
            "changed on disk or in transfer). Recompute the results."
        ) from err


class InfluenceResults:
    """Influence of every training example on every query.

    Sign convention (Koh & Liang, 2017): ``scores[q, i] = I_up,loss(z_i, z_q) =
    −∇L(z_q)ᵀ (H + λI)⁻¹ ∇L(z_i)``, in units of query loss per unit of up-weighting.
    **Positive = harmful** (up-weighting ``z_i`` raises query ``q``'s loss; removing it would lower it),
    **negative = helpful**. Removing ``z_i`` changes the query loss by about ``−scores[q, i] / n``
    (:meth:`predicted_loss_change`).

    Attributes:
        scores: ``[Q, N]`` float tensor on the CPU.
        query_indices: ``[Q]`` positions of the queries in the query dataset.
        train_indices: ``[N]`` positions of the scored examples in the training dataset (column ``i`` of
            ``scores`` is training example ``train_indices[i]``).
        query_losses: ``[Q]`` loss of each query at the trained weights.
        self_influence: ``[N]`` ``I_up,loss(z_i, z_i)`` (≤ 0 for a positive definite Hessian; most
            negative = the model relies most on the example to fit itself), or ``None``.
        query_targets / query_predictions: ``[Q]`` labels and predicted classes when known.
        record: how the scores were computed, as a typed :class:`~lightning_influence.record.RunRecord`
            (solver settings, the damping choice, run arguments, data facts, the run of a fit).
        settings: the record as a read-only flat dict (``damping``, ``solver``, ``num_train_total``, …;
            the keys of earlier versions). ``InfluenceResults(..., settings={...})`` builds the record from
            such a dict.
        diagnostics: the solver's typed diagnostics (:class:`~lightning_influence.diagnostics.Diagnostic`
            stored as plain dicts): ``{"solver": name, "setup": [...], "solve": [{"start", "stop",
            "items": [...]}, ...], "self_influence": [...], "totals": [...]}``. ``setup`` is what
            ``fit`` recorded; each ``solve`` entry one chunk of queries, rows ``start:stop`` of
            ``scores``; ``self_influence`` the self-influence solves' scalars, already combined;
            ``totals`` whole-run counts. Read them through :meth:`setup_diagnostics`,
            :meth:`solve_chunks`, :meth:`per_query_diagnostics`, :meth:`summary_diagnostics` and
            :meth:`diagnostic`. With per-token scores, ``"token_solve"`` holds the token solves' scalars, combined
            (their right-hand sides are not rows of ``scores``).
        timings: seconds per phase, and ``total``.
        token_scores: with ``per_token=True``, ``[R, N]`` per-token scores in a compact layout: row ``r`` is
            ``−∇L_t(z_q)ᵀ (H + λI)⁻¹ ∇L(z_i)`` for target position ``t = token_positions[r]`` of query row
            ``q = token_rows[r]`` (same units and sign as ``scores``; a query's rows sum to ``scores[q]``).
            Only scored targets have rows: ``-100`` (padding) positions have none. ``None`` otherwise.
        token_rows / token_positions / token_targets: ``[R]`` integers: the query row (ascending), the flat
            position in the query's targets, and the target token id there. Read them per query with
            :meth:`tokens_of`, or as a padded ``[Q, T, N]`` tensor with :meth:`dense_token_scores`.

    Example:
        >>> import torch
        >>> res = InfluenceResults(scores=torch.tensor([[0.5, -2.0, 1.5]]), query_indices=torch.tensor([7]),
        ...                        train_indices=torch.arange(3), query_losses=torch.tensor([0.3]),
        ...                        settings={"solver": "exact", "damping": 0.1, "num_train_total": 3})
        >>> res.top_harmful(query_id=7, k=2).indices.tolist(), res.top_helpful(0).indices.tolist()
        ([2, 0], [1])
        >>> res.predicted_loss_change()  # removing example 1 raises the query loss by about 2/3
        tensor([[-0.1667,  0.6667, -0.5000]])
    """

    def __init__(
        self,
        scores: Tensor,
        query_indices: Tensor,
        train_indices: Tensor,
        query_losses: Tensor,
        self_influence: Optional[Tensor] = None,
        query_targets: Optional[Tensor] = None,
        query_predictions: Optional[Tensor] = None,
        settings: Optional[Mapping[str, Any]] = None,
        diagnostics: Optional[Dict[str, Any]] = None,
        timings: Optional[Dict[str, float]] = None,
        *,
        record: Optional[RunRecord] = None,
        token_scores: Optional[Tensor] = None,
        token_rows: Optional[Tensor] = None,
        token_positions: Optional[Tensor] = None,
        token_targets: Optional[Tensor] = None,
    ) -> None:
        if record is not None and settings:
            raise InfluenceConfigError("pass record= or settings= to InfluenceResults, not both.")
        self.scores, self.query_indices, self.train_indices = scores, query_indices, train_indices
        self.query_losses, self.self_influence = query_losses, self_influence
        self.query_targets, self.query_predictions = query_targets, query_predictions
        self.record: RunRecord = record if record is not None else RunRecord.from_flat(settings or {})
        self.diagnostics: Dict[str, Any] = dict(diagnostics or {})
        self.timings: Dict[str, float] = dict(timings or {})
        q, n = self.scores.shape
        if self.query_indices.shape != (q,) or self.train_indices.shape != (n,):
            raise InfluenceConfigError(
                f"scores {tuple(self.scores.shape)} disagree with query_indices {tuple(self.query_indices.shape)} "
                f"or train_indices {tuple(self.train_indices.shape)}."
            )
        self.token_scores, self.token_rows = token_scores, token_rows
        self.token_positions, self.token_targets = token_positions, token_targets
        given = [t is not None for t in (token_scores, token_rows, token_positions, token_targets)]
        if any(given) and not all(given):
            raise InfluenceConfigError("token_scores, token_rows, token_positions and token_targets go together: "
                                       "pass all four (per_token=True results) or none.")
        if token_scores is not None:
            r = token_scores.shape[0] if token_scores.dim() == 2 else -1
            if (token_scores.dim() != 2 or token_scores.shape[1] != n
                    or any(t.shape != (r,) for t in (token_rows, token_positions, token_targets))):  # type: ignore[union-attr]
                raise InfluenceConfigError(
                    f"token_scores {tuple(token_scores.shape)} must be [R, {n}] with token_rows, token_positions and "
                    f"token_targets of shape [R]."
                )

    @property
    def settings(self) -> Mapping[str, Any]:
        """The record as a read-only flat dict (see :class:`~lightning_influence.record.RunRecord`)."""
        return self.record.flat()

    @property
    def key(self) -> Optional[RunKey]:
        """Which run of a fit these results are (``None`` outside a training loop)."""
        return self.record.key

    # ------------------------------------------------------------------ sizes
    @property
    def num_queries(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_train(self) -> int:
        return int(self.scores.shape[1])

    @property
    def damping(self) -> float:
        """The damping ``λ`` the scores were computed with (Hessian units)."""
        return float(self.settings.get("damping", float("nan")))

    @property
    def wall_time(self) -> float:
        """Total seconds spent computing these results."""
        return float(self.timings.get("total", sum(self.timings.values())))

    # ------------------------------------------------------------------ diagnostics
    @property
    def solver(self) -> Optional[str]:
        """The solver that produced the scores (``diagnostics["solver"]``, else ``settings["solver"]``)."""
        name = (self.diagnostics or {}).get("solver", self.settings.get("solver"))
        return None if name is None else str(name)

    def _group(self, key: str) -> List[Diagnostic]:
        raw = (self.diagnostics or {}).get(key) or []
        if not isinstance(raw, (list, tuple)):
            raise InfluenceConfigError(f"diagnostics[{key!r}] must be a list of diagnostics, got {type(raw).__name__}.")
        return from_dicts(raw)

    def setup_diagnostics(self) -> List[Diagnostic]:
        """What the solver recorded when it was fitted (``diagnostics["setup"]``): damping choice, spectral
        estimates, preconditioner, Hessian-vector products spent, …"""
        return self._group("setup")

    def self_influence_diagnostics(self) -> List[Diagnostic]:
        """Scalars of the self-influence solves, already combined over their chunks
        (``diagnostics["self_influence"]``; empty when self-influence was not computed)."""
        return self._group("self_influence")

    def total_diagnostics(self) -> List[Diagnostic]:
        """Totals over the whole run (``diagnostics["totals"]``, e.g. ``hvp_calls``)."""
        return self._group("totals")

    def solve_chunks(self) -> List[SolveChunk]:
        """The query solves in order (``diagnostics["solve"]``): each covers rows ``start:stop`` of
        ``scores`` and holds the diagnostics the solver returned for them. ``[]`` when none were recorded.

        Raises:
            InfluenceConfigError: a chunk is not ``{"start": int, "stop": int, "items": [...]}`` with
                ``0 <= start <= stop <= num_queries``.
        """
        raw = (self.diagnostics or {}).get("solve") or []
        if not isinstance(raw, (list, tuple)):
            raise InfluenceConfigError(f"diagnostics['solve'] must be a list of chunks, got {type(raw).__name__}.")
        out = []
        for k, chunk in enumerate(raw):
            start = chunk.get("start") if isinstance(chunk, Mapping) else None
            stop = chunk.get("stop") if isinstance(chunk, Mapping) else None
            if not (is_int(start) and is_int(stop) and 0 <= start <= stop <= self.num_queries):
                raise InfluenceConfigError(
                    f"diagnostics['solve'][{k}] must be {{'start': int, 'stop': int, 'items': [...]}} with "
                    f"0 <= start <= stop <= {self.num_queries} (the number of queries); got {chunk!r:.200}."
                )
            out.append(SolveChunk(int(start), int(stop), from_dicts(chunk.get("items"))))
        return out

    def per_query_diagnostics(self) -> Dict[str, Tensor]:
        """Every ``kind == "per_query"`` diagnostic of the query solves, concatenated over the chunks:
        ``{name: [Q] float64 tensor}`` in the order the names first appear, entry ``q`` belonging to row
        ``q`` of ``scores``. NaN where a chunk did not record the name, or recorded a non-number or NaN
        (booleans become 0/1). Labels and meanings: :meth:`diagnostic`.

        Raises:
            InfluenceConfigError: a chunk's list does not have one value per query of the chunk.
        """
        out: Dict[str, Tensor] = {}
        for k, chunk in enumerate(self.solve_chunks()):
            for d in chunk.items:
                if d.kind != "per_query":
                    continue
                values = d.value if isinstance(d.value, (list, tuple)) else None
                if values is None or len(values) != chunk.stop - chunk.start:
                    got = f"{len(values)} values" if values is not None else repr(d.value)[:80]
                    raise InfluenceConfigError(
                        f"per-query diagnostic {d.name!r} of solve chunk {k} (queries {chunk.start}:{chunk.stop}) "
                        f"must hold {chunk.stop - chunk.start} values, got {got}."
                    )
                if d.name not in out:
                    out[d.name] = torch.full((self.num_queries,), math.nan, dtype=torch.float64)
                out[d.name][chunk.start : chunk.stop] = torch.tensor([_number(v) for v in values], dtype=torch.float64)
        return out

    def _groups(self) -> List[Tuple[str, List[Diagnostic]]]:
        chunks = [d for c in self.solve_chunks() for d in c.items]
        return [("setup", self.setup_diagnostics()), ("solve", chunks),
                ("self_influence", self.self_influence_diagnostics()), ("total", self.total_diagnostics())]

    def diagnostic(self, name: str) -> Optional[Diagnostic]:
        """The first diagnostic called ``name`` (setup, then the query chunks in order, self-influence,
        totals), for its ``label``, ``meaning``, ``kind`` and ``reduce``; its ``value`` is that one
        occurrence's (use :meth:`summary_diagnostics` for combined values). ``None`` when absent."""
        for _, items in self._groups():
            for d in items:
                if d.key == name or (d.name == name and not d.source):
                    return d
        for _, items in self._groups():
            for d in items:
                if d.name == name:
                    return d
        return None

    def summary_diagnostics(self) -> List[Diagnostic]:
        """One scalar per diagnostic: the setup's, the query chunks' combined by each one's ``reduce``
        (:func:`~lightning_influence.diagnostics.combine_scalars`), the self-influence solves', then the
        totals, in that order. Per-query lists and series are left out.

        A name recorded in several of these groups keeps its plain name where it appears first (the more
        specific group: ``hvp_calls`` of the query solves before the run's total); each later occurrence
        is kept under ``<group>_<name>`` (``self_influence_converged``, ``total_hvp_calls``) with the
        group named in its label, so no value is lost and every name is unique.
        """
        setup, _, self_inf, totals = (g for _, g in self._groups())
        combined = combine_scalars([c.items for c in self.solve_chunks()])
        out: List[Diagnostic] = []
        seen = set()
        for group, items in (("setup", setup), ("solve", combined), ("self_influence", self_inf), ("total", totals)):
            for d in items:
                if d.kind != "scalar":
                    continue
                if d.key in seen:
                    d = replace(d, name=f"{group}_{d.name}", label=f"{d.label} ({_GROUP_LABELS[group]})")
                    if d.key in seen:
                        continue
                seen.add(d.key)
                out.append(d)
        return out

    # ------------------------------------------------------------------ rankings
    def row_of(self, query_id: int) -> int:
        """The row of ``scores`` that belongs to query ``query_id``, a position in the query dataset.

        Raises:
            InfluenceConfigError: ``query_id`` is not one of :attr:`query_indices`.
        """
        hits = (self.query_indices == int(query_id)).nonzero().flatten()
        if hits.numel() == 0:
            shown = ", ".join(str(i) for i in self.query_indices[:8].tolist())
            raise InfluenceConfigError(
                f"query_id={query_id} is not one of the {self.num_queries} queries (query dataset positions {shown}"
                f"{', …' if self.num_queries > 8 else ''}); pass one of those, or row= for a row of scores."
            )
        return int(hits[0])

    def _row(self, row: Optional[int], query_id: Optional[int]) -> Tensor:
        if (row is None) == (query_id is None):
            raise InfluenceConfigError(
                f"pass exactly one of row= (a row of scores, 0..{self.num_queries - 1}) or query_id= (a position "
                f"in the query dataset, one of query_indices); got row={row!r}, query_id={query_id!r}."
            )
        if query_id is not None:
            row = self.row_of(query_id)
        assert row is not None
        if not -self.num_queries <= int(row) < self.num_queries:
            raise IndexError(
                f"row={row} is out of range for {self.num_queries} queries (0..{self.num_queries - 1}); to select a "
                "query by its position in the query dataset, pass query_id= instead."
            )
        return self.scores[int(row)]

    def top_harmful(self, row: Optional[int] = None, k: int = 10, *, query_id: Optional[int] = None) -> Ranked:
        """Up to ``k`` training examples with a **positive** score for one query, largest first: removing
        them would lower that query's loss the most. Fewer than ``k`` when fewer examples are harmful; never
        a helpful one.

        Args:
            row: the query's row of ``scores`` (``0..Q-1``, the order of :attr:`query_indices`).
            query_id: instead of ``row``, the query's position in the query dataset.
        """
        idx, vals = top_k(self._row(row, query_id), k, largest=True)
        keep = vals > 0
        return Ranked(self.train_indices[idx[keep]], vals[keep])

    def top_helpful(self, row: Optional[int] = None, k: int = 10, *, query_id: Optional[int] = None) -> Ranked:
        """Up to ``k`` training examples with a **negative** score for one query, most negative first:
        removing them would raise that query's loss the most. Fewer than ``k`` when fewer examples are
        helpful; never a harmful one. ``row`` / ``query_id`` as in :meth:`top_harmful`."""
        idx, vals = top_k(self._row(row, query_id), k, largest=False)
        keep = vals < 0
        return Ranked(self.train_indices[idx[keep]], vals[keep])

    def top_self_influence(self, k: int = 10) -> Ranked:
        """The ``k`` training examples with the most negative self-influence (likely mislabelled or
        atypical: the model must bend most to fit them)."""
        if self.self_influence is None:
            raise InfluenceConfigError(
                "self-influence was not computed; pass self_influence=True to InfluenceCallback or compute_influence."
            )
        idx, vals = top_k(self.self_influence, k, largest=False)
        return Ranked(self.train_indices[idx], vals)

    def predicted_loss_change(self) -> Tensor:
        """``[Q, N]``: first-order change in each query's loss if each training example were removed,
        ``−scores / n`` (loss units)."""
        return -self.scores / float(self.settings.get("num_train_total", self.num_train))

    # ------------------------------------------------------------------ per-token scores
    @property
    def has_token_scores(self) -> bool:
        """Whether per-token scores were computed (``per_token=True``)."""
        return self.token_scores is not None

    def _check_tokens(self) -> None:
        if self.token_scores is None:
            raise InfluenceConfigError("per-token scores were not computed; pass per_token=True to compute_influence "
                                       "or InfluenceCallback (a language model's queries: a loss summed over tokens).")

    def tokens_of(self, row: Optional[int] = None, *, query_id: Optional[int] = None) -> TokenScores:
        """One query's per-token scores (:class:`TokenScores`), by ``row`` of ``scores`` or ``query_id``
        (as :meth:`top_harmful`); empty when the query has no scored token."""
        self._check_tokens()
        q = int(self.row_of(query_id)) if query_id is not None else int(self._row_index(row))
        keep = (self.token_rows == q).nonzero().flatten()  # type: ignore[operator]
        return TokenScores(self.token_positions[keep], self.token_targets[keep],  # type: ignore[index]
                           self.token_scores[keep])  # type: ignore[index]

    def dense_token_scores(self) -> Tensor:
        """The per-token scores as ``[Q, T, N]``, ``T`` one more than the largest scored position; NaN where a
        query has no scored token at that position (padding, or beyond its length). ``nansum`` over ``T``
        gives ``scores``. Memory ``Q·T·N`` numbers: prefer :meth:`tokens_of` for long sequences."""
        self._check_tokens()
        t = int(self.token_positions.max()) + 1 if self.token_positions.numel() else 0  # type: ignore[union-attr]
        out = torch.full((self.num_queries, t, self.num_train), math.nan, dtype=self.token_scores.dtype)  # type: ignore[union-attr]
        out[self.token_rows, self.token_positions] = self.token_scores  # type: ignore[index]
        return out

    def _row_index(self, row: Optional[int]) -> int:
        if row is None or not -self.num_queries <= int(row) < self.num_queries:
            raise IndexError(f"row={row!r} is out of range for {self.num_queries} queries (0..{self.num_queries - 1}).")
        return int(row) % self.num_queries

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> Dict[str, Any]:
        """The results as plain data: every tensor (detached, on the CPU), the record as plain data,
        diagnostics and timings, ``format_version`` and a ``checksum`` of all of it (tensors and metadata).
        What :meth:`save` writes and the callback's ``state_dict`` stores; :meth:`from_state` reads it back."""
        state: Dict[str, Any] = {k: getattr(self, k) for k in _TENSORS}
        if self.token_scores is not None:
            state.update({k: getattr(self, k) for k in _TOKEN_TENSORS})
        state = {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in state.items()}
        state.update(record=self.record.to_dict(), diagnostics=self.diagnostics, timings=self.timings)
        state["format_version"] = _FORMAT_VERSION
        state["checksum"] = state_checksum(state)
        return state

    @classmethod
    def from_state(cls, state: Any, source: str = "the results state") -> "InfluenceResults":
        """Results from :meth:`to_state`'s plain data (not modified), checked as :meth:`load` checks a file;
        ``source`` names where the state came from in error messages. States of format 2 (a flat
        ``settings`` dict, a checksum over the tensors only) are read too.

        Raises:
            InfluenceConfigError: not an InfluenceResults state of a known format.
            ResultsFileError: content not matching its checksum, unknown fields, wrong shapes or NaN/inf.
        """
        state = dict(state) if isinstance(state, Mapping) else state
        version = state.pop("format_version", None) if isinstance(state, dict) else None
        if version is None:
            raise InfluenceConfigError(f"{source} is not an InfluenceResults file (no format_version): another "
                                       "file, or one whose metadata is corrupted. Recompute the results.")
        if version not in _READABLE:
            raise InfluenceConfigError(
                f"{source} is an InfluenceResults file of format {version}; this version of "
                f"lightning-influence reads format {', '.join(map(str, _READABLE[:-1]))} or {_FORMAT_VERSION}. "
                "Recompute the results."
            )
        checksum = state.pop("checksum", None)  # absent in format-2 files written before checksums
        expected = _expected_checksum(state, version, source)
        if checksum is None and version != 2:  # every file of format 3 on carries one
            raise ResultsFileError(f"{source} is corrupted: it has no checksum, which every file of format "
                                   f"{version} carries. Recompute the results.")
        if checksum is not None and checksum != expected:
            what = "tensors" if version == 2 else "contents (scores, settings, diagnostics or timings)"
            raise ResultsFileError(
                f"{source} is corrupted: its {what} do not match the checksum written with them "
                "(bytes changed on disk or in transfer). Recompute the results."
            )
        known = set(_TENSORS) | ({"settings", "diagnostics", "timings"} if version == 2 else set(_DATA))
        if version >= 4:
            known |= set(_TOKEN_TENSORS)
        unknown = sorted(set(state) - known)
        if unknown:
            raise ResultsFileError(f"{source} has unknown fields {unknown}; it is not an InfluenceResults file, or it "
                                   "is corrupted. Recompute the results.")
        check_results_state(state, source)
        if version == 2:
            return cls(**state)
        try:
            record = RunRecord.from_dict(state.pop("record"))
        except (KeyError, TypeError, ValueError) as err:
            raise ResultsFileError(f"{source} has a malformed run record ({type(err).__name__}: {err}); it is not "
                                   "an InfluenceResults file of this version. Recompute the results.") from err
        return cls(**state, record=record)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the results with ``torch.save`` (:meth:`to_state`: tensors on the CPU, plain-data
        settings, a checksum of the tensors), atomically: a failed write leaves an existing file at
        ``path`` untouched.

        Raises:
            ResultsFileError: the file could not be written (the message gives the errno and free space).
        """
        atomic_save(self.to_state(), path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> "InfluenceResults":
        """Read results written by :meth:`save` (safe ``weights_only`` loading).

        Raises:
            InfluenceConfigError: the file is not an InfluenceResults file of the current format
                (:data:`_FORMAT_VERSION`); files of other formats are not converted.
            ResultsFileError: the file is missing, empty, truncated or corrupted (unreadable, its tensors
                not matching their stored checksum, wrong shapes, NaN/inf scores).
        """
        return cls.from_state(load_state(path, map_location), os.fspath(path))

    def to_dataframe(self) -> "pd.DataFrame":
        """Long-form table, one row per (query, training example): ``query_index``, ``train_index``,
        ``score`` and ``predicted_loss_change``. Needs pandas."""
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("to_dataframe() needs pandas: pip install pandas") from err
        q, n = self.scores.shape
        return pd.DataFrame(
            {
                "query_index": self.query_indices.repeat_interleave(n).numpy(),
                "train_index": self.train_indices.repeat(q).numpy(),
                "score": self.scores.reshape(-1).double().numpy(),
                "predicted_loss_change": self.predicted_loss_change().reshape(-1).double().numpy(),
            }
        )

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"InfluenceResults(queries={self.num_queries}, train={self.num_train}, solver={s.get('solver')!r}, "
            f"damping={s.get('damping')}, self_influence={self.self_influence is not None}, "
            f"wall_time={self.wall_time:.2f}s)"
        )
