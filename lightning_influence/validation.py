"""Checks of the arguments shared by :class:`~lightning_influence.integration.callback.InfluenceCallback` and
:func:`~lightning_influence.pipeline.compute_influence`: one validator for both, so that they accept and
refuse exactly the same values with the same messages. Every message names the argument, its value and
the fix.

:func:`check_run_arguments` returns the checked values as one frozen :class:`RunArguments`.
"""

from __future__ import annotations

import errno
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from .checks import check_positive_int, is_int
from .errors import InfluenceConfigError

__all__ = [
    "RunArguments",
    "check_damping_range",
    "check_flag",
    "check_params",
    "check_positive_int",
    "check_query_indices",
    "check_run_arguments",
    "check_writable_file",
    "resolve_dtype",
    "warn_num_queries",
]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_HALF = {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: Any, name: str = "dtype") -> torch.dtype:
    """``torch.float32`` or ``torch.float64`` from a dtype or its name (``"float32"``, ``"torch.float64"``).

    Raises:
        InfluenceConfigError: for half precision (``float16``, ``bfloat16``: Hessian-vector products and
            the inverse solves lose nearly all their digits there) and anything else.
    """
    key = dtype.replace("torch.", "") if isinstance(dtype, str) else dtype
    if isinstance(key, str) and key in _DTYPES:
        return _DTYPES[key]
    if dtype in (torch.float32, torch.float64):
        return dtype
    if dtype in (torch.float16, torch.bfloat16) or (isinstance(key, str) and key in _HALF):
        raise InfluenceConfigError(
            f"{name}={dtype!r} is not supported: half precision keeps about 3 significant digits, too few for "
            "Hessian-vector products and inverse solves (the scores would be wrong or overflow). The influence "
            "maths runs in its own dtype whatever precision training used: use torch.float32 (default) or "
            "torch.float64."
        )
    raise InfluenceConfigError(f"{name}={dtype!r} is not supported; use torch.float32 or torch.float64 (or their names).")


def _is_integer(v: Any) -> bool:
    if is_int(v):  # a Python bool is not a position (nor is a numpy or tensor bool, below)
        return True
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return False
    return isinstance(v, np.integer)


