"""A run's outputs, written on global rank zero with no collectives: the results file (through the
:class:`~.store.ResultsStore`) and whatever the reporters write; and, on every rank together, the
influence index of the end of training (:func:`build_run_index`). Each output fails on its own; the failures
are handed back, and :func:`settle_failures` turns them into one error (``on_error="raise"``) or one warning
each. Also the check, before training, that every output can be written where it will go."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

from ..curvature.damping import FixedDamping
from ..distributed import Communicator
from ..errors import InfluenceConfigError, InfluenceRuntimeError
from ..index import InfluenceIndex, build_index_for_run
from ..record import RunKey
from ..reporting import reporters as _reporters
from ..reporting.reporters import Reporter
from ..results import InfluenceResults
from ..validation import check_writable_file
from .outputs import FitOutputs, check_owners
from .reporting import trainer_context
from .store import ResultsStore

__all__ = ["Written", "build_run_index", "check_outputs_writable", "settle_failures", "write_outputs"]


@dataclass
class Written:
    """What one run's outputs came to: the results file's path (``None`` when not written), what the
    reporters returned, and ``{output: exception}`` for those that failed."""

    results_path: Optional[str] = None
    outputs: Dict[str, Any] = field(default_factory=dict)
    failures: Dict[str, BaseException] = field(default_factory=dict)


def write_outputs(trainer: Any, results: InfluenceResults, key: RunKey, *, store: ResultsStore, folder: Optional[str],
                  report: bool, report_path: Optional[str], reporters: Optional[Sequence[Reporter]],
                  **context: Any) -> Written:
    """Save ``results`` as run ``key``'s file in ``folder`` (when the store saves files and there is a
    folder) and, with ``report``, hand it to each of ``reporters`` (default
    :func:`~lightning_influence.reporting.default_reporters`) on global rank zero in
    :func:`~.reporting.trainer_context` (``context``: its other fields). Every process calls it; only global
    rank zero writes."""
    done = Written()
    if store.save_files and folder is not None:
        try:
            done.results_path = store.write(results, folder, key, trainer.is_global_zero)
        except Exception as err:  # noqa: BLE001 - the other outputs still go out
            done.failures["results file"] = err
            store.paths.pop(key, None)
    if report and trainer.is_global_zero:
        ctx = trainer_context(trainer, report_path=report_path, key=key, results_path=done.results_path,
                              history=store.history, history_paths=store.paths, **context)
        chosen = list(reporters) if reporters is not None else _reporters.default_reporters()
        out = _reporters.report(results, chosen, ctx)
        done.failures.update(out.pop("errors"))
        done.outputs = out
    return done


def settle_failures(failures: Dict[str, BaseException], on_error: str,
                    warn: Callable[[str], None]) -> Optional[BaseException]:
    """The first failure (``None`` when none): with ``on_error="raise"`` one
    :class:`~lightning_influence.errors.InfluenceRuntimeError` naming every failed output, else one ``warn``
    per output."""
    if not failures:
        return None
    first = next(iter(failures.values()))
    if on_error == "raise":
        listed = "; ".join(f"{what}: {type(err).__name__}: {err}" for what, err in failures.items())
        raise InfluenceRuntimeError(
            f"InfluenceCallback could not write {len(failures)} output(s) ({listed}). The results are in "
            "InfluenceCallback.results."
        ) from first
    for what, err in failures.items():
        warn(f"InfluenceCallback could not write the {what} ({type(err).__name__}: {err}). The other outputs "
             "were still written, the results are in InfluenceCallback.results, and the exception is in "
             "InfluenceCallback.output_errors.")
    return first


def check_outputs_writable(trainer: Any, outputs: FitOutputs, *, save_results: bool,
                           others: Iterable[Tuple[str, FitOutputs]] = ()) -> None:
    """Refuse, before training, outputs that cannot be written or that would write onto another output's
    path (:func:`~.outputs.check_owners`). Only global rank zero writes, so only it checks; the callback shares
    its verdict through ``on_train_start``'s agreement, so that every rank raises the same error."""
    if not trainer.is_global_zero:
        return
    if save_results and outputs.folder is not None:
        check_writable_file(ResultsStore.path_for(outputs.folder, RunKey("final")), "results file",
                            "Give the Trainer a writable default_root_dir (or logger save_dir), or pass "
                            "save_results=False to InfluenceCallback.")
    if outputs.report is not None:
        check_writable_file(outputs.report, "report_path" if outputs.explicit_report else "HTML report",
                            "Pass report_path= a writable file path, or report=False.")
    check_owners(outputs, trainer, others)


def build_run_index(module: Any, train: Any, results: InfluenceResults, folder: Optional[str], comm: Communicator,
                    *, representation: str, solver: Any, **kwargs: Any) -> InfluenceIndex:
    """The :class:`~lightning_influence.index.InfluenceIndex` of the training loader ``train``'s dataset
    under the solver and the damping ``results`` used (``solver="auto"``: the one it chose), in
    ``folder/index`` (:func:`~lightning_influence.index.build_index_for_run`; ``kwargs``: its other
    arguments). Every rank calls it; a failure on one raises on every rank."""
    with comm.agreement():
        if folder is None:
            raise InfluenceConfigError("build_index=True needs the fit's influence folder; keep save_results=True "
                                       "(or report=True) so that the fit has one.")
        return build_index_for_run(module, train.dataset, os.path.join(folder, "index"),
                                   representation=representation,  # type: ignore[arg-type]
                                   solver=results.settings.get("auto_choice") or solver,
                                   damping=FixedDamping(results.damping, "the run's damping"),
                                   collate_fn=train.collate_fn, comm=comm, **kwargs)
