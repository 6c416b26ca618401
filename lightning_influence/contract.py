"""The loss contract, checked on the first real examples of each dataset before any heavy work (and, in the
callback, before training): a wrong loss must be refused, never scored.

:func:`check_first_batch` runs, in order:

1. :func:`check_readable`: the dataset's last example can be read (a ``__len__`` larger than the data
   fails at once, naming the length and the example, not deep inside the scoring pass).
2. :func:`check_model_outputs`: on ``(inputs, targets)`` batches the model's forward runs on the inputs as
   given (integer inputs to a floating layer: the message names the dtype and where to convert) and, with
   the default cross-entropy, returns one tensor (a tuple or dict: the message names ``loss_fn=``).
3. :func:`check_default_targets`: with the default cross-entropy, floating targets are accepted only as
   class probabilities of the outputs' shape (``≥ 0``, summing to 1 over the class dimension); floating
   class labels and regression targets are refused with ``loss_fn=`` in the message.
4. the labels' range and the loss's shape and finiteness (:meth:`Objective.check_targets`,
   :meth:`Objective.check_per_example`).
5. :func:`check_losses_alone`: each example's loss is the same alone as in the batch, so that a loss which
   broadcasts (outputs ``[B, 1]`` against targets ``[B]`` give ``[B, B]``, summed to ``[B]``) or mixes the
   examples of a batch is refused with the shapes it saw.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor

from .data import ExampleSource
from .errors import InfluenceConfigError, InfluenceRuntimeError
from .objective import HOOK_NAME, Objective, default_loss_fn

__all__ = ["REGRESSION_LOSS", "check_default_targets", "check_finite", "check_first_batch", "check_losses_alone",
           "check_model_outputs", "check_readable"]

#: the per-example squared error the messages suggest for regression (targets of any shape with as many
#: values as the outputs: ``[B]`` against ``[B, 1]`` included)
REGRESSION_LOSS = "loss_fn=lambda out, y: ((out - y.view_as(out)) ** 2).reshape(len(out), -1).sum(1)"
#: relative and absolute tolerance of the alone-versus-batched comparison (float32 kernels of different
#: batch sizes agree to about 1e-6 relative)
_RTOL, _ATOL = 1e-3, 1e-5


def check_first_batch(objective: Objective, source: ExampleSource, positions: Tensor) -> Any:
    """The checks of the module docstring on the examples at ``positions`` of ``source``; returns their
    prepared batch."""
    check_readable(source)
    indices = source.indices[positions].tolist()
    examples = [source.dataset[i] for i in indices]  # read once: the batch and each example alone
    batch = source.prepare(source.collate_fn(examples))
    outputs = check_model_outputs(objective, batch, source.what, indices)
    if outputs is not None:
        check_default_targets(objective, outputs, batch[1], source.what)
    objective.check_targets(batch, indices, source.what)
    check_finite(objective, batch, indices, source.what)
    objective.check_per_example(batch)
    check_losses_alone(objective, source, indices, batch, [source.prepare(source.collate_fn([e])) for e in examples])
    return batch


def check_readable(source: ExampleSource) -> None:
    """Read the last example of ``source``: a dataset whose ``__len__`` exceeds its data is refused here."""
    if not len(source):
        return
    last = int(source.indices[-1])
    n = len(source.dataset)  # type: ignore[arg-type]
    try:
        source.dataset[last]
    except (IndexError, KeyError, StopIteration) as err:
        raise InfluenceConfigError(
            f"the {source.what} dataset {type(source.dataset).__name__} says it holds {n} examples (__len__), but "
            f"example {last} cannot be read ({type(err).__name__}: {err}). Make __len__ return the number of "
            "examples that __getitem__ serves."
        ) from err


def _where(what: str, indices: Sequence[int]) -> str:
    return f"the first {what} examples (dataset indices {list(indices)[:4]})"


def check_model_outputs(objective: Objective, batch: Any, what: str, indices: Sequence[int]) -> Optional[Any]:
    """The model's outputs on an ``(inputs, targets)`` batch (``None`` on the ``influence_loss`` path): its
    forward must run on the inputs as the dataset gives them and, for the default loss, return one tensor."""
    if objective.uses_hook:
        return None
    inputs = batch[0]
    try:
        outputs = objective.outputs(batch)
    except (RuntimeError, TypeError, ValueError) as err:
        if isinstance(inputs, Tensor) and not inputs.is_floating_point() and _dtype_error(err):
            raise InfluenceConfigError(
                f"the model's forward fails on {_where(what, indices)}: their inputs are {inputs.dtype} "
                f"(shape {list(inputs.shape)}) and a floating layer cannot take them ({type(err).__name__}: "
                f"{str(err).splitlines()[0]}). Influence feeds the dataset's inputs to the model as they are: convert "
                "them in the dataset or collate_fn (x.float()), or inside forward, or define "
                f"{HOOK_NAME}(self, batch) -> Tensor[B] on your LightningModule to do what training_step does."
            ) from err
        raise
    if objective.loss_fn is default_loss_fn and not isinstance(outputs, Tensor):
        kind = type(outputs).__name__
        keys = f" with keys {list(outputs)[:5]}" if isinstance(outputs, dict) else ""
        raise InfluenceConfigError(
            f"the model returns a {kind}{keys}, not a tensor of logits, so the default cross-entropy cannot score "
            f"it. Pass loss_fn= taking that output, e.g. loss_fn=lambda out, y: F.cross_entropy(out[0], y, "
            f"reduction='none') (out['logits'] for a dict), or define {HOOK_NAME}(self, batch) -> Tensor[B]."
        )
    return outputs


def _dtype_error(err: BaseException) -> bool:
    text = str(err).lower()
    return any(s in text for s in ("dtype", "scalar type", "expected scalar", "not implemented for 'long'",
                                   "not implemented for 'int'", "found dtype"))


def check_default_targets(objective: Objective, outputs: Any, targets: Any, what: str) -> None:
    """With the default cross-entropy, refuse floating targets unless they are class probabilities of the
    outputs' shape (``≥ 0``, summing to 1 over dimension 1)."""
    if objective.loss_fn is not default_loss_fn or not isinstance(targets, Tensor) or not isinstance(outputs, Tensor):
        return
    if not targets.is_floating_point():
        return
    shapes = f"outputs {list(outputs.shape)}, targets {list(targets.shape)} ({targets.dtype})"
    regression = (f"pass a per-example loss for regression, e.g. {REGRESSION_LOSS}, or define "
                  f"{HOOK_NAME}(self, batch) -> Tensor[B] on your LightningModule.")
    if targets.shape != outputs.shape:
        if outputs.dim() >= 2 and outputs.shape[1] > 1 and targets.dim() == outputs.dim() - 1 and _integral(targets):
            raise InfluenceConfigError(
                f"the {what} targets are floating-point class labels ({shapes}) and the default loss_fn is "
                "cross-entropy, which needs integer class indices: store them as integers (torch.long; y.long() in "
                f"the dataset or collate_fn). If they are regression targets, {regression}"
            )
        raise InfluenceConfigError(
            f"the {what} targets are floating-point ({shapes}), which looks like regression, but the default loss_fn "
            "is per-example cross-entropy for classification (integer class targets, outputs [B, classes]). "
            + _sentence(regression)
        )
    probs = targets.detach().double()
    if outputs.dim() < 2 or outputs.shape[1] < 2:
        raise InfluenceConfigError(
            f"the {what} targets are floating-point ({shapes}) with one output per example, which looks like "
            "regression, but the default loss_fn is per-example cross-entropy for classification. " + _sentence(regression)
        )
    sums = probs.sum(1)
    if bool((probs < -1e-6).any()) or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        raise InfluenceConfigError(
            f"the {what} targets are floating-point with the outputs' shape ({shapes}) but are not class "
            f"probabilities (values from {float(probs.min()):.3g} to {float(probs.max()):.3g}, sums over the classes "
            f"from {float(sums.min()):.3g} to {float(sums.max()):.3g}), which looks like regression with "
            f"{outputs.shape[1]} outputs; the default loss_fn is cross-entropy. " + _sentence(regression)
        )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def check_finite(objective: Objective, batch: Any, indices: Sequence[int], what: str) -> None:
    """Name the first example (its dataset index) whose loss is NaN/inf. A loss of the wrong shape is left
    to :meth:`Objective.check_per_example`, which names the shape."""
    out = objective.losses(batch)
    if not isinstance(out, Tensor) or out.dim() != 1 or out.shape[0] != len(indices):
        return
    bad = (~torch.isfinite(out)).nonzero().flatten().tolist()
    if bad:
        raise InfluenceRuntimeError(
            f"{_loss_name(objective)} is NaN/inf for {len(bad)} of {len(indices)} examples at the trained weights "
            f"(the first: {what} example {int(indices[bad[0]])}); influence functions need a finite loss. Check "
            "that example's inputs and label, and the trained model (did training diverge?)."
        )


