"""How a batch becomes per-example losses.

Two contracts, the user picks by what they define:

* ``(inputs, targets)`` batches (tuples, lists or the first two items of a longer sequence) with a
  ``loss_fn(outputs, targets) -> Tensor[B]`` (default: cross-entropy with ``reduction="none"``);
* a module method ``influence_loss(self, batch) -> Tensor[B]``, used whenever the module defines it,
  so any batch format works.

Curvature methods built on the Fisher (EK-FAC, K-FAC) need gradients drawn from the *model's predictive
distribution* (the true Fisher, which equals the Gauss–Newton matrix for cross-entropy), not from the
training labels. With the default cross-entropy this needs nothing from the user: the Fisher batch carries,
per example, a Gaussian sketch of the output Fisher instead of a label (:meth:`Objective.fisher_batch`),
which has the same expectation as a label drawn from ``softmax(outputs)`` and far less noise. A custom
``influence_loss(self, batch, sample=False)`` that accepts a ``sample`` flag is called with ``sample=True``
there and should then use a label drawn from its own predictive distribution (e.g.
``torch.distributions.Categorical(logits=out).sample()``, or ``out + noise`` for a Gaussian regression loss).
Any other loss falls back to the empirical Fisher (training labels), which is recorded as
``fisher="empirical"``.

The objective binds a module to a dict of parameter values through ``torch.func.functional_call``;
the module's own tensors are never modified.
"""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .autodiff import DEFAULT_PLAN, Differentiation, ProbeReport, UnsupportedModelError, probe
from .errors import InfluenceConfigError, InfluenceRuntimeError
from .functional import ParamSpace, PerExampleLoss, batch_size_of, map_tensors, module_loss
from .seeds import Stream, derive_seed

__all__ = ["IGNORE_INDEX", "Objective", "class_dim", "default_loss_fn", "select_params"]

LossFn = Callable[[Tensor, Tensor], Tensor]
HOOK_NAME = "influence_loss"
#: the label cross-entropy ignores (``F.cross_entropy``'s default ``ignore_index``): zero loss and gradient
IGNORE_INDEX = -100


def class_dim(outputs: Tensor, targets: Tensor) -> int:
    """The dimension of ``outputs`` that holds the classes for the default cross-entropy: the last one when
    ``targets`` has the shape of ``outputs`` without it (a language model's ``[B, T, V]`` next-token logits
    with ``[B, T]`` token targets), else dimension 1 (torch's ``[B, C]`` and ``[B, C, d₁, …]``)."""
    if outputs.dim() >= 3 and tuple(targets.shape) == tuple(outputs.shape[:-1]):
        return outputs.dim() - 1
    return 1


def default_loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-example cross-entropy in nats, ``[B]``.

    * ``[B, C]`` logits with ``[B]`` labels (or ``[B, C]`` probabilities): ``F.cross_entropy(...,
      reduction="none")``.
    * Sequences: ``[B, T, V]`` logits with ``[B, T]`` integer targets (a language model; or torch's
      ``[B, C, T, …]`` layout with ``[B, T, …]`` targets): the **sum** over the sequence's positions of the
      token cross-entropies. Positions labelled :data:`IGNORE_INDEX` (``−100``: padding, a prompt) add
      nothing, to the loss or its gradient. So ``R(θ)`` is the mean over sequences of their summed token
      losses, and a removed sequence takes all its tokens with it.

    Example:
        >>> logits, tokens = torch.zeros(2, 3, 4), torch.tensor([[1, 2, -100], [0, -100, -100]])
        >>> default_loss_fn(logits, tokens)  # 2 and 1 real tokens, each log(4) nats
        tensor([2.7726, 1.3863])
    """
    if outputs.dim() >= 3 and class_dim(outputs, targets) != 1:
        outputs = outputs.movedim(-1, 1)
    losses = F.cross_entropy(outputs, targets, reduction="none", ignore_index=IGNORE_INDEX)
    return losses.reshape(losses.shape[0], -1).sum(dim=1) if losses.dim() > 1 else losses


def _fisher_sketch_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """The default cross-entropy's Fisher loss. ``targets`` from :meth:`Objective.fisher_batch`: a float
    sketch ``δ`` of the shape of ``outputs`` gives the pseudo-loss ``⟨outputs, δ⟩`` per example, whose
    gradient with respect to the logits is ``δ`` (its value means nothing; only its gradients are used);
    integer labels give the cross-entropy."""
    if targets.is_floating_point() and targets.shape == outputs.shape:
        return (outputs * targets).reshape(outputs.shape[0], -1).sum(dim=1)
    return default_loss_fn(outputs, targets)


def _accepts_sample(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes a ``sample`` keyword (or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False
    return any(p.name == "sample" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class _LossModule(nn.Module):
    """Wraps the user's module so that ``forward(batch)`` returns per-example losses."""

    def __init__(self, inner: nn.Module, loss_fn: Optional[LossFn]) -> None:
        super().__init__()
        self.inner = inner
        self._loss_fn = loss_fn

    def forward(self, batch: Any, sample: bool = False) -> Tensor:
        if self._loss_fn is None:
            hook = getattr(self.inner, HOOK_NAME)
            return hook(batch, sample=True) if sample else hook(batch)
        inputs, targets = batch[0], batch[1]
        return self._loss_fn(self.inner(inputs), targets)


