"""Per-layer statistics for Kronecker-factored curvature (K-FAC, EK-FAC), streamed over the training set.

For a layer with weight ``W [out, in]`` (a ``Conv2d`` weight flattened to ``[out, C_in·kh·kw]``, the
bias, when attributed, appended as a last input column fed by a constant 1), example ``i``'s gradient is

    G_i = Σ_t g_{i,t} a_{i,t}ᵀ    [out, in'],

with ``a_{i,t}`` and ``g_{i,t}`` what the layer's adapter (:mod:`.adapters`) reads from its input and from
the gradient of example ``i``'s loss with respect to its output at position ``t`` (a ``Linear``: each
leading position of ``[B, *, in]``; a ``Conv2d``: each output location and its receptive-field patch). Its flat parameters are
``vec(G_i)`` in row-major order (``W.reshape(-1)``, then the bias), so ``vec(g aᵀ) = g ⊗ a`` and a
Kronecker block reads ``S ⊗ A`` (output factor first).

Scaling. The target is the Fisher of the *mean* loss, ``F = (1/n) Σ_i E_y[∇ℓ_i ∇ℓ_iᵀ]`` (labels ``y``
from the model's predictive distribution, or the training labels for an empirical Fisher), so
``λ`` keeps the Hessian units of the rest of the package. The factors are

    A = (1/n) Σ_i Σ_t a_{i,t} a_{i,t}ᵀ,       S = (1/(n·T)) Σ_i Σ_t E_y[g_{i,t} g_{i,t}ᵀ],

with ``T`` the positions per example, and ``F_layer ≈ S ⊗ A``. For ``T = 1`` (a ``Linear`` on
``[B, in]``) this is K-FAC's ``E[ggᵀ] ⊗ E[aaᵀ]``; for convolutions it is KFC (Grosse & Martens, 2016):
``T · E_t[ggᵀ] ⊗ E_t[aaᵀ]`` under spatial homogeneity and uncorrelated derivatives.

Capture. Forward hooks, registered for one call and always removed, record each layer's input and
output; one ``torch.autograd.grad`` of the summed Fisher loss with respect to the recorded outputs gives
every example's ``g`` at once (example ``i``'s loss depends only on its own outputs: layers that mix the
batch, such as BatchNorm in train mode, must be in eval mode). The user's module is otherwise untouched.
A layer called more than once per forward (shared weights) raises: its gradient is a sum over calls that
one Kronecker factor cannot represent.

Layers that use their weights without calling a module (``nn.MultiheadAttention``) are *rerouted* during
capture: a forward hook replaces their output by the same value computed through an exposed projection
(:meth:`~.adapters.LayerAdapter.recompute`), whose output gradient is ``g``.

Parameters that are not the weight or bias of a layer with an adapter (by default ``Linear``,
``Conv1d``/``Conv2d`` with ``groups=1``, ``Embedding`` up to 4,096 rows and ``MultiheadAttention``'s packed
in-projection and ``out_proj``; not LayerNorm, BatchNorm affine, positional parameters, grouped
convolutions, ``bias_k``/``bias_v``, layers never called through ``forward``, a bias attributed without its
weight) are handled *diagonally*: their curvature is the mean squared Fisher
gradient per coordinate, ``(1/n) Σ_i E_y[(∂ℓ_i/∂θ_k)²]``, which is exactly EK-FAC's eigenvalue
correction in the identity basis.

Memory: the factors (``in'²`` and ``out²`` per layer) and one chunk of layer inputs and output gradients;
never ``P × P``, never the per-example gradients of the whole set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from ...errors import InfluenceConfigError
from ...autodiff import per_sample_grads
from ...functional import ParamSpace, batch_size_of
from ...objective import Objective
from .adapters import LayerAdapter, adapter_for

__all__ = ["KroneckerLayer", "LayerPlan", "plan_layers", "capture_layers", "diagonal_grads"]

_PREFIX = "inner."


@dataclass(frozen=True)
class KroneckerLayer:
    """One layer handled by Kronecker factors.

    Attributes:
        name: the module's name in the user's model (``""`` for the model itself).
        adapter: the :class:`~.adapters.LayerAdapter` of its type.
        out_features: rows of ``G`` (output features or channels; ``V`` for an Embedding, ``3E`` for an
            attention in-projection).
        in_features: columns of ``G`` without the bias column (``in``, ``C_in·kh·kw``, or ``E``).
        weight_slice: ``(start, stop)`` of the weight in the flat parameter vector.
        bias_slice: ``(start, stop)`` of the bias, or ``None`` when the bias is absent or not attributed.
    """

    name: str
    adapter: Type[LayerAdapter] = field(compare=False)
    out_features: int
    in_features: int
    weight_slice: Tuple[int, int]
    bias_slice: Optional[Tuple[int, int]]

    @property
    def kind(self) -> str:
        """The adapter's module type, e.g. ``"Linear"``."""
        return self.adapter.module_type.__name__

    @property
    def has_bias(self) -> bool:
        return self.bias_slice is not None

    @property
    def in_dim(self) -> int:
        """Columns of ``G`` including the bias column."""
        return self.in_features + int(self.has_bias)

    @property
    def label(self) -> str:
        return self.name or "(model)"

    def gather(self, flat: Tensor) -> Tensor:
        """The layer's block ``[Q, out, in']`` of flat vectors ``[Q, P]`` (weight, then bias column)."""
        q = flat.shape[0]
        w = flat[:, self.weight_slice[0] : self.weight_slice[1]].reshape(q, self.out_features, self.in_features)
        if self.bias_slice is None:
            return w
        b = flat[:, self.bias_slice[0] : self.bias_slice[1]].reshape(q, self.out_features, 1)
        return torch.cat([w, b], dim=2)

    def scatter(self, block: Tensor, out: Tensor) -> None:
        """Write a block ``[Q, out, in']`` into its coordinates of ``out`` ``[Q, P]``."""
        q = block.shape[0]
        out[:, self.weight_slice[0] : self.weight_slice[1]] = block[:, :, : self.in_features].reshape(q, -1)
        if self.bias_slice is not None:
            out[:, self.bias_slice[0] : self.bias_slice[1]] = block[:, :, self.in_features]


