"""The index's files: raw row-major arrays read through ``numpy.memmap`` (training examples larger than
memory are read chunk by chunk) and one JSON metadata file, each written to a temporary name and renamed
into place once complete, so that a reader never sees half a file.

Layout of an index folder::

    index.json                 metadata (format, representation, sizes, shards, model checksum, record)
    rows-<rank>.bin            shard <rank>: its examples' representations [n_rank, D], in training order
    self-<rank>.bin            shard <rank>: self-influence I_up,loss(z_i, z_i) [n_rank] (when stored)
    projection-query.bin       compressed only: the query-side matrix [k, P]
    projection-train.bin       compressed, plain projection only: the training-side matrix [k, P]
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import InfluenceConfigError, ResultsFileError
from ..persistence import atomic_write_text, describe_os_error

__all__ = ["FORMAT", "FORMAT_VERSION", "META", "RowWriter", "open_rows", "read_meta", "write_meta"]

FORMAT = "lightning-influence-index"
FORMAT_VERSION = 1
META = "index.json"
PathLike = Union[str, "os.PathLike[str]"]

_NUMPY = {torch.float64: np.float64, torch.float32: np.float32}


def numpy_dtype(dtype: torch.dtype) -> Any:
    try:
        return _NUMPY[dtype]
    except KeyError:
        raise InfluenceConfigError(f"an index stores float32 or float64 numbers, not {dtype}.") from None


class RowWriter:
    """Writes a ``[rows, dim]`` array (``dim=0``: a vector ``[rows]``) to ``path`` through a memmap of a
    temporary file in the same folder; :meth:`commit` flushes it and renames it to ``path``."""

    def __init__(self, path: str, rows: int, dim: int, dtype: torch.dtype) -> None:
        self.path, self.rows, self.dim = path, int(rows), int(dim)
        name = f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        self.tmp = os.path.join(os.path.dirname(path), name)
        shape: Tuple[int, ...] = (self.rows, self.dim) if self.dim else (self.rows,)
        try:
            if self.rows * max(self.dim, 1) == 0:
                open(self.tmp, "wb").close()
                self.array: Optional[np.ndarray] = None
            else:
                self.array = np.memmap(self.tmp, dtype=numpy_dtype(dtype), mode="w+", shape=shape)
        except OSError as err:
            raise ResultsFileError(f"could not create {path}: {describe_os_error(err)}. Check the folder's free "
                                   "space and permissions, or choose another path.") from err

    def write(self, first_row: int, values: Tensor) -> None:
        """Rows ``first_row : first_row + len(values)``."""
        if self.array is not None and values.shape[0]:
            self.array[first_row : first_row + values.shape[0]] = values.detach().cpu().numpy()

    def commit(self) -> None:
        try:
            if self.array is not None:
                self.array.flush()
                del self.array
                self.array = None
            os.replace(self.tmp, self.path)
        except OSError as err:
            self.abort()
            raise ResultsFileError(f"could not write {self.path}: {describe_os_error(err)}.") from err

    def abort(self) -> None:
        self.array = None
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def open_rows(path: str, rows: int, dim: int, dtype: torch.dtype) -> np.ndarray:
    """The ``[rows, dim]`` (or ``[rows]`` for ``dim=0``) array at ``path``, memory-mapped read-only;
    raises :class:`ResultsFileError` naming the file when it is missing or has the wrong size."""
    npd = numpy_dtype(dtype)
    shape: Tuple[int, ...] = (int(rows), int(dim)) if dim else (int(rows),)
    expected = int(np.prod(shape)) * np.dtype(npd).itemsize
    if not os.path.isfile(path):
        raise ResultsFileError(f"{path} is missing from the index folder: the build did not finish on every process "
                               "or the folder was copied in part. Rebuild the index (or copy the whole folder).")
    size = os.path.getsize(path)
    if size != expected:
        raise ResultsFileError(f"{path} has {size} bytes where {shape} {npd.__name__} numbers take {expected}: it is "
                               "truncated or from another build. Rebuild the index.")
    if expected == 0:
        return np.zeros(shape, dtype=npd)
    return np.memmap(path, dtype=npd, mode="r", shape=shape)


def write_meta(folder: str, meta: Dict[str, Any]) -> None:
    atomic_write_text(os.path.join(folder, META), json.dumps(meta, indent=1, sort_keys=True))


def read_meta(folder: PathLike) -> Dict[str, Any]:
    """The metadata of the index in ``folder``; raises naming the argument when there is none."""
    folder = os.fspath(folder)
    meta_path = os.path.join(folder, META)
    if not os.path.isdir(folder):
        raise InfluenceConfigError(f"path={folder!r} does not exist or is not a folder; pass the folder an index was "
                                   "built into (build_index(..., path=...)).")
    if not os.path.isfile(meta_path):
        raise InfluenceConfigError(f"path={folder!r} holds no {META}: it is not an influence index folder, or its "
                                   "build did not finish. Rebuild the index into it.")
    try:
        with open(meta_path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise ResultsFileError(f"{meta_path} cannot be read ({describe_os_error(err)}): rebuild the index.") from err
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise InfluenceConfigError(f"{meta_path} is not a {FORMAT} version {FORMAT_VERSION} file (format "
                                   f"{meta.get('format')!r}, version {meta.get('version')!r}); rebuild the index.")
    return meta