def select_params(module: nn.Module, patterns: Optional[Sequence[str]]) -> Dict[str, nn.Parameter]:
    """The trainable parameters to attribute to, in module order.

    Args:
        module: the trained model.
        patterns: ``None`` for every parameter with ``requires_grad``; otherwise names or prefixes
            (``"classifier"`` selects ``classifier.weight`` and ``classifier.bias``) or glob patterns
            (``"*.bias"``).

    Raises:
        InfluenceConfigError: if nothing trainable matches.
    """
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if patterns is None:
        chosen = trainable
    else:
        if isinstance(patterns, str):
            patterns = [patterns]

        def matches(name: str) -> bool:
            return any(_pattern_matches(pat, name) for pat in patterns)  # type: ignore[union-attr]

        chosen = {n: p for n, p in trainable.items() if matches(n)}
        if chosen:
            check_every_pattern(module, list(patterns), trainable)
    if not chosen:
        names = ", ".join(list(trainable)[:8]) or "(none: every parameter has requires_grad=False)"
        raise InfluenceConfigError(
            f"params={patterns!r} matches no trainable parameter of {type(module).__name__}. "
            f"Trainable parameters include: {names}. Pass names or prefixes of these, or params=None "
            "for all of them."
        )
    return chosen


def _pattern_matches(pattern: str, name: str) -> bool:
    """A parameter name matches a name, a prefix (``"classifier"`` for ``classifier.weight``) or a glob."""
    return name == pattern or name.startswith(pattern.rstrip(".") + ".") or fnmatch.fnmatchcase(name, pattern)


def check_every_pattern(module: nn.Module, patterns: Sequence[str], trainable: Dict[str, nn.Parameter]) -> None:
    """Raise naming each pattern of ``params`` that selects no trainable parameter (a typo beside a valid
    pattern would otherwise narrow the attribution silently)."""
    names = [n for n, _ in module.named_parameters()]
    for pat in patterns:
        if any(_pattern_matches(pat, n) for n in trainable):
            continue
        frozen = [n for n in names if _pattern_matches(pat, n)]
        close = [n for n in trainable if n.split(".")[0] == pat.split(".")[0]][:4] or list(trainable)[:6]
        why = (f"matches only parameters with requires_grad=False ({', '.join(frozen[:4])})" if frozen
               else "matches no parameter")
        raise InfluenceConfigError(
            f"params={list(patterns)!r}: the pattern {pat!r} {why} of {type(module).__name__}. Trainable parameters "
            f"include: {', '.join(close)}. Fix or remove {pat!r} (names, prefixes or globs)."
        )


