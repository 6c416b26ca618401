"""The callback's checks that are not about data: its own arguments (the shared ones are
:func:`~lightning_influence.validation.check_run_arguments`'), where it sits among the Trainer's callbacks,
and why a fit computed nothing. Each message names the argument and the fix."""

from __future__ import annotations

import datetime
import math
import os
from typing import Any, Optional, Sequence

from torch.utils.data import DataLoader

from ..checks import check_positive_int
from ..curvature.damping import resolve_damping
from ..errors import InfluenceConfigError
from ..validation import check_flag

__all__ = ["AVERAGING_CALLBACKS", "averaging_order_note", "check_build_index", "check_callback_arguments", "check_timeout",
           "nothing_trained_note"]

#: callbacks that swap averaged weights into the model in their own ``on_train_end``
AVERAGING_CALLBACKS = ("StochasticWeightAveraging", "WeightAveraging", "EMAWeightAveraging")


def check_timeout(value: Any) -> float:
    """``collective_timeout`` as seconds: a finite number > 0 (or a ``datetime.timedelta``)."""
    seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (0 < seconds < math.inf):
        raise InfluenceConfigError(f"collective_timeout={value!r} must be a number of seconds > 0 (or a "
                                   "datetime.timedelta), e.g. collective_timeout=600.")
    return float(seconds)


def check_build_index(build_index: Any, projection_dim: Any) -> Optional[str]:
    """``build_index`` as the index's representation (``None`` for no index): ``True`` is ``"exact"``."""
    if build_index is False or build_index is None:
        return None
    if build_index is True:
        build_index = "exact"
    if build_index not in ("exact", "compressed"):
        raise InfluenceConfigError(f"build_index={build_index!r} must be True, False, 'exact' or 'compressed'.")
    check_positive_int("index_projection_dim", projection_dim)
    return str(build_index)


def check_callback_arguments(**kw: Any) -> None:
    """The callback's own arguments, by name (``top_k``, ``save_results``, ``report``, ``report_path``,
    ``query_dataloader``, ``on_error``, ``damping``, ``loss_fn``, ``render_example``, ``decode``, ``on_results``,
    ``reporters``, ``per_token``)."""
    check_positive_int("top_k", kw["top_k"])
    for flag in ("save_results", "report", "per_token"):
        check_flag(flag, kw[flag])
    path = kw["report_path"]
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise InfluenceConfigError(f"report_path={path!r} must be a file path (str or os.PathLike) or None for "
                                   "influence/report.html beside the results.")
    if kw["query_dataloader"] is not None and not isinstance(kw["query_dataloader"], DataLoader):
        raise InfluenceConfigError(f"query_dataloader must be a torch DataLoader, got {type(kw['query_dataloader']).__name__}.")
    if kw["on_error"] not in ("warn", "raise"):
        raise InfluenceConfigError(f"on_error={kw['on_error']!r} must be 'warn' or 'raise'.")
    if kw["damping"] is not None:
        resolve_damping(kw["damping"])
    for name, signature in (("loss_fn", "loss_fn(outputs, targets) -> Tensor[B]"),
                            ("render_example", "render_example(example) -> value"),
                            ("decode", "decode(token_ids: list[int]) -> str (e.g. a tokenizer's decode)"),
                            ("on_results", "on_results(trainer, pl_module, results)")):
        if kw[name] is not None and not callable(kw[name]):
            raise InfluenceConfigError(f"{name}={kw[name]!r} is not callable; pass a function {signature} or None.")
    reporters = kw["reporters"]
    if reporters is not None:
        bad = [r for r in (reporters if isinstance(reporters, (list, tuple)) else [reporters]) if not callable(r)]
        if bad or not isinstance(reporters, (list, tuple)):
            raise InfluenceConfigError(f"reporters={reporters!r} must be a list of reporters (Scalars(), Html(), "
                                       "Wandb(), or subclasses of lightning_influence.reporting.Reporter).")


def averaging_order_note(callbacks: Sequence[Any], mine: Any) -> Optional[str]:
    """A warning's text when a weight-averaging callback comes after ``mine`` in ``callbacks``: it swaps the
    averaged weights in at its own ``on_train_end``, after influence explained the un-averaged ones."""
    start = callbacks.index(mine) if mine in callbacks else -1
    for cb in callbacks[start + 1:]:
        if type(cb).__name__ in AVERAGING_CALLBACKS:
            name = type(cb).__name__
            return (f"InfluenceCallback is listed before {name}, which swaps in the averaged weights in its own "
                    f"on_train_end; influence would explain the un-averaged weights. List InfluenceCallback after "
                    f"{name} in Trainer(callbacks=[...]).")
    return None


def nothing_trained_note(trainer: Any) -> str:
    """Why ``trainer.fit`` ran no training loop (so Lightning skipped ``on_train_end``), and what to do."""
    if trainer.limit_train_batches == 0:
        why = "limit_train_batches=0"
    else:
        limits = f"max_epochs={trainer.max_epochs}" + (f" or max_steps={trainer.max_steps}" if trainer.max_steps != -1 else "")
        start = f"the checkpoint it resumed from ({trainer.ckpt_path})" if trainer.ckpt_path else "the loop state"
        why = f"{start} had already reached {limits} (epoch {trainer.current_epoch}, step {trainer.global_step})"
    return (f"InfluenceCallback computed nothing: trainer.fit ran no training because {why}, and Lightning skips "
            "on_train_end when it does not train. Raise max_epochs to train further, or call "
            "lightning_influence.compute_influence(model, train_dataset, val_dataset) on the trained model.")
