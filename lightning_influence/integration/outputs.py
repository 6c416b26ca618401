"""Where a fit's influence files go, and the paths they must never take from another output.

* :func:`run_dir`: the run's folder as Lightning's ``ModelCheckpoint`` resolves its own (``__resolve_ckpt_dir``):
  the first logger's ``save_dir`` (its ``default_root_dir`` when the logger has none) / ``name`` /
  ``version`` (``version_<n>`` for a number), or ``default_root_dir`` without a logger. A ``WandbLogger``
  without ``save_dir`` therefore gives ``./<project>/<run id>``, beside that run's checkpoints, not ``.``.
* :func:`claim_folder`: each fit gets a folder of its own under it: ``influence/``, or ``influence_v1/``,
  ``influence_v2/``, … when an earlier fit (or another callback of this process) already has it. A folder is
  free when it does not exist or is empty and unclaimed; it is created at once, which claims it. So a second
  ``fit`` with the same callback, another run from the same folder or ``logger=False`` never overwrites an
  earlier fit's results, report or per-run files, and one fit's files are one consistent set.
* :func:`check_owners`: before training, refuse an output path that is another output's: the results files,
  a checkpoint (``*.ckpt``, anything in a ``ModelCheckpoint``'s folder with its extension, the checkpoint the
  fit resumed from), another ``InfluenceCallback``'s files, or an existing file that is not an HTML report.
  The message names both paths.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Set, Tuple

from ..errors import InfluenceConfigError

__all__ = ["FOLDER", "FitOutputs", "broadcast_from_zero", "check_owners", "claim_folder", "fit_outputs", "results_file_name",
           "run_dir"]

#: the name of the folder the influence files of a fit go to, under :func:`run_dir`
FOLDER = "influence"
#: what the results files of a fit are called in its folder (``results.pt``, ``results_epoch2.pt``, ``results_step300.pt``)
_RESULTS_NAME = re.compile(r"^results(_epoch[0-9]+|_step[0-9]+)?\.pt$")
_CLAIMED: Set[str] = set()  # folders claimed by fits of this process (absolute paths)
_CLAIM_LOCK = threading.Lock()


def results_file_name(name: str) -> bool:
    """Whether ``name`` (a file's base name) is one a results file of a fit takes in its folder."""
    return bool(_RESULTS_NAME.match(name))


def run_dir(trainer: Any) -> str:
    """The run's folder, resolved as ``ModelCheckpoint`` resolves its checkpoints' (module docstring), made
    absolute. Reads the logger on this process only: call it on global rank zero and broadcast."""
    loggers = list(getattr(trainer, "loggers", []) or [])
    if loggers:
        logger = loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        version = logger.version
        version = version if isinstance(version, str) else f"version_{version}"
        path = os.path.join(os.fspath(save_dir), str(logger.name), version)
    else:
        path = os.fspath(trainer.default_root_dir)
    return os.path.abspath(path)


def claim_folder(parent: str, make: bool = True) -> str:
    """The first free folder of ``parent/influence``, ``parent/influence_v1``, … (free: missing, or an empty
    folder that no fit of this process claimed), created when ``make`` (the claim). A *file* named
    ``influence`` is not skipped: the writability check then refuses it, naming it."""
    parent = os.path.abspath(parent)
    with _CLAIM_LOCK:
        for n in range(10_000):
            path = os.path.join(parent, FOLDER if n == 0 else f"{FOLDER}_v{n}")
            if path in _CLAIMED:
                continue
            if os.path.lexists(path) and not os.path.isdir(path):
                if n == 0:
                    return path  # refused with its name by the writability check
                continue
            if os.path.isdir(path) and _has_entries(path):
                continue
            if make:
                try:
                    os.makedirs(path, exist_ok=True)
                except OSError:
                    return path  # the writability check names the problem
            _CLAIMED.add(path)
            return path
    raise InfluenceConfigError(f"{parent} holds 10,000 influence folders; choose another default_root_dir.")  # pragma: no cover


def _has_entries(path: str) -> bool:
    try:
        with os.scandir(path) as it:
            return any(True for _ in it)
    except OSError:
        return True


@dataclass(frozen=True)
class FitOutputs:
    """The paths one fit writes: its ``folder`` (results files; ``None`` when nothing goes there) and the
    HTML ``report`` (``None`` without a report).

    Attributes:
        explicit_report: whether ``report`` is the user's ``report_path`` (then it is theirs to overwrite).
    """

    folder: Optional[str]
    report: Optional[str]
    explicit_report: bool = False
    results: bool = True

    def owned(self, who: str) -> List[Tuple[str, str]]:
        """``(what, path)`` of every path this fit's outputs take (the results folder's files by name)."""
        out = []
        if self.folder is not None and self.results:
            out.append((f"{who} results files", os.path.join(self.folder, "results*.pt")))
        if self.report is not None:
            out.append((f"{who} report", self.report))
        return out


@dataclass(frozen=True)
class _Owner:
    """A path another output owns: one file, every file of ``suffix`` in a folder (``folder=True``), or the
    results files of a fit's folder (``path`` ending in ``results*.pt``)."""

    what: str
    path: str
    folder: bool = False
    suffix: str = ""

    def claims(self, target: str) -> bool:
        """Whether writing the file ``target`` would write onto what this owner owns."""
        if self.folder:
            return os.path.dirname(target) == self.path and target.endswith(self.suffix)
        if self.path.endswith("results*.pt"):
            return os.path.dirname(target) == os.path.dirname(self.path) and results_file_name(os.path.basename(target))
        return _same(target, self.path)

    def claims_results_in(self, folder: str) -> bool:
        """Whether this owner owns a file that a fit's results in ``folder`` may take."""
        if self.folder:
            return self.path == folder and self.suffix == ".pt"
        if self.path.endswith("results*.pt"):
            return os.path.dirname(self.path) == folder
        return os.path.dirname(self.path) == folder and results_file_name(os.path.basename(self.path))


def _same(a: str, b: str) -> bool:
    a, b = os.path.abspath(a), os.path.abspath(b)
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _checkpoint_owners(trainer: Any) -> List[_Owner]:
    """What the trainer's checkpoints own: each ``ModelCheckpoint``'s folder (files with its extension), its
    best and last files, and the checkpoint this fit resumed from."""
    owners: List[_Owner] = []
    for cb in getattr(trainer, "callbacks", []) or []:
        if not any(c.__name__ == "ModelCheckpoint" for c in type(cb).__mro__):
            continue
        ext = getattr(cb, "FILE_EXTENSION", ".ckpt")
        if getattr(cb, "dirpath", None):
            owners.append(_Owner(f"{type(cb).__name__}'s checkpoints", os.path.abspath(os.fspath(cb.dirpath)), True, ext))
        for attr in ("best_model_path", "last_model_path"):
            path = getattr(cb, attr, "")
            if path:
                owners.append(_Owner(f"{type(cb).__name__}.{attr}", os.path.abspath(os.fspath(path))))
    ckpt = getattr(trainer, "ckpt_path", None)
    if ckpt:
        owners.append(_Owner("the checkpoint this fit resumed from (ckpt_path)", os.path.abspath(os.fspath(ckpt))))
    return owners


def _looks_like_html(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(256).lstrip().lower()
    except OSError:
        return True  # unreadable: the writability check speaks for it
    return head.startswith(b"<!doctype html") or head.startswith(b"<html")


def check_owners(mine: FitOutputs, trainer: Any, others: Iterable[Tuple[str, FitOutputs]] = ()) -> None:
    """Refuse, naming both paths, an output of ``mine`` that would write onto what another output owns:
    ``mine``'s own results files (a report named ``results.pt`` in the results folder), the trainer's
    checkpoints, ``others``' files (``(name, outputs)`` of the other ``InfluenceCallback``\\ s of the fit), a
    ``*.ckpt`` path, or an existing file at the report path that is not an HTML report (a symbolic link
    there is replaced, not followed, and is not read).

    Raises:
        InfluenceConfigError: the first such collision, with both paths and the fix.
    """
    owners = _checkpoint_owners(trainer)
    for who, theirs in others:
        owners += [_Owner(what, os.path.abspath(path)) for what, path in theirs.owned(who)]
    fix = "Pass report_path= another file (or report=False), or give the Trainer another default_root_dir."
    if mine.folder is not None and mine.results:
        folder = os.path.abspath(mine.folder)
        for owner in owners:
            if owner.claims_results_in(folder):
                raise InfluenceConfigError(
                    f"the results files (results*.pt in {folder}) would overwrite {owner.what} ({owner.path}). "
                    "Give ModelCheckpoint(dirpath=...) or the other callback another folder."
                )
        owners.append(_Owner("this callback's results files", os.path.join(folder, "results*.pt")))
    if mine.report is None:
        return
    what = "report_path" if mine.explicit_report else "the HTML report"
    report = os.path.abspath(mine.report)
    for owner in owners:
        if owner.claims(report):
            raise InfluenceConfigError(f"{what} {report} would overwrite {owner.what} ({owner.path}). {fix}")
    if report.endswith(".ckpt"):
        raise InfluenceConfigError(f"{what} {report} is a checkpoint's path (*.ckpt); the report never writes over a "
                                   f"checkpoint. {fix}")
    if os.path.isfile(report) and not os.path.islink(report) and not _looks_like_html(report):
        raise InfluenceConfigError(f"{what} {report} is an existing file that is not an HTML report; the report "
                                   f"never writes over another file. {fix}")


def broadcast_from_zero(trainer: Any, value: Any) -> Any:
    """``value`` of global rank zero on every rank (a collective with more than one process)."""
    if int(getattr(trainer, "world_size", 1)) > 1:
        return trainer.strategy.broadcast(value, src=0)
    return value


def fit_outputs(trainer: Any, *, save_results: bool, report: bool,
                report_path: Optional["os.PathLike[str] | str"]) -> FitOutputs:
    """The paths of this fit's outputs: global rank zero resolves :func:`run_dir` and claims the fit's
    folder (:func:`claim_folder`) when the results or a default report need one; every rank gets the same
    paths. A collective: call it on every rank."""
    folder = None
    if save_results or (report and report_path is None):
        folder = claim_folder(run_dir(trainer)) if trainer.is_global_zero else None
        folder = broadcast_from_zero(trainer, folder)
    path = None
    if report:
        path = os.path.abspath(os.fspath(report_path)) if report_path is not None else os.path.join(folder, "report.html")
    return FitOutputs(folder, path, explicit_report=report_path is not None, results=bool(save_results))


def release_folder(path: Optional[str]) -> None:
    """Give back a claimed folder that no output was written to (removed if still empty), so that a fit
    that wrote nothing (``fast_dev_run``, a failure before any output) leaves no empty folder behind."""
    if path is None:
        return
    try:
        os.rmdir(path)  # only when empty
    except OSError:
        return
    with _CLAIM_LOCK:
        _CLAIMED.discard(os.path.abspath(path))