def check_query_indices(query_indices: Any, name: str = "query_indices", where: str = "the query dataset",
                        duplicates: str = "warn") -> Optional[Tuple[int, ...]]:
    """Positions in the query dataset as a tuple of ints, or ``None``.

    Accepts a sequence of integers, or a 1-D integer tensor or NumPy array. Refuses strings, floats
    (``1.7`` is not silently ``1``), booleans, nested or 2-D inputs, empty and negative positions.
    Duplicates are allowed with a warning (each is solved again, giving the same row twice), or refused
    with ``duplicates="error"``. ``name`` and ``where`` (the dataset the positions index) word the messages.
    """
    if query_indices is None:
        return None
    fix = f"pass positions in {where}, e.g. {name}=[0, 5, 17], a 1-D integer tensor or array, or None"
    if isinstance(query_indices, (str, bytes)):
        raise InfluenceConfigError(f"{name}={query_indices!r} is a string; {fix}.")
    if isinstance(query_indices, Mapping):
        raise InfluenceConfigError(f"{name}={_short_repr(query_indices)} is a {type(query_indices).__name__}, which "
                                   f"would be read as its keys; {fix} (list(d) for the keys, list(d.values()) for "
                                   "the values).")
    if hasattr(query_indices, "ndim") and hasattr(query_indices, "dtype"):  # tensor or array
        array = query_indices
        if array.ndim != 1:
            raise InfluenceConfigError(
                f"{name} has shape {tuple(array.shape)}; it must be 1-D (one position per query): {fix}."
            )
        kind = str(array.dtype)
        if "int" not in kind:  # torch.int64, torch.uint8, int32, uint16, …; not bool, float or complex
            raise InfluenceConfigError(f"{name} has dtype {kind}; positions must be integers: {fix}.")
        values: List[Any] = list(array.tolist())
    else:
        try:
            values = list(query_indices)
        except TypeError:
            raise InfluenceConfigError(f"{name}={query_indices!r} is not a sequence; {fix}.") from None
        for v in values:
            if not _is_integer(v):
                what = "a nested sequence (2-D)" if isinstance(v, (list, tuple)) or getattr(v, "ndim", 0) else repr(v)
                raise InfluenceConfigError(
                    f"{name}={_short(values)} holds {what}, which is not an integer position; {fix}."
                )
    out = tuple(int(v) for v in values)
    if not out:
        raise InfluenceConfigError(f"{name}=[] is empty; {fix}.")
    negative = [i for i in out if i < 0]
    if negative:
        raise InfluenceConfigError(f"{name}={_short(list(out))} must be non-negative positions (got {negative[:5]}).")
    if len(set(out)) < len(out):
        seen, dups = set(), []
        for i in out:
            if i in seen and i not in dups:
                dups.append(i)
            seen.add(i)
        if duplicates == "error":
            raise InfluenceConfigError(f"{name} repeats the positions {dups[:10]}; each example can be removed only "
                                       "once. Drop the duplicates.")
        warnings.warn(
            f"{name} repeats the positions {dups[:10]}: each repeat is solved again and gives the same row of "
            "scores. Drop the duplicates unless you want them.",
            UserWarning,
            stacklevel=2,
        )
    return out


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool`` (NumPy's included); anything else (``"no"``, ``0``, ``None``) is refused:
    a non-empty string would otherwise switch the option on."""
    if isinstance(value, bool):
        return value
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        np = None  # type: ignore[assignment]
    if np is not None and isinstance(value, np.bool_):
        return bool(value)
    raise InfluenceConfigError(f"{name}={value!r} must be True or False ({type(value).__name__} given).")


def check_damping_range(damping: Any, dtype: torch.dtype, name: str = "damping") -> None:
    """Refuse a numeric damping (a number, ``FixedDamping(value)`` or ``AutoDamping(base=...)``) that the
    computation dtype cannot carry: above ``sqrt(finfo(dtype).max)`` (``≈ 1.8e19`` for float32, ``1.3e154``
    for float64). Every HVP solver forms squared norms of ``(H + λI)v`` (residuals, Lanczos and LiSSA's
    scale), and ``(λ‖v‖)²`` overflows to inf there for any unit-scale ``v``; well before that ``H`` is lost
    to round-off in ``H + λI`` and the scores are ``−g_qᵀg/λ``, the gradients' dot products scaled away."""
    value = getattr(damping, "value", getattr(damping, "base", damping))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    limit = math.sqrt(torch.finfo(dtype).max)
    if math.isfinite(float(value)) and float(value) > limit:
        kind = str(dtype).replace("torch.", "")
        raise InfluenceConfigError(
            f"{name}={value!r} is too large for the {kind} computation: squared norms of (H + {name}·I)v overflow "
            f"{kind} above {name} ≈ {limit:.3g} (sqrt of its largest value, {torch.finfo(dtype).max:.3g}), and long "
            f"before that H is lost to round-off beside {name}·I. Use a damping near the curvature's scale (the "
            "optimizer's weight_decay, or damping='auto')" + (", or dtype=torch.float64." if dtype == torch.float32 else ".")
        )


def _short(values: Sequence[Any]) -> str:
    return repr(list(values[:5]))[:-1] + (", …]" if len(values) > 5 else "]")


def check_params(params: Any, name: str = "params") -> None:
    """Raise unless ``params`` is ``None``, a string, or a non-empty sequence of strings (parameter names,
    prefixes or globs)."""
    if params is None or isinstance(params, str):
        return
    fix = f"pass parameter names, prefixes or globs, e.g. {name}=['classifier'] or {name}='*.bias', or None for all"
    try:
        items = list(params)
    except TypeError:
        raise InfluenceConfigError(f"{name}={params!r} is not a name or a list of names; {fix}.") from None
    if not items:
        raise InfluenceConfigError(f"{name}={params!r} is empty; {fix}.")
    bad = [p for p in items if not isinstance(p, str)]
    if bad:
        raise InfluenceConfigError(f"{name}={params!r} holds {bad[0]!r}, which is not a string; {fix}.")


def warn_num_queries(num_queries: int, available: int, name: str = "num_queries") -> None:
    """Warn when fewer query examples exist than ``num_queries`` asks for (all of them are used)."""
    if num_queries > available:
        warnings.warn(
            f"{name}={num_queries} is larger than the query dataset ({available} examples): all {available} are "
            f"used as queries. Pass {name}≤{available} to silence this, or a larger query dataset.",
            UserWarning,
            stacklevel=2,
        )


@dataclass(frozen=True)
class RunArguments:
    """The checked run arguments common to the callback and :func:`compute_influence`, built once by
    :func:`check_run_arguments`.

    Attributes:
        num_queries: highest-loss queries to pick when ``query_indices`` is ``None``.
        query_indices: dataset positions of the queries, or ``None``.
        params: names or prefixes of the attributed parameters (``None``: all trainable).
        forward_chunk: examples per forward pass and per full-data HVP chunk (the public ``chunk_size``).
        grad_chunk: examples per per-example-gradient chunk ``[B, P]``; ``None``: ``forward_chunk``, or
            fewer so that the chunk stays within :data:`GRAD_CHUNK_BYTES` (see :meth:`grad_chunk_for`).
        query_batch_size: right-hand sides solved together (``None``: all queries at once).
        dtype: dtype of the influence maths (float32 or float64).

    HVP tangents (right-hand sides vmapped together inside one Hessian-vector product) are bounded by the
    iterative solvers' own ``tangent_chunk`` setting.
    """

    num_queries: int
    query_indices: Optional[Tuple[int, ...]]
    params: Optional[Union[str, Sequence[str]]]
    forward_chunk: int
    grad_chunk: Optional[int]
    query_batch_size: Optional[int]
    dtype: torch.dtype

    def grad_chunk_for(self, num_params: int) -> int:
        """Examples per per-example-gradient chunk for ``num_params`` parameters: ``grad_chunk`` when
        given, else ``forward_chunk`` capped so that ``[B, P]`` fits :data:`GRAD_CHUNK_BYTES` (at least 1)."""
        if self.grad_chunk is not None:
            return self.grad_chunk
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return int(max(1, min(self.forward_chunk, GRAD_CHUNK_BYTES // max(1, num_params * itemsize))))


#: memory for one chunk of per-example gradients ``[B, P]`` when ``grad_chunk`` is not given
GRAD_CHUNK_BYTES = 256 * 2**20


def check_run_arguments(
    *,
    num_queries: int = 16,
    query_indices: Any = None,
    params: Any = None,
    chunk_size: int = 256,
    grad_chunk_size: Optional[int] = None,
    query_batch_size: Optional[int] = None,
    dtype: Any = torch.float32,
    self_influence: Any = False,
    damping: Any = None,
) -> RunArguments:
    """Check the arguments shared by the callback and :func:`compute_influence`; raise
    :class:`~lightning_influence.errors.InfluenceConfigError` naming the first bad one and its fix.
    ``self_influence`` must be a bool; a numeric ``damping`` must fit the dtype (:func:`check_damping_range`)."""
    check_flag("self_influence", self_influence)
    check_positive_int("num_queries", num_queries)
    check_positive_int("chunk_size", chunk_size)
    check_positive_int("grad_chunk_size", grad_chunk_size, allow_none=True)
    check_positive_int("query_batch_size", query_batch_size, allow_none=True)
    check_params(params)
    resolved = resolve_dtype(dtype)
    check_damping_range(damping, resolved)
    return RunArguments(
        num_queries=num_queries,
        query_indices=check_query_indices(query_indices),
        params=params,
        forward_chunk=chunk_size,
        grad_chunk=grad_chunk_size,
        query_batch_size=query_batch_size,
        dtype=resolved,
    )


def check_writable_file(path: Union[str, "os.PathLike[str]"], name: str, fix: str) -> None:
    """Raise unless a file can be created (or replaced) at ``path``: it is not a directory, and its nearest
    existing parent is a writable directory (missing parents are created when writing).

    Args:
        name: what the path is, for the message (``"report_path"``).
        fix: how to avoid the problem, appended to the message.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise InfluenceConfigError(f"{name}: {path} is a directory, not a file. {fix}")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.path.isdir(parent):
        raise InfluenceConfigError(
            f"{name}: {path} cannot be created because {parent} is a file, not a directory "
            f"({errno.errorcode[errno.ENOTDIR]}). {fix}"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InfluenceConfigError(
            f"{name}: {path} cannot be written: the directory {parent} is not writable "
            f"({errno.errorcode[errno.EACCES]}). {fix}"
        )
