"""Solver diagnostics as typed data: each value says what it is, in which units, how values from several
query chunks combine, and how a report shows it. Reporters read these declarations; they never guess from
key names which solver ran.

A solver returns a list of :class:`Diagnostic` from ``fit`` (its setup: damping choice, spectral
estimates, factor statistics) and from every ``solve`` (one chunk of queries). Results store them as plain
dicts (:meth:`Diagnostic.to_dict`) so they survive ``torch.save(weights_only=True)`` and logger configs.

Kinds:

* ``"scalar"``: one number (or bool, or short string); chunks combine by ``reduce``.
* ``"per_query"``: a list with one number per query of the chunk; chunks concatenate into ``[Q]``.
* ``"series"``: curves, ``value = [{"label": str, "x": [...], "y": [...]}, ...]`` (e.g. a norm history
  per repeat); kept per chunk and drawn as line charts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from .checks import is_int, is_real

__all__ = ["Diagnostic", "KINDS", "REDUCTIONS", "combine_scalars", "from_dicts"]

KINDS = ("scalar", "per_query", "series")
#: how the values of one scalar diagnostic from several query chunks become one
REDUCTIONS = ("max", "min", "sum", "first", "last", "all", "any")


@dataclass(frozen=True)
class Diagnostic:
    """One diagnostic value.

    Attributes:
        name: machine name, unique within a solver (``"scale"``, ``"relative_stderr"``); logged as
            ``influence/diagnostics/<name>``.
        value: a number, bool or string (``"scalar"``), a list of numbers (``"per_query"``) or a list of
            curves (``"series"``).
        label: what a reader sees, with the quantity's symbol (``"scale s"``, ``"λ_min(H) estimate"``).
        meaning: one sentence: what it measures and in which units, or how to read it.
        reduce: for scalars, how chunks combine (``"max"``, ``"min"``, ``"sum"``, ``"first"``,
            ``"last"``, ``"all"``, ``"any"``).
        kind: ``"scalar"``, ``"per_query"`` or ``"series"``.
        source: which component of the solver measured it, ``""`` for the solver itself, e.g.
            ``"preconditioner"`` for the Arnoldi preconditioner of LiSSA. A component's diagnostics keep their
            own names; :attr:`key` tells them apart (``"preconditioner/rank"``).
    """

    name: str
    value: Any
    label: str
    meaning: str = ""
    reduce: str = "first"
    kind: str = "scalar"
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Diagnostic.kind={self.kind!r} must be one of {KINDS}")
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"Diagnostic.reduce={self.reduce!r} must be one of {REDUCTIONS}")

    @property
    def key(self) -> str:
        """``name``, or ``source/name`` for a component's diagnostic: unique within one run's group."""
        return f"{self.source}/{self.name}" if self.source else self.name

    def from_source(self, source: str) -> "Diagnostic":
        """The same diagnostic measured by component ``source`` (nested: ``"preconditioner/inner"``)."""
        return replace(self, source=f"{source}/{self.source}" if self.source else source)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        if not self.source:
            del out["source"]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Diagnostic":
        return cls(**{k: d[k] for k in ("name", "value", "label", "meaning", "reduce", "kind", "source") if k in d})

    @property
    def is_number(self) -> bool:
        return is_real(self.value)


def from_dicts(items: Optional[Iterable[Any]]) -> List[Diagnostic]:
    """Diagnostics from their stored dicts (entries that are not diagnostics are skipped)."""
    out = []
    for d in items or []:
        if isinstance(d, Diagnostic):
            out.append(d)
        elif isinstance(d, Mapping) and {"name", "value", "label"} <= set(d):
            out.append(Diagnostic.from_dict(d))
    return out


def _reduce(how: str, values: Sequence[Any]) -> Any:
    if how == "first":
        return values[0]
    if how == "last":
        return values[-1]
    if how == "all":
        return all(bool(v) for v in values)
    if how == "any":
        return any(bool(v) for v in values)
    nums = [float(v) for v in values if is_real(v)]
    nums = [v for v in nums if not math.isnan(v)]
    if not nums:
        return math.nan
    if how == "sum":
        total = sum(nums)
        return int(total) if all(is_int(v) for v in values) else total
    best = max(nums) if how == "max" else min(nums)
    return int(best) if all(is_int(v) for v in values) else best


def combine_scalars(chunks: Sequence[Sequence[Diagnostic]]) -> List[Diagnostic]:
    """The scalar diagnostics of several query chunks, each combined by its declared ``reduce``, in the
    order they first appear."""
    order: List[str] = []
    seen: Dict[str, List[Diagnostic]] = {}
    for chunk in chunks:
        for d in chunk:
            if d.kind != "scalar":
                continue
            if d.key not in seen:
                order.append(d.key)
                seen[d.key] = []
            seen[d.key].append(d)
    out = []
    for key in order:
        ds = seen[key]
        first = ds[0]
        out.append(replace(first, value=_reduce(first.reduce, [d.value for d in ds])))
    return out
