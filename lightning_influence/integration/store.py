"""Where a fit's influence runs are kept: the history of runs, their results files, reuse of a run whose
weights have not changed, and what survives in a Lightning checkpoint.

* :class:`RunHistory` maps each run's :class:`~lightning_influence.record.RunKey` to its value (results, or
  a file path), in training order; an integer looks up the latest run that explains that epoch's weights
  (``history[2]``), so code written for one run per epoch reads the same.
* :class:`ResultsStore` names the files (``results_epoch{k}.pt``, ``results_step{s}.pt``, ``results.pt``
  in the run's folder), writes them on global rank zero, fingerprints the weights a run saw (global step and
  a checksum of the state dict) and holds the history through ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Dict, Generic, Iterator, List, Optional, TypeVar, Union

from ..errors import InfluenceConfigError
from ..persistence import tensor_checksum
from ..record import RunKey
from ..results import InfluenceResults

__all__ = ["ResultsStore", "RunHistory", "STATE_FORMAT"]

V = TypeVar("V")
#: version of what :meth:`ResultsStore.state_dict` returns (1: history keyed by epoch)
STATE_FORMAT = 2


class RunHistory(Mapping, Generic[V]):
    """``{RunKey: value}`` in training order. ``history[e]`` with an integer ``e`` is the latest run of
    epoch ``e`` (its end-of-epoch run, or the end of training when that explains epoch ``e``'s weights).

    Example:
        >>> h = RunHistory()
        >>> h[RunKey("step", epoch=0, global_step=5)] = "a"
        >>> h[RunKey("epoch", epoch=0, global_step=9)] = "b"
        >>> h[0], h.epochs(), 0 in h, 1 in h
        ('b', [0], True, False)
    """

    def __init__(self, items: Optional[Mapping[Any, V]] = None) -> None:
        self._items: Dict[RunKey, V] = {}
        for k, v in (items or {}).items():
            self[k] = v

    def _key(self, key: Union[RunKey, int]) -> RunKey:
        if isinstance(key, RunKey):
            if key in self._items:
                return key
            raise KeyError(key)
        if isinstance(key, int) and not isinstance(key, bool):
            runs = [k for k in self._items if k.epoch == key]
            if runs:
                return max(runs)
        raise KeyError(key)

    def __getitem__(self, key: Union[RunKey, int]) -> V:
        return self._items[self._key(key)]

    def __setitem__(self, key: Union[RunKey, int], value: V) -> None:
        if not isinstance(key, RunKey):  # an epoch: its end-of-epoch run
            step = getattr(value, "settings", {}).get("global_step", 0) if not isinstance(value, str) else 0
            key = RunKey("epoch", int(key), int(step))
        self._items[key] = value

    def pop(self, key: Union[RunKey, int], *default: Any) -> Any:
        try:
            return self._items.pop(self._key(key))
        except KeyError:
            if default:
                return default[0]
            raise

    def __contains__(self, key: object) -> bool:
        try:
            self._key(key)  # type: ignore[arg-type]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[RunKey]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def epochs(self) -> List[int]:
        """The epochs with a run, ascending."""
        return sorted({k.epoch for k in self._items})

    def latest(self) -> Optional[V]:
        """The value of the last run, or ``None``."""
        return self._items[max(self._items)] if self._items else None

    def __repr__(self) -> str:
        return f"RunHistory({', '.join(k.label for k in self)})"


class ResultsStore:
    """The runs of a fit, their files and checkpointed state (see the module docstring).

    Args:
        save: write a results file per run.
    """

    def __init__(self, save: bool = True) -> None:
        self.save_files = bool(save)
        self.history: RunHistory[InfluenceResults] = RunHistory()
        self.paths: RunHistory[str] = RunHistory()
        self.fingerprint: Optional[Dict[str, Any]] = None  # {"key", "global_step", "checksum"} of the last run
        self._restored = False  # load_state_dict ran for this fit: keep the history

    # ------------------------------------------------------------------ a fit
    def start_fit(self) -> None:
        """A new fit starts with an empty history, unless a checkpoint just restored one."""
        if not self._restored:
            self.history, self.paths, self.fingerprint = RunHistory(), RunHistory(), None
        self._restored = False

    @staticmethod
    def path_for(out_dir: str, key: RunKey) -> str:
        """The results file of run ``key`` in ``out_dir``."""
        return os.path.join(out_dir, key.file_stem + ".pt")

    def write(self, results: InfluenceResults, out_dir: str, key: RunKey, is_writer: bool) -> str:
        """Save ``results`` as the file of run ``key`` (on the writing process only); returns the path, which
        every process records. Raises the write's :class:`~lightning_influence.errors.ResultsFileError`."""
        path = self.path_for(out_dir, key)
        if is_writer:
            os.makedirs(out_dir, exist_ok=True)
            results.save(path)
        if key.trigger != "final":
            self.paths[key] = path
        return path

    def keep(self, key: RunKey, results: InfluenceResults, fingerprint: Optional[Dict[str, Any]]) -> None:
        """Record run ``key`` and the weights it saw."""
        self.history[key] = results
        if fingerprint is not None:
            self.fingerprint = dict(fingerprint, key=key.to_dict())

    # ------------------------------------------------------------------ reuse
    @staticmethod
    def weights_fingerprint(module: Any, global_step: int) -> Dict[str, Any]:
        """The global step and a checksum of the module's state dict (weights and buffers)."""
        return {"global_step": int(global_step), "checksum": tensor_checksum(dict(module.state_dict()))}

    def reusable(self, fingerprint: Dict[str, Any]) -> Optional[RunKey]:
        """The run whose weights equal ``fingerprint`` (same global step and state-dict checksum), if it
        is still in the history: the end of training then reuses it instead of recomputing."""
        last = self.fingerprint
        if last is None or last.get("key") is None:
            return None
        if (last["global_step"], last["checksum"]) != (fingerprint["global_step"], fingerprint["checksum"]):
            return None
        key = RunKey.from_dict(last["key"])
        return key if key in self.history else None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Plain data for a Lightning checkpoint: every run as ``(key, results state)``, the files and the
        fingerprint of the weights the last run saw."""
        return {
            "format": STATE_FORMAT,
            "runs": [(k.to_dict(), r.to_state()) for k, r in self.history.items()],
            "paths": [(k.to_dict(), str(p)) for k, p in self.paths.items()],
            "fingerprint": None if self.fingerprint is None else dict(self.fingerprint),
        }

    def load_state_dict(self, state: Any) -> None:
        """Restore :meth:`state_dict` (format 2, or format 1 with runs keyed by epoch).

        Raises:
            InfluenceConfigError: not an InfluenceCallback state of a known format.
        """
        fmt = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        if fmt not in (1, STATE_FORMAT):
            raise InfluenceConfigError(
                f"the checkpoint's InfluenceCallback state has format {fmt!r}; this version reads format 1 or "
                f"{STATE_FORMAT}. Resume without it (remove the callback's entry from the checkpoint's "
                "'callbacks') or recompute."
            )
        history: RunHistory[InfluenceResults] = RunHistory()
        paths: RunHistory[str] = RunHistory()
        if fmt == 1:
            for e, s in state.get("history", {}).items():
                history[int(e)] = InfluenceResults.from_state(s, f"the checkpoint's InfluenceCallback history (epoch {e})")
            for e, p in state.get("history_paths", {}).items():
                paths[RunKey("epoch", int(e), int(history[int(e)].settings.get("global_step", 0)))
                      if int(e) in history else int(e)] = str(p)
            fp = state.get("fingerprint")
            self.fingerprint = None if fp is None else {
                "global_step": fp["global_step"], "checksum": fp["checksum"],
                "key": RunKey("epoch", int(fp["epoch"]), int(fp["global_step"])).to_dict()}
        else:
            for k, s in state.get("runs", []):
                key = RunKey.from_dict(k)
                history[key] = InfluenceResults.from_state(s, f"the checkpoint's InfluenceCallback history ({key.label})")
            for k, p in state.get("paths", []):
                paths[RunKey.from_dict(k)] = str(p)
            self.fingerprint = state.get("fingerprint")
        self.history, self.paths = history, paths
        self._restored = True