@dataclass(frozen=True)
class LayerPlan:
    """Which attributed parameters get Kronecker factors and which the diagonal.

    Attributes:
        layers: the Kronecker-factored layers, in module order.
        modules: the ``nn.Module`` of each layer (same order).
        diagonal: flat-space names (``inner.<name>``) of the diagonally handled parameters.
        diagonal_index: their flat coordinates, ``[D]`` (long), in flat order.
    """

    layers: Tuple[KroneckerLayer, ...]
    modules: Tuple[nn.Module, ...]
    diagonal: Tuple[str, ...]
    diagonal_index: Tensor

    @property
    def diagonal_user_names(self) -> Tuple[str, ...]:
        return tuple(n[len(_PREFIX) :] for n in self.diagonal)

    @property
    def kronecker_numel(self) -> int:
        """Attributed parameters inside the Kronecker layers (weights and attributed biases)."""
        return sum(l.out_features * l.in_dim for l in self.layers)

    @property
    def kronecker_coverage(self) -> float:
        """Fraction of the attributed parameters that are Kronecker-factored, in ``[0, 1]`` (the rest are
        diagonal); ``0.0`` when nothing is attributed."""
        total = self.kronecker_numel + int(self.diagonal_index.numel())
        return self.kronecker_numel / total if total else 0.0


def _offsets(space: ParamSpace) -> Dict[str, Tuple[int, int]]:
    out, pos = {}, 0
    for name, numel in zip(space.names, space.numels):
        out[name] = (pos, pos + numel)
        pos += numel
    return out