class Objective:
    """Per-example loss of a module, as a function of a flat vector of the attributed parameters.

    Args:
        module: the trained model. It is put in eval mode by the caller; this class never writes to it.
        params: names/prefixes of the parameters to attribute to (``None``: all trainable ones).
        loss_fn: ``loss_fn(outputs, targets) -> Tensor[B]`` for ``(inputs, targets)`` batches.
            Ignored when the module defines ``influence_loss(batch)``. Default: cross-entropy.
        dtype: floating dtype the influence maths runs in; parameters, floating buffers and floating
            batch tensors are cast to it.
    """

    def __init__(
        self,
        module: nn.Module,
        params: Optional[Union[str, Sequence[str]]] = None,
        loss_fn: Optional[LossFn] = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not dtype.is_floating_point:
            raise InfluenceConfigError(f"dtype={dtype} is not a floating dtype; use torch.float32 or torch.float64.")
        self.module = module
        self.dtype = dtype
        self.uses_hook = callable(getattr(module, HOOK_NAME, None))
        self.loss_fn: Optional[LossFn] = None if self.uses_hook else (loss_fn or default_loss_fn)
        selected = select_params(module, params)
        self.device = next(iter(selected.values())).device
        wrapper = _LossModule(module, self.loss_fn)
        prefixed = {f"inner.{n}": p.detach().to(dtype) for n, p in selected.items()}
        frozen: Dict[str, Tensor] = {}
        for n, t in list(wrapper.named_parameters()) + list(wrapper.named_buffers()):
            if n not in prefixed:
                frozen[n] = t.detach().to(dtype) if t.is_floating_point() else t.detach()
        self._inner_frozen = {n[len("inner.") :]: t for n, t in frozen.items() if n.startswith("inner.")}
        self.space = ParamSpace.from_params(prefixed)
        self.theta: Tensor = self.space.flatten(prefixed)
        self.param_names: Tuple[str, ...] = tuple(selected)
        self.loss: PerExampleLoss = module_loss(wrapper, frozen)
        #: how Fisher-based curvature draws its labels: ``"sampled"`` (from the model's predictive
        #: distribution) or ``"empirical"`` (the training labels; custom losses without a ``sample`` flag)
        self.fisher = "empirical"
        #: per-example loss whose gradients are the Fisher's (labels sampled where the loss allows it)
        self.fisher_loss: PerExampleLoss = self.loss
        if self.uses_hook and _accepts_sample(getattr(module, HOOK_NAME)):
            self.fisher = "sampled"
            self.fisher_loss = module_loss(wrapper, frozen, sample=True)
        elif self.loss_fn is default_loss_fn:
            self.fisher = "sampled"
            self.fisher_loss = module_loss(_LossModule(module, _fisher_sketch_loss), frozen)
        self.wrapper = wrapper
        self._num_classes: Optional[int] = None  # output classes, found by check_targets
        #: how per-example gradients and Hessian-vector products are taken (:mod:`~lightning_influence.autodiff`);
        #: the default until :meth:`choose_differentiation` probes the model
        self.differentiation: Differentiation = DEFAULT_PLAN
        self.probe_report: Optional[ProbeReport] = None

    @property
    def num_params(self) -> int:
        return self.space.num_params

    def choose_differentiation(self, batch: Any, need_hvp: Union[bool, str] = True,
                               indices: Optional[Sequence[int]] = None,
                               what: str = "training") -> Differentiation:
        """Probe how to differentiate this objective on a few prepared examples (``batch``) and keep the
        first strategy that works and agrees with the references, in the order measured fastest
        (:func:`~lightning_influence.autodiff.probe`, ``select="first"``: reverse over reverse first on a CPU,
        per-example gradients by ``vmap`` first): second derivatives with the model's kernels or composite ones (math attention, no fused RNN kernels, a differentiable
        ``embedding_bag``), finite differences only when nothing exact works. ``need_hvp=False`` for solvers
        that use per-example gradients only (the Kronecker-factored ones), ``"optional"`` for one that uses
        HVPs where they exist (:func:`~lightning_influence.autodiff.probe`).

        Raises:
            UnsupportedModelError: nothing differentiates the model (the message names the op and layer, and
                which solvers still work).
            InfluenceRuntimeError: the gradient of one of ``batch``'s examples (dataset positions ``indices``,
                a ``what`` example) is NaN/inf whatever the strategy.
        """
        try:
            self.differentiation, self.probe_report = probe(self.loss, self.space, self.theta, batch,
                                                            need_hvp=need_hvp, select="first")
        except UnsupportedModelError:
            from .scoring import checked_grads  # a NaN gradient, not an unsupported op: name the example

            try:
                checked_grads(self.loss, self.space, self.theta, batch, what, 0,
                              indices=None if indices is None else torch.as_tensor(list(indices)),
                              plan=Differentiation(hvp=None, grads="loop"))
            except InfluenceRuntimeError:
                raise
            except Exception:  # noqa: BLE001 - the loop fails as the probe did: its error names the op
                pass
            raise
        return self.differentiation

    def prepare_batch(self, batch: Any) -> Any:
        """Move a collated batch to the parameters' device and cast floating tensors to ``dtype``."""
        if not self.uses_hook and not (isinstance(batch, (list, tuple)) and len(batch) >= 2):
            raise InfluenceConfigError(
                f"batches are {type(batch).__name__}, not (inputs, targets) pairs. Define "
                f"`{HOOK_NAME}(self, batch) -> Tensor[B]` on your LightningModule to return per-example "
                "losses for your batch format."
            )

        def move(t: Tensor) -> Tensor:
            t = t.to(self.device, non_blocking=True)
            return t.to(self.dtype) if t.is_floating_point() else t

        return map_tensors(batch, move)

    def losses(self, batch: Any, theta: Optional[Tensor] = None) -> Tensor:
        """Per-example losses ``[B]`` of a prepared batch at ``theta`` (default: the trained values)."""
        with torch.no_grad():
            out = self.loss(self.space.unflatten(self.theta if theta is None else theta), batch)
        return out

    def outputs(self, batch: Any, theta: Optional[Tensor] = None) -> Optional[Tensor]:
        """The model's outputs for the inputs of an ``(inputs, targets)`` batch at ``theta`` (default: the
        trained values), or ``None`` on the ``influence_loss`` path (where the batch format is the user's)."""
        if self.uses_hook:
            return None
        flat = self.theta if theta is None else theta
        params = {n[len("inner.") :]: t for n, t in self.space.unflatten(flat).items()}
        with torch.no_grad():
            return functional_call(self.module, {**self._inner_frozen, **params}, (batch[0],), strict=False)

    def fisher_batch(self, batch: Any, seed: int, positions: Sequence[int]) -> Any:
        """``batch`` with its targets replaced by a draw from the model's predictive distribution when the
        loss is the default cross-entropy; otherwise ``batch`` unchanged (a ``sample``-aware
        ``influence_loss`` samples inside :attr:`fisher_loss`). Example ``j``'s draw depends only on
        ``seed`` and its dataset position ``positions[j]``, so the same examples get the same draws however
        the training set is chunked or split across processes.

        For logits ``z [B, C]`` with ``p = softmax(z)`` the target is ``δ = √p ⊙ ε − p (√pᵀε)`` with
        ``ε ~ N(0, I_C)``, a float ``[B, C]``; :attr:`fisher_loss` turns it into the logit gradient ``δ``.
        ``E[δδᵀ] = diag(p) − ppᵀ``, the Fisher of the cross-entropy in the logits, exactly as for the
        logit gradient ``p − e_y`` of a label ``y ~ p``, so both estimate the same true Fisher
        ``Jᵀ(diag(p) − ppᵀ)J``. The label's estimate is heavy-tailed for a confident model (rare labels
        give the large gradients); ``(uᵀδ)²`` is ``uᵀ(diag(p) − ppᵀ)u·χ²₁``, with relative variance 2
        (measured effect on EK-FAC: benchmarks/README.md).

        Sequences (``[B, T, V]`` logits with ``[B, T]`` targets, or any layout :func:`class_dim` reads):
        one independent ``δ`` per position along the class dimension, zero where the target is
        :data:`IGNORE_INDEX`. The token terms' cross products vanish in expectation (independent, zero
        mean), so ``E[g gᵀ]`` is the true Fisher ``Σ_t J_tᵀ(diag(p_t) − p_t p_tᵀ)J_t`` of the summed token
        losses, as with each token drawn from the model. Outputs of another shape (``[B]``) get a label
        drawn from ``softmax``."""
        if self.uses_hook or self.loss_fn is not default_loss_fn:
            return batch
        logits = self.outputs(batch)
        assert logits is not None
        z = logits.detach().double().cpu()
        gens = [torch.Generator().manual_seed(derive_seed(seed, Stream.FISHER_PASS, int(i))) for i in positions]
        if z.dim() < 2:
            probs = torch.softmax(z.reshape(z.shape[0], -1), dim=1)
            labels = torch.cat([torch.multinomial(probs[j], 1, generator=g) for j, g in enumerate(gens)])
            return (batch[0], labels.view(batch[1].shape).to(device=batch[1].device, dtype=batch[1].dtype), *batch[2:])
        cd = class_dim(logits, batch[1]) if z.dim() > 2 else 1
        p = torch.softmax(z, dim=cd)
        root = p.sqrt()
        eps = torch.stack([torch.randn(p.shape[1:], generator=g, dtype=torch.float64) for g in gens])
        delta = root * eps - p * (root * eps).sum(cd, keepdim=True)
        targets = batch[1]
        if z.dim() > 2 and isinstance(targets, Tensor) and not targets.is_floating_point():
            delta = delta * (targets.cpu() != IGNORE_INDEX).unsqueeze(cd).to(delta.dtype)  # no draw for padding
        return (batch[0], delta.to(device=logits.device, dtype=logits.dtype), *batch[2:])

    def check_targets(self, batch: Any, indices: Sequence[int], what: str) -> List[int]:
        """Check the integer labels of a prepared batch for the default cross-entropy loss.

        Raises :class:`~lightning_influence.errors.InfluenceConfigError` naming the first example (its
        dataset index, ``indices[j]``) whose label lies outside ``0..C−1``, ``C`` being the number of
        classes the model outputs, other than cross-entropy's ``ignore_index`` ``−100``. Returns the dataset
        indices of the examples whose every label is ``−100``: their loss and gradient are zero. Custom
        losses, the ``influence_loss`` hook and floating (probability) targets are not checked.
        """
        if self.uses_hook or self.loss_fn is not default_loss_fn:
            return []
        targets = batch[1]
        if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
            return []
        if self._num_classes is None:
            out = self.outputs(batch)
            if out is None or out.dim() < 2:
                return []
            self._num_classes = int(out.shape[class_dim(out, targets)])
        c = self._num_classes
        flat = targets.reshape(targets.shape[0], -1)
        ignored = flat == IGNORE_INDEX
        bad = ((flat < 0) | (flat >= c)) & ~ignored
        if bool(bad.any()):
            j = int(bad.any(dim=1).nonzero()[0])
            label = int(flat[j][bad[j]][0])
            raise InfluenceConfigError(
                f"{what} example {int(indices[j])} has label {label}, outside 0..{c - 1}: the model outputs {c} "
                "classes and the default loss is cross-entropy. Fix that example's label, or pass loss_fn= (or "
                f"define {HOOK_NAME}) for another target format."
            )
        return [int(indices[j]) for j in ignored.all(dim=1).nonzero().flatten().tolist()]

    def check_per_example(self, batch: Any) -> None:
        """Raise a clear error unless the loss of ``batch`` is a finite vector with one entry per example."""
        n = batch_size_of(batch)
        if self.loss_fn is default_loss_fn:
            self._check_classification(batch)
        out = self.losses(batch)
        where = f"{type(self.module).__name__}.{HOOK_NAME}(batch)" if self.uses_hook else "loss_fn(outputs, targets)"
        if not isinstance(out, Tensor) or out.dim() != 1 or out.shape[0] != n:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise InfluenceConfigError(
                f"{where} returned shape {shape} for a batch of {n} examples; influence needs one loss per "
                "example, shape [B]. Use reduction='none' (e.g. F.cross_entropy(..., reduction='none'))."
            )
        if not torch.isfinite(out).all():
            bad = int((~torch.isfinite(out)).sum())
            raise InfluenceRuntimeError(
                f"{where} is NaN/inf for {bad} of {n} examples at the trained weights; influence functions "
                "need a finite loss. Check the inputs and the trained model (did training diverge?)."
            )

    def _check_classification(self, batch: Any) -> None:
        """The default loss is cross-entropy over classes: refuse outputs with one value per example and
        floating-point targets (regression), whose cross-entropy is meaningless (shape ``()``, or zero)."""
        out, targets = self.outputs(batch), batch[1]
        single = out is not None and (out.dim() < 2 or out.shape[1] == 1)
        if single and isinstance(targets, Tensor) and targets.is_floating_point():
            raise InfluenceConfigError(
                f"the model's outputs have shape {tuple(out.shape)} with floating-point targets, which looks like "
                "regression, but the default loss_fn is per-example cross-entropy for classification (integer "
                "class targets, outputs [B, classes]). Pass a per-example loss, e.g. "
                "loss_fn=lambda out, y: ((out - y.view_as(out)) ** 2).reshape(len(out), -1).sum(1), or define "
                f"{HOOK_NAME}(self, batch) -> Tensor[B] on your LightningModule."
            )
