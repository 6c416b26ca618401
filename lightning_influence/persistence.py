"""Writing and reading results files safely.

* :func:`atomic_save` writes to a temporary file in the target's directory and renames it over the
  target only once the write has succeeded, so a failed overwrite (a full disk, a file-size limit, an
  interrupted process) leaves the previous file as it was; the error says where, why (errno) and how
  much space is free.
  Temporary files that an interrupted write left (``.<name>.<pid>.<hex>.tmp``, the process gone) are
  removed by the next write to that folder (:func:`remove_stale_temporaries`). A symbolic link at the
  target is replaced, never followed.
* :func:`load_state` reads a file back and says which file is empty, truncated or corrupted instead of a
  bare ``EOFError``; :func:`state_checksum` lets a reader detect a flipped byte anywhere in the content
  (tensors and metadata).
"""

from __future__ import annotations

import errno as _errno
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
from typing import Any, Dict, List, Mapping, Set, Union

import torch
from torch import Tensor

from .errors import ResultsFileError

__all__ = ["atomic_save", "atomic_write_text", "check_results_state", "describe_os_error", "load_state",
           "remove_stale_temporaries", "state_checksum", "tensor_checksum", "tensors_of"]

PathLike = Union[str, "os.PathLike[str]"]


def _free_space(directory: str) -> str:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "unknown"  # pragma: no cover