def plan_layers(objective: Objective, probe_batch: Any = None) -> LayerPlan:
    """Assign every attributed parameter to a Kronecker layer or to the diagonal.

    A layer with an adapter (:func:`~.adapters.adapter_for`) whose weight is attributed becomes a Kronecker
    layer (with its bias column if the bias is attributed too). With ``probe_batch``, one forward pass (run
    as the capture runs it: gradients on, rerouted modules recomputed) checks that each such layer is called
    exactly once: never called through ``forward`` moves it to the diagonal; twice or more raises.

    Raises:
        InfluenceConfigError: a layer is called more than once per forward (shared weights).
    """
    space = objective.space
    offsets = _offsets(space)
    candidates: List[Tuple[str, nn.Module, Type[LayerAdapter]]] = []
    for mname, mod in objective.module.named_modules():
        adapter = adapter_for(mod)
        if adapter is not None and f"{_PREFIX}{mname + '.' if mname else ''}{adapter.weight_name}" in offsets:
            candidates.append((mname, mod, adapter))
    if probe_batch is not None and candidates:
        calls = _count_calls(objective, [m for _, m, _ in candidates], probe_batch)
        shared = [(n, c) for (n, _, _), c in zip(candidates, calls) if c > 1]
        if shared:
            raise _shared_error(shared[0][0], shared[0][1])
        candidates = [c for c, k in zip(candidates, calls) if k == 1]
    layers, modules, covered = [], [], set()
    for mname, mod, adapter in candidates:
        prefix = f"{_PREFIX}{mname + '.' if mname else ''}"
        w_name, b_name = prefix + adapter.weight_name, prefix + adapter.bias_name
        out_f, in_f = adapter.dims(mod)
        bias = offsets.get(b_name) if getattr(mod, adapter.bias_name, None) is not None else None
        layers.append(KroneckerLayer(mname, adapter, out_f, in_f, offsets[w_name], bias))
        modules.append(mod)
        covered.add(w_name)
        if bias is not None:
            covered.add(b_name)
    diagonal = tuple(n for n in space.names if n not in covered)
    idx = [torch.arange(*offsets[n]) for n in diagonal]
    index = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
    return LayerPlan(tuple(layers), tuple(modules), diagonal, index)


def _shared_error(name: str, calls: int) -> InfluenceConfigError:
    return InfluenceConfigError(
        f"layer {name or '(model)'!r} is called {calls} times in one forward pass (shared weights). K-FAC and "
        "EK-FAC need one input and one output per example and layer; a shared layer's gradient is a sum over "
        "calls that one Kronecker factor cannot represent. Attribute to other parameters (params=[...] "
        "without this layer) or use solver='lissa', 'cg' or 'exact'."
    )


def _reroute_hooks(model: nn.Module, record: Dict[int, Any]) -> List[Any]:
    """Forward hooks on every module of ``model`` whose adapter :attr:`~.adapters.LayerAdapter.reroutes`:
    each replaces the module's output by :meth:`~.adapters.LayerAdapter.recompute`'s and, for a module
    ``m`` with ``id(m)`` in ``record``, calls ``record[id(m)](inputs, target)``. Returns the handles."""
    handles = []
    for mod in model.modules():
        adapter = adapter_for(mod)
        if adapter is None or not adapter.reroutes:
            continue

        def hook(m: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], _out: Any,
                 adapter: Type[LayerAdapter] = adapter) -> Any:
            out, target, inputs = adapter.recompute(m, args, kwargs)
            if id(m) in record:
                record[id(m)](inputs, target)
            return out

        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    return handles


def _count_calls(objective: Objective, modules: Sequence[nn.Module], batch: Any) -> List[int]:
    """Calls of each module in one forward pass run as :func:`capture_layers` runs it (gradients enabled,
    so fused inference paths that call no submodule are not taken; rerouted modules recomputed)."""
    counts = [0] * len(modules)
    handles = []
    try:
        for k, mod in enumerate(modules):
            def hook(_m: nn.Module, _i: Any, _o: Any, k: int = k) -> None:
                counts[k] += 1

            handles.append(mod.register_forward_hook(hook))
        handles += _reroute_hooks(objective.module, {})
        with torch.enable_grad():
            theta = objective.theta.detach().requires_grad_()
            objective.fisher_loss(objective.space.unflatten(theta), batch)
    finally:
        for h in handles:
            h.remove()
    return counts


