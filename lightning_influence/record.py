"""The run record: how one set of influence scores was computed, as typed parts with one writer each.

:class:`RunRecord` is frozen; each part is written once, by the component that knows it:

* :attr:`RunRecord.solver`: the solver's settings (``settings.to_dict()``) and what the fitted inverse
  used (``inverse.facts``, e.g. the Fisher labels of EK-FAC): written by the solver;
* :attr:`RunRecord.damping`: the :class:`~lightning_influence.curvature.damping.DampingChoice` (``λ``,
  its rule, source and the spectrum it read): written by the damping rule;
* :attr:`RunRecord.run`: the run arguments (dtype, chunk sizes, query batch size, loss): written by
  :func:`~lightning_influence.pipeline.compute_influence` from the checked arguments;
* :attr:`RunRecord.data`: facts about the data and parameters (``n``, ``Q``, ``P``, names, processes,
  device): written when the problem is bound;
* :attr:`RunRecord.key`: which run of a training loop it is (:class:`RunKey`): written by the training-loop
  integration.

``InfluenceResults.settings`` is a read-only flat view (:meth:`RunRecord.flat`) with the keys of earlier
versions (``damping``, ``damping_mode``, ``num_train_total``, ``global_step``, …); a solver setting whose
name another part uses is listed as ``<solver>_<name>`` (EK-FAC's ``chunk_size`` as ``ekfac_chunk_size``).

Example:
    >>> rec = RunRecord(solver={"solver": "exact", "kind": "direct", "max_params": 10000, "block": 512},
    ...                 run=RunSettings(dtype="float64", chunk_size=256, grad_chunk_size=256, query_batch_size=3,
    ...                                 loss="default_loss_fn"))
    >>> rec.flat()["solver"], rec.flat()["chunk_size"]
    ('exact', 256)
    >>> rec.with_key(RunKey("epoch", epoch=2, global_step=30)).flat()["run"]
    'epoch end'
"""

from __future__ import annotations

import functools
import types
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, Mapping, Optional, Tuple

from .curvature.damping import DampingChoice
from .errors import InfluenceConfigError

__all__ = ["DataFacts", "RunKey", "RunRecord", "RunSettings"]

#: how each trigger reads in ``settings["run"]`` (the words of earlier versions)
_TRIGGER_WORDS = {"epoch": "epoch end", "step": "step", "final": "end of training", "call": "call"}


@functools.total_ordering
@dataclass(frozen=True)
class RunKey:
    """Which run of a fit a result belongs to, ordered by training progress.

    Attributes:
        trigger: ``"step"`` (every N optimizer steps), ``"epoch"`` (end of an epoch), ``"final"`` (end of
            training) or ``"call"`` (outside a training loop).
        epoch: the 0-based epoch whose weights it explains.
        global_step: optimizer steps taken before it.
    """

    trigger: str = field(compare=False)
    epoch: int = 0
    global_step: int = 0
    _order: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.trigger not in _TRIGGER_WORDS:
            raise InfluenceConfigError(f"RunKey.trigger={self.trigger!r} must be one of {sorted(_TRIGGER_WORDS)}.")
        # within one step: a step run, then the epoch end, then the final run
        object.__setattr__(self, "_order", ("step", "epoch", "final", "call").index(self.trigger))

    def __lt__(self, other: "RunKey") -> bool:  # by (global_step, epoch, trigger order)
        return (self.global_step, self.epoch, self._order) < (other.global_step, other.epoch, other._order)

    @property
    def label(self) -> str:
        """``"epoch 2"``, ``"step 300"``, ``"end of training"``; how reports name the run."""
        if self.trigger == "step":
            return f"step {self.global_step}"
        if self.trigger == "epoch":
            return f"epoch {self.epoch}"
        return _TRIGGER_WORDS[self.trigger]

    @property
    def where(self) -> str:
        """``"at the end of epoch 2"``, ``"after step 300"``, ``"when training ended"``: for messages."""
        if self.trigger == "step":
            return f"after step {self.global_step}"
        if self.trigger == "epoch":
            return f"at the end of epoch {self.epoch}"
        return "when training ended" if self.trigger == "final" else "in this call"

    @property
    def file_stem(self) -> str:
        """The results file name of this run inside a fit's folder: ``results_epoch2``, ``results_step300``,
        ``results`` (the end of training)."""
        if self.trigger == "step":
            return f"results_step{self.global_step}"
        if self.trigger == "epoch":
            return f"results_epoch{self.epoch}"
        return "results"

    def to_dict(self) -> Dict[str, Any]:
        return {"trigger": self.trigger, "epoch": self.epoch, "global_step": self.global_step}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunKey":
        return cls(str(d["trigger"]), int(d.get("epoch", 0)), int(d.get("global_step", 0)))