def describe_os_error(err: BaseException) -> str:
    """``"[Errno 28 ENOSPC] No space left on device"`` for an ``OSError``; the exception's text otherwise."""
    if isinstance(err, OSError) and err.errno is not None:
        code = _errno.errorcode.get(err.errno, "?")
        return f"[Errno {err.errno} {code}] {err.strerror or err}"
    return f"{type(err).__name__}: {err}"


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` the way :func:`atomic_save` writes results: a temporary file in
    the same folder (created if missing), fsync, rename over ``path`` (a symbolic link there is replaced,
    not followed). Raises :class:`~lightning_influence.errors.ResultsFileError` naming the path and errno."""
    _atomic(path, lambda f: f.write(text.encode("utf-8")), make_dirs=True)


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically: a temporary file in the same directory, flushed to
    disk, then renamed over ``path``. On failure the temporary file is removed, an existing ``path`` is
    left untouched, and :class:`~lightning_influence.errors.ResultsFileError` names the path, the errno
    and the free space."""
    _atomic(path, lambda f: torch.save(obj, f))


#: the name of an atomic write's temporary file: ``.<target name>.<pid>.<8 hex digits>.tmp`` beside the target
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.tmp$")
_IN_FLIGHT: Set[str] = set()  # this process's temporary files being written now (absolute paths)
_IN_FLIGHT_LOCK = threading.Lock()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's live process (or cannot tell): keep its file
        return True
    return True


def remove_stale_temporaries(directory: PathLike) -> List[str]:
    """Remove the temporary files that interrupted atomic writes left in ``directory`` (a process killed
    between creating ``.<name>.<pid>.<hex>.tmp`` and renaming it): those of processes that no longer run,
    and this process's own that no write of it is using. Files of live processes, and every other file,
    are left alone. Returns the paths removed; a file that cannot be removed is skipped."""
    directory = os.fspath(directory)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        match = _TEMPORARY.match(name)
        if match is None:
            continue
        path = os.path.join(os.path.abspath(directory), name)
        pid = int(match.group("pid"))
        with _IN_FLIGHT_LOCK:
            busy = path in _IN_FLIGHT
        if busy or (pid != os.getpid() and _pid_alive(pid)):
            continue
        try:
            if os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
                removed.append(path)
        except OSError:
            continue
    return removed


def _atomic(path: PathLike, write: Any, make_dirs: bool = False) -> None:
    path = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(path)
    if make_dirs:
        os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(directory)  # what interrupted writes to this folder left behind
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT.add(tmp)
    try:
        _write_and_rename(path, tmp, write)
    finally:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.discard(tmp)


def _write_and_rename(path: str, tmp: str, write: Any) -> None:
    directory, base = os.path.split(path)
    created = False
    writer: "_ErrorRecordingWriter | None" = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        created = True
        with os.fdopen(fd, "wb") as f:
            writer = _ErrorRecordingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        created = False
    except BaseException as caught:
        # torch's zip writer reports a failed write as "unexpected pos …": keep the OSError beneath it
        err = caught if writer is None or writer.error is None else writer.error
        if created:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if not isinstance(caught, Exception):  # KeyboardInterrupt, SystemExit: the old file is intact; go on
            raise
        kept = (f"the previous {base} is unchanged" if os.path.exists(path) else f"no {base} was written")
        raise ResultsFileError(
            f"could not write {path}: {describe_os_error(err)}; {kept}. Free space in {directory}: "
            f"{_free_space(directory)}. Free some space, check the directory's permissions and the file-size "
            "limit, or choose another directory."
        ) from err


class _ErrorRecordingWriter:
    """A binary file's ``write``/``flush`` for ``torch.save``, remembering the first ``OSError`` (which
    torch's zip writer would otherwise replace by a message about stream positions)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.error: "OSError | None" = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            if self.error is None:
                self.error = err
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as err:
            if self.error is None:
                self.error = err
            raise


def load_state(path: PathLike, map_location: Union[str, torch.device, None] = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the problem."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ResultsFileError(f"{path} does not exist.")
    if os.path.isdir(path):
        raise ResultsFileError(f"{path} is a directory, not a results file.")
    size = os.path.getsize(path)
    if size == 0:
        raise ResultsFileError(
            f"{path} is empty (0 bytes): its write was interrupted or failed. Recompute the results."
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - EOFError, RuntimeError, UnpicklingError, OSError: one message
        raise ResultsFileError(
            f"{path} ({size} bytes) cannot be read: it is truncated, corrupted or not a results file "
            f"({describe_os_error(err)}). Recompute the results."
        ) from err


def tensor_checksum(tensors: Mapping[str, Any]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the tensors in ``tensors`` (other values are
    skipped), in sorted name order: equal for equal tensors, different after any flipped byte."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_checksum(state: Mapping[str, Any]) -> str:
    """SHA-256 over a whole state dict: the tensors as :func:`tensor_checksum` hashes them and every other
    entry (plain data: the record, diagnostics, timings) as canonical JSON, the ``checksum`` entry itself
    excluded. Any changed byte of the content changes it."""
    h = hashlib.sha256(tensor_checksum(tensors_of(state)).encode())
    rest = {k: v for k, v in state.items() if not isinstance(v, Tensor) and k != "checksum"}
    h.update(json.dumps(rest, sort_keys=True, default=_json_default, allow_nan=True).encode())
    return h.hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    return repr(value)


def tensors_of(state: Dict[str, Any]) -> Dict[str, Tensor]:
    """The tensor entries of a state dict."""
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _shape_error(path: str, what: str) -> ResultsFileError:
    return ResultsFileError(f"{path} is corrupted or not an InfluenceResults file: {what}. Recompute the results.")


def check_results_state(state: Dict[str, Any], path: str) -> None:
    """Check a loaded InfluenceResults state: the fields it must have, their shapes and dtypes against the
    ``[Q, N]`` scores, and that scores, query losses and self-influence are finite."""
    scores = state.get("scores")
    if not isinstance(scores, Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        got = f"shape {tuple(scores.shape)}, {scores.dtype}" if isinstance(scores, Tensor) else type(scores).__name__
        raise _shape_error(path, f"'scores' must be a 2-D floating tensor [Q, N], got {got}")
    q, n = scores.shape
    expected = {
        "query_indices": ((q,), False, True),
        "train_indices": ((n,), False, True),
        "query_losses": ((q,), False, False),
        "self_influence": ((n,), True, False),
        "query_predictions": ((q,), True, True),
    }
    for name, (shape, optional, integer) in expected.items():
        value = state.get(name)
        if value is None and optional:
            continue
        if not isinstance(value, Tensor) or tuple(value.shape) != shape:
            got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise _shape_error(path, f"{name!r} must have shape {list(shape)} for {q}×{n} scores, got {got}")
        if integer and (value.is_floating_point() or value.is_complex()):
            raise _shape_error(path, f"{name!r} must hold integers, got {value.dtype}")
    targets = state.get("query_targets")
    if targets is not None and (not isinstance(targets, Tensor) or targets.dim() < 1 or targets.shape[0] != q):
        raise _shape_error(path, f"'query_targets' must have one entry per query ({q})")
    for name in ("settings", "record", "diagnostics", "timings"):
        if not isinstance(state.get(name, {}), dict):
            raise _shape_error(path, f"{name!r} must be a dict, got {type(state.get(name)).__name__}")
    _check_token_state(state, path, q, n)
    for name in ("scores", "query_losses", "self_influence", "token_scores"):
        value = state.get(name)
        if isinstance(value, Tensor) and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise _shape_error(path, f"{name!r} holds {bad} NaN/inf values (computed results are always finite)")


def _check_token_state(state: Dict[str, Any], path: str, q: int, n: int) -> None:
    """The per-token fields (format 4): all four or none; ``token_scores [R, N]`` floating, ``token_rows``,
    ``token_positions``, ``token_targets`` ``[R]`` integers, the rows within ``0..Q-1``."""
    names = ("token_scores", "token_rows", "token_positions", "token_targets")
    present = [k for k in names if state.get(k) is not None]
    if not present:
        return
    if len(present) != len(names):
        raise _shape_error(path, f"the per-token fields {sorted(set(names) - set(present))} are missing beside {present}")
    scores = state["token_scores"]
    if not isinstance(scores, Tensor) or scores.dim() != 2 or scores.shape[1] != n or not scores.is_floating_point():
        got = f"shape {tuple(scores.shape)}" if isinstance(scores, Tensor) else type(scores).__name__
        raise _shape_error(path, f"'token_scores' must be a 2-D floating tensor [R, {n}], got {got}")
    r = scores.shape[0]
    for name in names[1:]:
        value = state[name]
        if not isinstance(value, Tensor) or tuple(value.shape) != (r,) or value.is_floating_point():
            got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise _shape_error(path, f"{name!r} must be {r} integers, got {got}")
    rows = state["token_rows"]
    if r and (int(rows.min()) < 0 or int(rows.max()) >= q):
        raise _shape_error(path, f"'token_rows' must be query rows 0..{q - 1}")