def capture_layers(objective: Objective, plan: LayerPlan, batch: Any,
                   loss: Optional[Callable[[Any, Any], Tensor]] = None) -> List[Tuple[Tensor, Tensor]]:
    """Layer inputs and output gradients of one Fisher batch (or, with ``loss=objective.loss`` and a
    training batch, of the training losses themselves).

    Returns:
        per layer of ``plan``, ``(a [B, T, in'], g [B, T, out])``: the inputs (bias column of ones
        appended when the bias is attributed) and ``∂ℓ_i/∂(output)`` of each example's own Fisher loss
        (the summed loss differentiated once), detached.
    """
    n = batch_size_of(batch)
    inputs: List[Optional[Tuple[Any, ...]]] = [None] * len(plan.layers)
    outputs: List[Optional[Tensor]] = [None] * len(plan.layers)
    handles = []
    theta = objective.theta.detach().requires_grad_()
    rerouted: Dict[int, Any] = {}

    def keep(k: int, inp: Tuple[Any, ...], out: Tensor) -> None:
        if outputs[k] is not None:
            raise _shared_error(plan.layers[k].name, 2)
        inputs[k] = tuple(i.detach() if isinstance(i, Tensor) else i for i in inp)
        outputs[k] = out

    try:
        for k, (layer, mod) in enumerate(zip(plan.layers, plan.modules)):
            if layer.adapter.reroutes:  # recorded by the rerouting hook: the exposed projection's output
                rerouted[id(mod)] = lambda inp, target, k=k: keep(k, inp, target)
                continue

            def hook(_m: nn.Module, inp: Any, out: Tensor, k: int = k) -> None:
                keep(k, inp, out)

            handles.append(mod.register_forward_hook(hook))
        handles += _reroute_hooks(objective.module, rerouted)
        with torch.enable_grad():
            losses = (loss or objective.fisher_loss)(objective.space.unflatten(theta), batch)
    finally:
        for h in handles:
            h.remove()
    missing = [plan.layers[k].label for k, o in enumerate(outputs) if o is None]
    if missing:
        raise InfluenceConfigError(
            f"layer(s) {missing} were not called in this forward pass although they were in the first one; "
            "K-FAC/EK-FAC need every factored layer on every example. Use solver='lissa' or 'cg'."
        )
    grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)  # type: ignore[arg-type]
    result = []
    for layer, mod, x, out, g in zip(plan.layers, plan.modules, inputs, outputs, grads):
        assert x is not None and out is not None
        if g is None:
            g = torch.zeros_like(out)
        first = x[0] if x and isinstance(x[0], Tensor) else None
        if (layer.adapter.sequence_first and first is not None and first.shape[:1] != (n,) and first.dim() >= 2
                and first.shape[1] == n and out.dim() >= 2 and out.shape[1] == n):  # [T, B, ...]: batch first
            x = (first.movedim(1, 0),) + tuple(x[1:])
            first, out, g = x[0], out.movedim(1, 0), g.movedim(1, 0)
        if first is not None and first.shape[:1] != (n,) or out.shape[:1] != (n,):
            shape = tuple(first.shape) if first is not None else tuple(out.shape)
            raise InfluenceConfigError(
                f"layer {layer.label!r} got an input of shape {shape} whose leading dimension is not "
                f"the batch ({n}); K-FAC/EK-FAC need batch-first layer inputs."
            )
        g, a = layer.adapter.factors(mod, x, g.detach(), n)
        if layer.has_bias:
            a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        result.append((a, g))
    return result


def diagonal_grads(objective: Objective, plan: LayerPlan, batch: Any,
                   loss: Optional[Callable[[Any, Any], Tensor]] = None) -> Tensor:
    """Per-example Fisher gradients ``[B, D]`` (or of ``loss``) of the diagonally handled parameters only (the
    others held at their trained values), in the flat order of :attr:`LayerPlan.diagonal_index`."""
    per_example = loss or objective.fisher_loss
    full = objective.space.unflatten(objective.theta)
    names = plan.diagonal
    sub = ParamSpace(names, tuple(full[n].shape for n in names))
    fixed = {n: t for n, t in full.items() if n not in set(names)}

    def sub_loss(params: Any, b: Any) -> Tensor:
        return per_example({**fixed, **params}, b)

    return per_sample_grads(objective.differentiation, sub_loss, sub, sub.flatten(full), batch, randomness="different")


def per_example_blocks(a: Tensor, g: Tensor, max_elements: int = 1 << 24) -> Iterator[Tensor]:
    """``G_i = Σ_t g_{i,t} a_{i,t}ᵀ`` ``[b, out, in']`` for slices of the batch small enough that one slice
    holds at most about ``max_elements`` numbers."""
    per = max(1, g.shape[2] * a.shape[2])
    step = max(1, max_elements // per)
    for s in range(0, a.shape[0], step):
        yield torch.matmul(g[s : s + step].transpose(1, 2), a[s : s + step])
