"""Which weights an index was built for: a checksum per attributed parameter, compared before every
query so that scores are never read against other weights."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

from torch import nn

from ..errors import InfluenceConfigError
from ..persistence import tensor_checksum

__all__ = ["IndexMismatchError", "check_fingerprint", "fingerprint"]


class IndexMismatchError(InfluenceConfigError):
    """The model (or the loss, or the parameters) handed to an index differs from the one it was built
    for; the message names what differs and the fix (rebuild the index, or load the weights it was built
    for)."""


def fingerprint(module: nn.Module, param_names: Sequence[str]) -> Dict[str, Any]:
    """``{"params": [...], "checksum": sha256, "param_checksums": {name: sha256}}`` of the attributed
    parameters of ``module`` (their stored values, dtypes and shapes: :func:`tensor_checksum`)."""
    named = dict(module.named_parameters())
    missing = [n for n in param_names if n not in named]
    if missing:
        raise IndexMismatchError(f"the module has no parameters {missing[:5]} that the index attributes to.")
    per = {n: tensor_checksum({n: named[n]}) for n in param_names}
    return {"params": list(param_names), "checksum": tensor_checksum({n: named[n] for n in param_names}),
            "param_checksums": per}


def check_fingerprint(expected: Mapping[str, Any], module: nn.Module, where: str) -> None:
    """Raise :class:`IndexMismatchError` unless ``module``'s attributed parameters are those the index at
    ``where`` was built for: the same names and the same values (bit for bit)."""
    names = list(expected["params"])
    named = dict(module.named_parameters())
    fix = (f"Rebuild the index for these weights (build_index / build_index_for_run), or load the weights the "
           f"index at {where} was built for.")
    missing = [n for n in names if n not in named]
    if missing:
        raise IndexMismatchError(
            f"the module {type(module).__name__} lacks parameters {missing[:5]} that the index at {where} attributes "
            f"to (it was built for parameters {names[:5]}{'…' if len(names) > 5 else ''}). {fix}")
    got = fingerprint(module, names)
    if got["checksum"] == expected["checksum"]:
        return
    differ = [n for n in names if got["param_checksums"][n] != expected["param_checksums"].get(n)]
    raise IndexMismatchError(
        f"the index at {where} was built for other weights: parameter(s) {differ[:8]}"
        f"{f' and {len(differ) - 8} more' if len(differ) > 8 else ''} of {type(module).__name__} differ from "
        f"those it was built for (checksum {got['checksum'][:12]}… against {expected['checksum'][:12]}…), so its "
        f"stored training gradients do not belong to this model. {fix}")