@dataclass(frozen=True)
class RunSettings:
    """The run arguments as recorded (see :class:`~lightning_influence.validation.RunArguments`)."""

    dtype: str
    chunk_size: int
    grad_chunk_size: int
    query_batch_size: int
    loss: str
    #: how derivatives were taken (:class:`~lightning_influence.autodiff.Differentiation`, probed per problem)
    differentiation: str = ""


@dataclass(frozen=True)
class DataFacts:
    """Sizes and names of what was attributed: ``n`` training examples, ``Q`` queries, ``P`` parameters."""

    num_train_total: int
    num_queries: int
    num_params: int
    params: Tuple[str, ...]
    processes: int = 1
    device: str = "cpu"


def _plain(part: Any) -> Optional[Dict[str, Any]]:
    if part is None:
        return None
    out = asdict(part)
    for k, v in out.items():
        if isinstance(v, tuple):
            out[k] = list(v)
    return out


@dataclass(frozen=True)
class RunRecord:
    """How one set of scores was computed (see the module docstring). Every part is optional so that a
    record can be read back from an older, flat ``settings`` dict (:meth:`from_flat`)."""

    solver: Mapping[str, Any] = field(default_factory=dict)
    damping: Optional[DampingChoice] = None
    run: Optional[RunSettings] = None
    data: Optional[DataFacts] = None
    key: Optional[RunKey] = None
    #: keys of an old flat ``settings`` dict that no part knows (kept, shown in :meth:`flat`)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def with_key(self, key: RunKey) -> "RunRecord":
        """The same record for the run ``key`` of a fit (the training-loop integration writes it)."""
        return replace(self, key=key)

    # ------------------------------------------------------------------ views
    def flat(self) -> Mapping[str, Any]:
        """A read-only flat view with the keys of earlier versions' ``results.settings``."""
        out: Dict[str, Any] = {}
        if self.run is not None:
            out.update(asdict(self.run))
        if self.data is not None:
            out.update(_plain(self.data) or {})
        if self.damping is not None:
            out.update(self.damping.flat())
        if self.key is not None:
            out.update(epoch=self.key.epoch, global_step=self.key.global_step, run=_TRIGGER_WORDS[self.key.trigger])
        solver = dict(self.solver)
        name = str(solver.get("solver", "solver"))
        for k, v in solver.items():
            out[k if k not in out or k == "solver" else f"{name}_{k}"] = v
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return types.MappingProxyType(out)

    # ------------------------------------------------------------------ plain data
    def to_dict(self) -> Dict[str, Any]:
        """Plain data for ``torch.save(weights_only=True)`` and JSON (:meth:`from_dict` reads it)."""
        return {
            "solver": dict(self.solver),
            "damping": None if self.damping is None else self.damping.to_dict(),
            "run": _plain(self.run),
            "data": _plain(self.data),
            "key": None if self.key is None else self.key.to_dict(),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunRecord":
        data = d.get("data")
        if data is not None:
            data = dict(data, params=tuple(data.get("params", ())))
        return cls(
            solver=dict(d.get("solver") or {}),
            damping=None if d.get("damping") is None else DampingChoice.from_dict(d["damping"]),
            run=None if d.get("run") is None else RunSettings(**d["run"]),
            data=None if data is None else DataFacts(**data),
            key=None if d.get("key") is None else RunKey.from_dict(d["key"]),
            extra=dict(d.get("extra") or {}),
        )

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "RunRecord":
        """A record from a flat ``settings`` dict (files of earlier versions, hand-built results): the keys
        each part knows go to it, the rest to :attr:`extra`; ``flat()`` gives them back."""
        flat = dict(flat)
        used = set()

        def take(names: Tuple[str, ...]) -> Optional[Dict[str, Any]]:
            if not all(n in flat for n in names):
                return None
            used.update(names)
            return {n: flat[n] for n in names}

        run = take(tuple(f.name for f in fields(RunSettings) if f.name != "differentiation"))
        if run is not None and "differentiation" in flat:
            run["differentiation"] = flat["differentiation"]
            used.add("differentiation")
        data = take(("num_train_total", "num_queries", "num_params", "params"))
        if data is not None:
            for opt in ("processes", "device"):
                if opt in flat:
                    data[opt] = flat[opt]
                    used.add(opt)
            data["params"] = tuple(data["params"])
        damping = DampingChoice.from_flat(flat)
        if damping is not None:
            used.update(k for k in damping.flat() if k in flat)
        key = None
        if "global_step" in flat and "epoch" in flat and flat.get("run") in _TRIGGER_WORDS.values():
            trigger = {w: t for t, w in _TRIGGER_WORDS.items()}[flat["run"]]
            key = RunKey(trigger, int(flat["epoch"]), int(flat["global_step"]))
            used.update(("global_step", "epoch", "run"))
        solver = {}
        if "solver" in flat:
            solver["solver"] = flat["solver"]
            used.add("solver")
        extra = {k: v for k, v in flat.items() if k not in used}
        return cls(solver=solver, damping=damping, run=None if run is None else RunSettings(**run),
                   data=None if data is None else DataFacts(**data), key=key, extra=extra)