def _integral(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all()) and bool((t == t.round()).all()) and bool((t >= 0).all())


def check_losses_alone(objective: Objective, source: ExampleSource, indices: Sequence[int], batch: Any,
                       singles: Sequence[Any]) -> None:
    """Each example's loss alone (``singles[j]``, a batch of one) must equal its entry in the loss of
    ``batch``: a loss that broadcasts across the batch or mixes its examples is refused, with the shapes it
    saw. ``indices`` are the examples' dataset indices."""
    if len(indices) < 2:
        return
    together = objective.losses(batch).detach().double()
    alone: List[float] = []
    for j, one in enumerate(singles):
        single = objective.losses(one).detach().double()
        if single.numel() != 1:
            raise InfluenceConfigError(
                f"{_loss_name(objective)} returned shape {list(single.shape)} for a batch of 1 example ({source.what} "
                f"example {int(indices[j])}); influence needs one loss per example, shape [B], for batches of any "
                "size (the last chunk may hold one example)."
            )
        alone.append(float(single.reshape(())))
    expected = torch.tensor(alone, dtype=torch.float64)
    scale = max(1.0, float(expected.abs().max()))
    if torch.allclose(together, expected, rtol=_RTOL, atol=_ATOL * scale):
        return
    j = int((together - expected).abs().argmax())
    raise InfluenceConfigError(
        f"{_loss_name(objective)} gives {source.what} example {int(indices[j])} the loss "
        f"{float(together[j]):.6g} in a batch of {len(indices)} but {float(expected[j]):.6g} alone: each example's "
        f"loss must depend on that example only. {_shapes(objective, batch)}{_broadcast_hint(objective, batch)}"
    )


def _loss_name(objective: Objective) -> str:
    return f"{type(objective.module).__name__}.{HOOK_NAME}(batch)" if objective.uses_hook else "loss_fn(outputs, targets)"


def _shapes(objective: Objective, batch: Any) -> str:
    if objective.uses_hook:
        return ""
    out = objective.outputs(batch)
    targets = batch[1]
    if isinstance(out, Tensor) and isinstance(targets, Tensor):
        return f"(outputs {list(out.shape)}, targets {list(targets.shape)}.) "
    return ""


def _broadcast_hint(objective: Objective, batch: Any) -> str:
    """The likely cause when outputs and targets have the same number of values in different shapes."""
    if objective.uses_hook:
        return "Compute each example's loss from its own outputs and targets only."
    out, targets = objective.outputs(batch), batch[1]
    if isinstance(out, Tensor) and isinstance(targets, Tensor) and out.shape != targets.shape \
            and out.numel() == targets.numel():
        return ("Outputs and targets of different shapes broadcast against each other (e.g. [B, 1] − [B] is "
                f"[B, B]): reshape the targets to the outputs' shape, e.g. {REGRESSION_LOSS}.")
    return "Compute each example's loss from its own outputs and targets only (no batch means or sums)."
