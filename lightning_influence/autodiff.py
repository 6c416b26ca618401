"""How the derivatives are taken: strategies for Hessian-vector products and per-example gradients that
work on models whose kernels lack higher-order or vmap support, and a probe that picks one per problem.

:mod:`~lightning_influence.functional` differentiates one way: Hessian-vector products (HVPs) forward over
reverse, ``jvp(grad(f))`` vmapped over the right-hand sides, and per-example gradients with
``vmap(grad)``. Several common layers break one or both:

* ``nn.TransformerEncoder`` / ``nn.MultiheadAttention`` on a CPU: the fused flash SDPA kernel has neither a
  forward-mode derivative nor a double backward. The math backend has both.
* ``nn.LSTM`` on a CPU in float32 (mkldnn kernel) and every ``nn.RNN``/``GRU``/``LSTM`` on a GPU (cudnn
  kernels): no forward-mode derivative; reverse over reverse works, and so does everything with the
  backend disabled.
* ``nn.GRU``, ``nn.RNN`` (and ``nn.LSTM`` off mkldnn, e.g. in float64): ``vmap(grad)`` over examples fails
  on an in-place op (``output with shape [1, H] doesn't match the broadcast shape [B, 1, H]``),
  batch-first or not.
* ``nn.EmbeddingBag``: ``_embedding_bag`` has no forward-mode derivative and its backward no derivative.
* user code: a custom ``torch.autograd.Function`` without ``setup_context`` (torch.func refuses it), with a
  backward that is not itself differentiable, or with no backward at all.

The strategies (names recorded in results, see :class:`Differentiation`):

HVPs ``H_B v`` of the batch's mean loss ``f(θ) = (1/B) Σ_i L(z_i, θ)``:

* ``"forward_over_reverse"``: ``jvp(∇f, (θ,), (v,))``, vmapped over the rows ``v`` (one forward pass with
  tangents, one backward with tangents). Needs forward-mode derivatives of every op and of its backward.
* ``"reverse_over_reverse"``: ``vjp(∇f, θ)`` once, then the pullback ``v ↦ vᵀ∇²f = (∇²f) v`` (the Hessian
  is symmetric) vmapped over the rows. Needs the double backward of every op; no forward mode.
* ``"finite_difference"``: ``H v ≈ (∇f(θ + εv) − ∇f(θ − εv)) / (2ε)``, two ordinary gradients per row
  (eager ``torch.autograd``, a loop over the rows), so it works wherever a gradient does. The step is
  ``ε = c·u^{1/3}·max(‖θ‖, 1)/‖v‖`` (``u`` the dtype's unit round-off, ``c`` = :data:`FD_STEP_SCALE`
  = 0.3): the perturbation is ``c·u^{1/3}`` of the parameters' size, which balances the ``O(ε²)``
  truncation against the ``O(u/ε)`` round-off of a central difference. Measured largest relative row
  error against the exact HVP (random ``v``; ``benchmarks/bench_autodiff.py --fd-error``: 50k–130k-parameter
  MLP, GRU, LSTM and transformer classifiers, and the tiny models of ``tests/test_autodiff.py``):
  ``3e-11 … 5e-10`` in float64; ``1e-4 … 3e-4`` in float32, except on the transformer, ``0.2 … 0.9`` for
  every ``c`` from 0.1 to 10 (its float32 gradients are too noisy for any step). A step that crosses a
  kink (ReLU) is far off: ``c ≥ 1`` gave 3–5 on the float64 transformer, hence 0.3; the probe compares
  the steps ``ε`` and ``ε/2`` before trusting them.

Per-example gradients ``∇_θ L(z_i, θ)`` ``[B, P]``:

* ``"vmap"``: ``vmap(grad)`` over examples (:func:`functional.per_sample_grads`), one batched call.
* ``"jacobian"``: the forward once on a sub-batch of ``b`` examples (:attr:`Differentiation.jacobian_chunk`),
  ``ℓ, pullback = vjp(θ ↦ L(z_{1..b}, θ), θ)``, then the rows of the Jacobian ``∂ℓ/∂θ`` as
  ``vmap(pullback)(I_b)``: exact (example ``i``'s loss depends only on its own inputs), no vmap over the
  forward, but ``O(b²)`` backward work per sub-batch, hence small sub-batches.
* ``"loop"``: one eager ``torch.autograd.grad`` per example: the most general (it alone, with finite
  differences, accepts a custom Function without ``setup_context``).

Each strategy can run with the ordinary kernels or inside :func:`composite_kernels` (math SDPA, mkldnn
and cudnn off, ``embedding_bag`` rewritten from differentiable ops), which gives forward-mode and double
derivatives to all the layers above. :func:`probe` tries them on a few examples and picks one.

Relative cost per HVP (``benchmarks/bench_autodiff.py``: float32, CPU, one thread, batch 32, 16
right-hand sides vmapped together; the range over four runs on a shared machine; 1.0 = forward over
reverse with composite kernels):

* transformer (2 layers, width 64, 131k parameters): reverse over reverse, composite 0.69–0.86; finite
  differences (plain flash kernels) 0.69–0.93. Both exact strategies fail with plain kernels.
* LSTM (width 64, 98k parameters): reverse over reverse, composite 0.86–0.97, plain (mkldnn, whose
  double backward is slow) 1.34–1.56; finite differences, plain 0.62–0.90, composite 1.3–1.7. Forward
  over reverse fails with plain kernels.
* GRU (width 64, 90k parameters, three runs): every exact strategy and kernel choice 0.83–1.10 (equal
  within noise); finite differences 1.8–2.0.
* MLP (51k parameters): reverse over reverse 0.55–0.76; finite differences 1.9–2.4.

So on a CPU reverse over reverse is as fast as forward over reverse or faster (within noise on the
GRU), and finite differences cost 0.6–2.4 exact HVPs (two gradients) while being approximate. Per-example gradients, per example: where
``vmap`` works it is the fastest (transformer: the jacobian 3.3–3.8× and the loop 3.6–3.9× slower; MLP:
1.7–3× and 3.5–7×), except on the float32 LSTM, where the loop of mkldnn backward passes is as fast as
``vmap`` (the jacobian 1.4–1.5× slower); where it fails (GRU, RNN, LSTM off mkldnn) the jacobian on
sub-batches of 8 is 2.3–2.7× faster than the loop (sub-batches of 16 were 1.6× slower than 8 on the
transformer).
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from . import functional
from .errors import InfluenceConfigError
from .functional import ParamSpace, PerExampleLoss, batch_size_of, map_tensors, mean_loss

__all__ = [
    "Attempt",
    "DEFAULT_PLAN",
    "Differentiation",
    "FD_STEP_SCALE",
    "GRAD_STRATEGIES",
    "HVP_STRATEGIES",
    "ProbeReport",
    "RandomLossError",
    "UnsupportedModelError",
    "batch_hvp",
    "composite_embedding_bag",
    "composite_kernels",
    "finite_difference_steps",
    "kernels",
    "per_sample_grads",
    "probe",
]

#: HVP strategies, in the probe's order of preference
HVP_STRATEGIES: Tuple[str, ...] = ("forward_over_reverse", "reverse_over_reverse", "finite_difference")
#: per-example gradient strategies, in the probe's order of preference
GRAD_STRATEGIES: Tuple[str, ...] = ("vmap", "jacobian", "loop")
#: the finite-difference step, as ``c`` in ``ε = c·u^{1/3}·max(‖θ‖, 1)/‖v‖``
FD_STEP_SCALE = 0.3


class UnsupportedModelError(InfluenceConfigError):
    """No strategy can differentiate the model as influence functions need. The message names the failing op
    and, when it was found, the layer, and says which computation still works."""


class RandomLossError(InfluenceConfigError):
    """The loss draws random numbers where it must be deterministic (``randomness="error"``)."""


# ----------------------------------------------------------------------------------------------------------
# composite kernels


def _bag_bounds(offsets: Tensor, n: int, include_last_offset: bool) -> Tuple[Tensor, Tensor]:
    """``(starts, ends)`` of each bag of a flat input of ``n`` indices, as ``F.embedding_bag`` reads
    ``offsets``: the last bag runs to the end of the input; with ``include_last_offset`` the extra last
    offset (meant to be ``n``) only ends the list, as on a CPU, where a smaller value is ignored."""
    offsets = offsets.long()
    if include_last_offset:
        offsets = offsets[:-1]
    return offsets, torch.cat([offsets[1:], offsets.new_full((1,), n)])


def _reduce_bags(rows: Tensor, member: Tensor, weights: Optional[Tensor], mode: str) -> Tensor:
    """Reduce embedding rows over bags. ``rows [..., n, D]``, ``member [..., bags, n]`` (bool: row ``j`` is
    in bag ``b`` and is not padding), ``weights [..., n]`` (``mode="sum"`` only).

    ``sum``: ``Σ_j m_bj w_j e_j``; ``mean``: ``Σ_j m_bj e_j / max(Σ_j m_bj, 1)``; ``max``: the elementwise
    maximum over the members. An empty bag gives zeros, as in ``F.embedding_bag``."""
    if mode == "max":
        masked = torch.where(member.unsqueeze(-1), rows.unsqueeze(-3), rows.new_tensor(float("-inf")))
        top = masked.amax(dim=-2)
        return torch.where(member.any(dim=-1, keepdim=True), top, torch.zeros_like(top))
    m = member.to(rows.dtype)
    if weights is not None:
        m = m * weights.to(rows.dtype).unsqueeze(-2)
    out = torch.matmul(m, rows)
    if mode == "mean":
        out = out / member.sum(dim=-1, keepdim=True).clamp(min=1).to(rows.dtype)
    return out


def composite_embedding_bag(
    input: Tensor,
    weight: Tensor,
    offsets: Optional[Tensor] = None,
    max_norm: Optional[float] = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    per_sample_weights: Optional[Tensor] = None,
    include_last_offset: bool = False,
    padding_idx: Optional[int] = None,
) -> Tensor:
    """``F.embedding_bag`` from differentiable ops: ``F.embedding``, a mask of bag membership and a
    ``sum``/``mean``/``max`` over it. Same arguments and values; its derivatives of every order exist in
    forward and reverse mode and under ``vmap``.

    For bag ``b`` with members ``J_b`` (the indices between its offsets, or row ``b`` of a 2-D input,
    without those equal to ``padding_idx``) and ``e_j = weight[input[j]]``:
    ``sum = Σ_{j∈J_b} w_j e_j`` (``w`` the ``per_sample_weights``, else 1), ``mean = Σ_{j∈J_b} e_j / |J_b|``,
    ``max = max_{j∈J_b} e_j`` elementwise; an empty bag is zero. A 2-D input ``[B, N]`` reduces over its
    rows directly (``O(B·N·D)``); a 1-D input with offsets builds a ``[bags, n]`` membership matrix
    (``O(bags·n)`` extra, ``O(bags·n·D)`` for ``max``).

    ``sparse`` is ignored (gradients are dense, with the same values). ``max_norm`` (which renormalises
    ``weight`` in place) and ``scale_grad_by_freq`` (which rescales the backward) are not rewritten: the
    native op runs, so the derivatives it lacks stay missing.
    """
    if max_norm is not None or scale_grad_by_freq or getattr(input, "is_nested", False):
        return F.embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
                               per_sample_weights, include_last_offset, padding_idx)
    if mode not in ("sum", "mean", "max"):
        raise ValueError("mode has to be one of sum, mean or max")
    if per_sample_weights is not None and mode != "sum":
        raise NotImplementedError(f"embedding_bag: per_sample_weights is only supported for mode='sum' "
                                  f"(got mode='{mode}')")
    if per_sample_weights is not None and per_sample_weights.shape != input.shape:
        raise ValueError(f"embedding_bag: per_sample_weights {tuple(per_sample_weights.shape)} must have the input's "
                         f"shape {tuple(input.shape)}")
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    keep = None if padding_idx is None else input != padding_idx
    rows = F.embedding(input, weight)
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("if input is 2D, then offsets has to be None")
        member = torch.ones_like(input, dtype=torch.bool) if keep is None else keep
        return _reduce_bags(rows, member.unsqueeze(-2), per_sample_weights, mode).squeeze(-2)
    if input.dim() != 1 or offsets is None or offsets.dim() != 1:
        raise ValueError("embedding_bag: input must be 2-D, or 1-D with 1-D offsets")
    n = input.shape[0]
    starts, ends = _bag_bounds(offsets, n, include_last_offset)
    j = torch.arange(n, device=input.device)
    member = (j >= starts.unsqueeze(-1)) & (j < ends.unsqueeze(-1))
    if keep is not None:
        member = member & keep
    return _reduce_bags(rows, member, per_sample_weights, mode)


class _CompositeOps(TorchFunctionMode):
    """Routes ``F.embedding_bag`` (what ``nn.EmbeddingBag`` calls) to :func:`composite_embedding_bag`."""

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        if func is F.embedding_bag:
            return composite_embedding_bag(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _backend_flag(module: Any, value: bool) -> Iterator[None]:
    """Set ``module.enabled`` (``torch.backends.mkldnn``/``cudnn``) for the block, and restore it."""
    before = bool(module.enabled)
    module.enabled = value
    try:
        yield
    finally:
        module.enabled = before


@contextlib.contextmanager
def _mha_fastpath(value: bool) -> Iterator[None]:
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):  # pragma: no cover - old torch
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(value)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


@contextlib.contextmanager
def composite_kernels(embedding_bag: bool = True) -> Iterator[None]:
    """Run the block with kernels whose derivatives of every order exist in forward and reverse mode.

    * scaled dot-product attention on its math backend (``sdpa_kernel([SDPBackend.MATH])``), instead of
      the fused flash/efficient kernels;
    * mkldnn and cudnn disabled (``torch.backends.mkldnn.enabled``, ``torch.backends.cudnn.enabled``:
      the native RNN kernels instead of ``mkldnn_rnn_layer``/cudnn's), and the fused
      ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` inference fast path off;
    * when ``embedding_bag``: ``F.embedding_bag`` (``nn.EmbeddingBag``) replaced by
      :func:`composite_embedding_bag` through a :class:`~torch.overrides.TorchFunctionMode` (which adds a
      Python call to every torch function in the block: pass ``False`` when the model has no
      ``EmbeddingBag``).

    The user's model is not modified; every flag is restored on exit, also after an exception. The flags
    are process-global: another thread running in the meantime sees them too. Threads entering it
    concurrently (the ranks of an in-process group, say) share one setting: the first to enter saves the
    flags and the last to leave restores them, so that overlapping blocks never restore each other's
    values (with per-block save and restore, two overlapping blocks left mkldnn off for the rest of the
    process). Works under ``vmap``, ``jvp`` and ``grad`` (enter it outside or inside the transforms).
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(_GLOBAL_FLAGS)
        if embedding_bag:
            stack.enter_context(_CompositeOps())  # a TorchFunctionMode: per thread
        yield


class _SharedFlags:
    """The process-global part of :func:`composite_kernels`, reference-counted across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._stack: Optional[contextlib.ExitStack] = None

    def __enter__(self) -> None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with self._lock:
            if self._depth == 0:
                stack = contextlib.ExitStack()
                try:
                    stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
                    stack.enter_context(_backend_flag(torch.backends.mkldnn, False))
                    stack.enter_context(_backend_flag(torch.backends.cudnn, False))
                    stack.enter_context(_mha_fastpath(False))
                except BaseException:
                    stack.close()
                    raise
                self._stack = stack
            self._depth += 1

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._stack is not None:
                stack, self._stack = self._stack, None
                stack.close()


_GLOBAL_FLAGS = _SharedFlags()


def kernels(composite: bool, embedding_bag: bool = True) -> "contextlib.AbstractContextManager[None]":
    """``composite_kernels(embedding_bag)`` when ``composite``, else a context that changes nothing."""
    return composite_kernels(embedding_bag) if composite else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class Differentiation:
    """How to take the derivatives of one problem. Chosen by :func:`probe`; recorded in results.

    Attributes:
        hvp: the HVP strategy, one of :data:`HVP_STRATEGIES`, or ``None`` when HVPs were not probed (a
            solver that needs none); :func:`batch_hvp` then refuses.
        grads: the per-example gradient strategy, one of :data:`GRAD_STRATEGIES`.
        hvp_composite: run HVPs inside :func:`composite_kernels`.
        grads_composite: run per-example gradients inside :func:`composite_kernels`. (The two differ on
            e.g. an LSTM on a CPU: forward-mode HVPs need mkldnn off, while ``vmap`` over examples needs it
            on.)
        jacobian_chunk: examples per ``vjp`` of the ``"jacobian"`` strategy (``O(b²)`` backward work per
            sub-batch of ``b``).
        embedding_bag: composite kernels rewrite ``F.embedding_bag`` (:func:`probe` sets it only when the
            loss calls it: the rewrite's TorchFunctionMode costs a Python call per torch function, measured
            10–25 % of an HVP on small models).
    """

    hvp: Optional[str] = "forward_over_reverse"
    grads: str = "vmap"
    hvp_composite: bool = False
    grads_composite: bool = False
    jacobian_chunk: int = 8
    embedding_bag: bool = True

    def __post_init__(self) -> None:
        if self.hvp is not None and self.hvp not in HVP_STRATEGIES:
            raise InfluenceConfigError(f"Differentiation(hvp={self.hvp!r}) is not an HVP strategy; use one of "
                                       f"{list(HVP_STRATEGIES)} (or None for no HVPs).")
        if self.grads not in GRAD_STRATEGIES:
            raise InfluenceConfigError(f"Differentiation(grads={self.grads!r}) is not a per-example gradient "
                                       f"strategy; use one of {list(GRAD_STRATEGIES)}.")
        if isinstance(self.jacobian_chunk, bool) or not isinstance(self.jacobian_chunk, int) or self.jacobian_chunk < 1:
            raise InfluenceConfigError(f"Differentiation(jacobian_chunk={self.jacobian_chunk!r}) must be a positive "
                                       "integer (examples per vjp; 8–16 is a good range).")

    @property
    def exact(self) -> bool:
        """Whether the HVPs are exact (not finite differences)."""
        return self.hvp != "finite_difference"

    def as_dict(self) -> Dict[str, Any]:
        """The plan as plain values, for a results file."""
        return {"hvp": self.hvp, "grads": self.grads, "hvp_composite": self.hvp_composite,
                "grads_composite": self.grads_composite, "jacobian_chunk": self.jacobian_chunk,
                "embedding_bag": self.embedding_bag}

    def __str__(self) -> str:
        hvp = "none" if self.hvp is None else f"{self.hvp} ({_kind(self.hvp_composite)} kernels)"
        return f"hvp={hvp}, grads={self.grads} ({_kind(self.grads_composite)} kernels)"


#: what :mod:`functional` does: forward over reverse and ``vmap(grad)``, ordinary kernels
DEFAULT_PLAN = Differentiation()


def _kind(composite: bool) -> str:
    return "composite" if composite else "plain"


# ----------------------------------------------------------------------------------------------------------
# HVPs


def finite_difference_steps(theta: Tensor, vectors: Tensor, scale: float = FD_STEP_SCALE) -> Tensor:
    """Central-difference steps ``ε_q = c·u^{1/3}·max(‖θ‖, 1)/‖v_q‖`` ``[Q]`` (``u`` the unit round-off of
    ``theta``'s dtype, ``c = scale``); a zero row gets step 1 (its difference is exactly zero)."""
    u = torch.finfo(theta.dtype).eps
    norms = vectors.norm(dim=1)
    size = max(float(theta.norm()), 1.0)
    steps = scale * u ** (1.0 / 3.0) * size / norms.clamp(min=torch.finfo(theta.dtype).tiny)
    return torch.where(norms > 0, steps, torch.ones_like(steps))


def _eager_grad(loss: PerExampleLoss, space: ParamSpace, theta: Tensor, batch: Any, reduce: str) -> Tensor:
    """``∇_θ`` of the batch's summed or mean loss with eager ``torch.autograd`` (no torch.func), ``[P]``."""
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        values = loss(space.unflatten(t), batch)
        total = values.sum() if reduce == "sum" else values.mean()
        (g,) = torch.autograd.grad(total, t, allow_unused=True)
    return torch.zeros_like(theta) if g is None else g


def _hvp_forward_over_reverse(loss: PerExampleLoss, space: ParamSpace, theta: Tensor, batch: Any, vectors: Tensor,
                              chunk_size: Optional[int]) -> Tensor:
    return functional.batch_hvp(loss, space, theta, batch, vectors, chunk_size)


def _hvp_reverse_over_reverse(loss: PerExampleLoss, space: ParamSpace, theta: Tensor, batch: Any, vectors: Tensor,
                              chunk_size: Optional[int]) -> Tensor:
    """``(∇²f) v = (vᵀ∇²f)ᵀ``: one ``vjp`` of ``∇f`` (the gradient's graph, built once), its pullback
    vmapped over the rows."""
    _, pullback = vjp(grad(mean_loss(loss, space, batch)), theta)
    return vmap(lambda v: pullback(v)[0], chunk_size=chunk_size)(vectors)


def _hvp_finite_difference(loss: PerExampleLoss, space: ParamSpace, theta: Tensor, batch: Any, vectors: Tensor,
                           chunk_size: Optional[int], scale: float = FD_STEP_SCALE) -> Tensor:
    """``(∇f(θ + ε_q v_q) − ∇f(θ − ε_q v_q)) / (2ε_q)`` per row with eager gradients (``chunk_size``
    unused)."""
    steps = finite_difference_steps(theta, vectors, scale)
    rows = []
    for v, eps in zip(vectors, steps.tolist()):
        up = _eager_grad(loss, space, theta + eps * v, batch, "mean")
        down = _eager_grad(loss, space, theta - eps * v, batch, "mean")
        rows.append((up - down) / (2 * eps))
    return torch.stack(rows) if rows else torch.zeros_like(vectors)


_HVPS: Dict[str, Callable[..., Tensor]] = {
    "forward_over_reverse": _hvp_forward_over_reverse,
    "reverse_over_reverse": _hvp_reverse_over_reverse,
    "finite_difference": _hvp_finite_difference,
}


def batch_hvp(
    plan: Differentiation,
    loss: PerExampleLoss,
    space: ParamSpace,
    theta: Tensor,
    batch: Any,
    vectors: Tensor,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Hessian-vector products of the batch's mean loss, ``H_B v`` for every row ``v`` of ``vectors``, by
    ``plan.hvp`` (the contract of :func:`functional.batch_hvp`).

    Args:
        plan: the strategy (:func:`probe`).
        loss: per-example loss ``loss(params, batch) -> Tensor[B]``; deterministic.
        space: the flat parameter layout.
        theta: parameters ``[P]`` at which the Hessian is taken.
        batch: the examples whose mean loss is differentiated.
        vectors: right-hand sides ``[Q, P]``.
        chunk_size: rows vmapped together (``None``: all); the finite-difference strategy loops over rows.

    Returns:
        ``[Q, P]``, row ``q`` equal to ``∇²(1/B Σ_i L(z_i, θ)) v_q`` (approximately, for finite differences).

    Raises:
        InfluenceConfigError: if the plan has no HVP strategy (``plan.hvp is None``).
    """
    if plan.hvp is None:
        raise InfluenceConfigError("Differentiation(hvp=None) was probed without HVPs (probe(need_hvp=False)); "
                                   "probe again with need_hvp=True before computing Hessian-vector products.")
    with kernels(plan.hvp_composite, plan.embedding_bag):
        return _HVPS[plan.hvp](loss, space, theta, batch, vectors, chunk_size)


# ----------------------------------------------------------------------------------------------------------
# per-example gradients


def _slice(batch: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a batch (every tensor leaf sliced along dim 0)."""
    return map_tensors(batch, lambda t: t[start:stop])


def _rng_states(device: torch.device) -> List[Tensor]:
    """The global generators a loss on ``device`` can draw from: the CPU's, and the device's own."""
    states = [torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_rng_states(device: torch.device, states: Sequence[Tensor]) -> None:
    torch.random.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


def _same_states(a: Sequence[Tensor], b: Sequence[Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _random_loss_error(strategy: str) -> RandomLossError:
    return RandomLossError(
        f"the loss draws random numbers (dropout or another random layer in train mode, or sampled labels) "
        f"but per_sample_grads(randomness='error') with grads={strategy!r} needs a deterministic loss. Put the "
        "model in eval mode, or pass randomness='different' for a loss that samples on purpose."
    )


def _grads_vmap(loss: PerExampleLoss, space: ParamSpace, theta: Tensor, batch: Any, randomness: str,
                chunk: int) -> Tensor:
    return functional.per_sample_grads(loss, space, theta, batch, randomness=randomness)


def _grads_jacobian(loss: PerExampleLoss, space: ParamSpace, theta: Tensor, batch: Any, randomness: str,
                    chunk: int) -> Tensor:
    """Rows of ``∂ℓ/∂θ`` for sub-batches of ``chunk`` examples: ``vmap(pullback)(I_b)`` after one ``vjp``."""
    if randomness == "same":
        raise InfluenceConfigError("per_sample_grads(randomness='same') is not possible with grads='jacobian' (one "
                                   "forward pass draws for every example of a sub-batch); use grads='loop' or 'vmap'.")
    n = batch_size_of(batch)
    before = _rng_states(theta.device) if randomness == "error" else None
    out = []
    for start in range(0, n, chunk):
        sub = _slice(batch, start, min(start + chunk, n))
        values, pullback = vjp(lambda t: loss(space.unflatten(t), sub), theta)
        eye = torch.eye(values.shape[0], dtype=values.dtype, device=values.device)
        out.append(vmap(lambda e: pullback(e)[0])(eye))
    if before is not None and not _same_states(before, _rng_states(theta.device)):
        raise _random_loss_error("jacobian")
    return torch.cat(out)


def _grads_loop(loss: PerExampleLoss, space: ParamSpace, theta: Tensor, batch: Any, randomness: str,
                chunk: int) -> Tensor:
    """One eager ``torch.autograd.grad`` per example (a batch of one each)."""
    n = batch_size_of(batch)
    start_states = _rng_states(theta.device)
    rows = []
    for i in range(n):
        if randomness == "same":
            _set_rng_states(theta.device, start_states)
        rows.append(_eager_grad(loss, space, theta, _slice(batch, i, i + 1), "sum"))
    if randomness == "error" and not _same_states(start_states, _rng_states(theta.device)):
        raise _random_loss_error("loop")
    return torch.stack(rows)


_GRADS: Dict[str, Callable[..., Tensor]] = {"vmap": _grads_vmap, "jacobian": _grads_jacobian, "loop": _grads_loop}


def per_sample_grads(
    plan: Differentiation,
    loss: PerExampleLoss,
    space: ParamSpace,
    theta: Tensor,
    batch: Any,
    randomness: str = "error",
) -> Tensor:
    """Gradients of each example's loss, ``∇_θ L(z_i, θ)``, as ``[B, P]``, by ``plan.grads`` (the contract of
    :func:`functional.per_sample_grads`: the model sees each example as a batch of one, or a sub-batch of
    ``plan.jacobian_chunk`` for ``"jacobian"``, so batch-dependent layers must be in eval mode).

    ``randomness`` follows ``vmap``'s meaning under every strategy:

    * ``"error"``: the loss must not draw random numbers. ``"vmap"`` raises as ``vmap`` does; ``"jacobian"``
      and ``"loop"`` compare the global generators (CPU, and the device's) before and after and raise
      :class:`RandomLossError` if they moved (a draw from a private ``torch.Generator`` is not seen).
    * ``"different"``: independent draws per example. ``"jacobian"`` and ``"loop"`` run the loss as ordinary
      batched calls, which draw independently per example by themselves.
    * ``"same"``: one draw shared by every example. ``"loop"`` restores the generators before each example;
      ``"jacobian"`` cannot and raises :class:`InfluenceConfigError`.
    """
    if randomness not in ("error", "different", "same"):
        raise InfluenceConfigError(f"randomness={randomness!r} must be 'error', 'different' or 'same' (vmap's).")
    with kernels(plan.grads_composite, plan.embedding_bag):
        return _GRADS[plan.grads](loss, space, theta, batch, randomness, plan.jacobian_chunk)


# ----------------------------------------------------------------------------------------------------------
# finding what failed


class _ModuleTracker:
    """The modules executing right now, from global forward (pre-)hooks, while the block runs.

    When an exception escapes a module's forward its post-hook does not run, so after a failed call
    :attr:`stack` still holds the modules the exception came through, innermost last. :attr:`roots` are the
    modules called with nothing else executing (the model, for naming the others).
    """

    def __init__(self) -> None:
        self.stack: List[nn.Module] = []
        self.roots: List[nn.Module] = []
        self._handles: List[Any] = []

    def __enter__(self) -> "_ModuleTracker":
        self._handles = [nn.modules.module.register_module_forward_pre_hook(self._enter_module),
                         nn.modules.module.register_module_forward_hook(self._leave_module)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _enter_module(self, module: nn.Module, args: Any) -> None:
        if not self.stack and all(module is not r for r in self.roots):
            self.roots.append(module)
        self.stack.append(module)

    def _leave_module(self, module: nn.Module, args: Any, output: Any) -> None:
        while self.stack:
            if self.stack.pop() is module:
                break

    def describe(self, module: nn.Module) -> str:
        """``"`name` (Type)"``, the name as in the outermost module's ``named_modules()``."""
        for root in self.roots:
            for name, m in root.named_modules(remove_duplicate=False):
                if m is module:
                    return f"`{name}` ({type(module).__name__})" if name else f"the model ({type(module).__name__})"
        return f"a {type(module).__name__}"


class _OpRecorder(TorchDispatchMode):
    """Notes, for every aten op, the innermost module that first ran it."""

    def __init__(self, tracker: _ModuleTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.where: Dict[str, nn.Module] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        name = _base_op_name(str(func._schema.name))
        if name not in self.where and self.tracker.stack:
            self.where[name] = self.tracker.stack[-1]
        return func(*args, **(kwargs or {}))


class _FunctionRecorder(TorchFunctionMode):
    """Notes, for every custom ``autograd.Function`` applied under a torch.func transform, the innermost
    module that applied it (torch.func routes them through ``custom_function_call``)."""

    def __init__(self, tracker: _ModuleTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.where: Dict[type, nn.Module] = {}

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", None) == "custom_function_call" and args and isinstance(args[0], type):
            if args[0] not in self.where and self.tracker.stack:
                self.where[args[0]] = self.tracker.stack[-1]
        return func(*args, **(kwargs or {}))


_OP_PATTERNS = (
    re.compile(r"forward AD with (\w+)"),
    re.compile(r"derivative for (?:aten::)?'?([\w.]+)'? is not implemented"),
    re.compile(r"[Bb]atching rule not implemented for (?:aten::)?([\w.]+)"),
    re.compile(r"tried to vmap over (\w+)"),
)


def _base_op_name(name: str) -> str:
    """``aten::_foo.default`` → ``_foo``."""
    return name.split("::")[-1].split(".")[0]


def _op_from_message(message: str) -> Optional[str]:
    for pattern in _OP_PATTERNS:
        found = pattern.search(message)
        if found:
            return _base_op_name(found.group(1))
    return None


def _custom_function(exc: BaseException) -> Optional[type]:
    """The user's ``autograd.Function`` subclass the exception was raised in, from its traceback (the
    innermost frame that names one: ``Function.apply``'s ``cls``, torch.func's ``autograd_function``, a
    backward node's ``_forward_cls``)."""
    found: Optional[type] = None
    tb = exc.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals
        candidates = [local.get("autograd_function"), local.get("cls")]
        for key in ("ctx", "self"):
            try:
                candidates.append(getattr(local.get(key), "_forward_cls", None))
            except Exception:  # noqa: BLE001 - an object whose attribute lookup fails names nothing
                pass
        for c in candidates:
            if isinstance(c, type) and issubclass(c, torch.autograd.Function) and not c.__name__.endswith("Generated"):
                found = c
                break
        tb = tb.tb_next
    return found


@dataclass
class _Failure:
    """What an exception says and where it came from."""

    error: str
    op: Optional[str] = None
    layer: Optional[str] = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class _Recording:
    """A forward pass with every aten op and custom ``autograd.Function`` noted against the innermost module
    that ran it; ``failed``: the forward itself raised (``tracker.stack`` then holds where)."""

    tracker: _ModuleTracker
    ops: Dict[str, nn.Module]
    functions: Dict[type, nn.Module]
    failed: bool


class _Diagnosis:
    """Explains exceptions: the op (from the message, or the custom ``autograd.Function`` from the
    traceback) and the layer (the modules still executing when it was raised, or for a failure in a
    backward pass, a recorded forward that shows which module ran the op)."""

    def __init__(self, loss: PerExampleLoss, space: ParamSpace, theta: Tensor, batch: Any) -> None:
        self.args = (loss, space, theta, batch)
        self._recordings: Dict[bool, _Recording] = {}

    def _record(self, composite: bool) -> _Recording:
        """One forward under ``vjp`` (so that torch.func shows custom Functions), once per kernel choice."""
        if composite not in self._recordings:
            loss, space, theta, batch = self.args
            tracker = _ModuleTracker()
            ops, fns = _OpRecorder(tracker), _FunctionRecorder(tracker)
            failed = False
            try:
                with kernels(composite), tracker, fns, ops:
                    vjp(lambda t: loss(space.unflatten(t), batch).sum(), theta)
            except Exception:  # noqa: BLE001 - a failed diagnosis still names what it can
                failed = True
            self._recordings[composite] = _Recording(tracker, ops.where, fns.where, failed)
        return self._recordings[composite]

    def explain(self, exc: BaseException, tracker: _ModuleTracker, composite: bool) -> _Failure:
        """``exc`` raised by a call made under ``tracker`` (with composite kernels or not)."""
        function = _custom_function(exc)
        op = _op_from_message(str(exc))
        if function is not None and (op is None or op == function.__name__):
            op = f"{function.__module__}.{function.__qualname__}"
        if tracker.stack:  # raised in a forward: the modules it came through are still on the stack
            return _Failure(_first_line(exc), op, tracker.describe(tracker.stack[-1]))
        layer = None
        if op is not None:  # raised in a backward: which module ran the op?
            rec = self._record(composite)
            module = rec.functions.get(function) if function is not None else None
            if module is None:
                base = _base_op_name(op)
                forward = base[: -len("_backward")] if base.endswith("_backward") else base
                module = rec.ops.get(base) or rec.ops.get(forward)
            if module is not None:
                layer = rec.tracker.describe(module)
            elif rec.failed and rec.tracker.stack:
                layer = rec.tracker.describe(rec.tracker.stack[-1])
        return _Failure(_first_line(exc), op, layer)


# ----------------------------------------------------------------------------------------------------------
# the probe


@dataclass(frozen=True)
class Attempt:
    """One strategy as :func:`probe` tried it.

    Attributes:
        path: ``"grads"`` or ``"hvp"``.
        strategy: the strategy's name.
        composite: whether it ran inside :func:`composite_kernels`.
        status: ``"ok"`` (it ran and agreed), ``"unverified"`` (it ran, nothing trustworthy to compare it
            to), ``"raised"`` or ``"wrong"`` (it disagreed with the reference).
        seconds: the best of three timed calls (after a warm one) on the timing batch, for those that ran
            (finite differences only when no exact HVP works; nothing with ``select="first"``).
        error: the exception's type and first line, for ``"raised"``.
        op: the op (aten op or custom ``autograd.Function``) the exception names, when it names one.
        layer: the layer it was raised in, as ``"`name` (Type)"``, when found.
        rel_error: the largest relative row error ``‖a_i − r_i‖ / ‖r_i‖`` against ``reference``.
        reference: what it was compared to.
        fallback: the ops ``vmap`` ran one example (or tangent) at a time for want of a batching rule
            (torch's "performance drop" warning in its timed calls), comma-separated; ``None`` when none.
    """

    path: str
    strategy: str
    composite: bool
    status: str
    seconds: Optional[float] = None
    error: Optional[str] = None
    op: Optional[str] = None
    layer: Optional[str] = None
    rel_error: Optional[float] = None
    reference: Optional[str] = None
    fallback: Optional[str] = None

    @property
    def label(self) -> str:
        return f"{self.strategy} ({_kind(self.composite)} kernels)"

    @property
    def works(self) -> bool:
        return self.status in ("ok", "unverified")

    def line(self) -> str:
        """One human-readable line."""
        if self.status == "raised":
            where = "".join([f"; op `{self.op}`" if self.op else "", f" in {self.layer}" if self.layer else ""])
            return f"{self.label}: failed{where}: {self.error}"
        cmp = f" vs {self.reference}: rel. error {self.rel_error:.1e}" if self.rel_error is not None else ""
        if self.status == "wrong":
            return f"{self.label}: rejected, disagrees{cmp}"
        timing = f"{self.seconds * 1e3:.2f} ms" if self.seconds is not None else "untimed"
        slow = f"; vmap loops over examples for {self.fallback} (no batching rule)" if self.fallback else ""
        return f"{self.label}: {timing}{cmp}{slow}" + (" (unverified)" if self.status == "unverified" else "")


@dataclass(frozen=True)
class ProbeReport:
    """What :func:`probe` tried and why it chose :attr:`plan`. ``str(report)`` is a readable summary."""

    plan: Differentiation
    attempts: Tuple[Attempt, ...]
    notes: Tuple[str, ...] = field(default=())

    def for_path(self, path: str) -> Tuple[Attempt, ...]:
        return tuple(a for a in self.attempts if a.path == path)

    def rejected(self) -> Tuple[Attempt, ...]:
        """The attempts that raised or disagreed."""
        return tuple(a for a in self.attempts if not a.works)

    def __str__(self) -> str:
        lines = [f"differentiation plan: {self.plan}"]
        for path, title in (("grads", "per-example gradients"), ("hvp", "Hessian-vector products")):
            attempts = self.for_path(path)
            if attempts:
                lines.append(f"{title}:")
                lines.extend(f"  {a.line()}" for a in attempts)
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _relative_error(a: Tensor, ref: Tensor) -> float:
    """``max_i ‖a_i − r_i‖ / max(‖r_i‖, 1e-3·max_j ‖r_j‖)``: rows much smaller than the largest are
    judged on the largest's scale (their round-off is not an error)."""
    a, ref = a.reshape(a.shape[0], -1).double(), ref.reshape(ref.shape[0], -1).double()
    norms = ref.norm(dim=1)
    floor = max(float(norms.max()) * 1e-3, torch.finfo(torch.float64).tiny) if norms.numel() else 1.0
    err = ((a - ref).norm(dim=1) / norms.clamp(min=floor)).max()
    return float(err) if torch.isfinite(err) else float("inf")


def _agreement_tol(dtype: torch.dtype) -> float:
    """Two exact computations of the same derivative agree to ``10·√u`` (``u`` the unit round-off):
    ``1.5e-7`` in float64, ``3.5e-3`` in float32; a wrong one is off by ``O(1)``."""
    return 10.0 * math.sqrt(torch.finfo(dtype).eps)


#: finite differences at steps ε and ε/2 must agree to this (float64 / float32) to referee exact HVPs; measured
#: 1e-10 / 1e-4 on smooth models, O(1) where a step crosses a kink or float32 round-off dominates
_FD_SPREAD_FLOAT64 = 1e-5
_FD_SPREAD_FLOAT32 = 1e-1
#: a strategy this fraction slower than the fastest still wins if it comes first (timing noise)
_PREFERENCE_MARGIN = 0.1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_FALLBACK = re.compile(r"batching rule for (\S+?)\.? Please")


def _vmap_fallbacks(caught: Sequence[warnings.WarningMessage]) -> Optional[str]:
    """The ops of torch's vmap fallback warnings ("There is a performance drop because we have not yet
    implemented the batching rule for aten::…"), comma-separated in order of first appearance."""
    ops: List[str] = []
    for w in caught:
        m = _FALLBACK.search(str(w.message))
        if m and m.group(1) not in ops:
            ops.append(m.group(1))
    return ", ".join(ops) or None


def _timed(fn: Callable[[], Tensor], device: torch.device, repeats: int = 3) -> float:
    """The best of ``repeats`` timed calls (after the caller's warm one)."""
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _tile(batch: Any, n: int) -> Any:
    """A batch of ``n`` examples made of the batch's examples repeated (every tensor leaf indexed along
    dim 0), for timing at a size where batched strategies show their cost."""
    size = batch_size_of(batch)
    index = torch.arange(n) % size
    return map_tensors(batch, lambda t: t[index.to(t.device)])


Outcome = Tuple[Optional[Tensor], Optional[_Failure]]


def _run(fn: Callable[[], Tensor], diagnosis: _Diagnosis, composite: bool) -> Outcome:
    """Call ``fn`` with its modules tracked; the result, or what went wrong."""
    tracker = _ModuleTracker()
    try:
        with tracker:
            out = fn()
        if not torch.isfinite(out).all():
            return None, _Failure("non-finite values (NaN/inf) in the result")
        return out.detach(), None
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none is fatal here
        return None, diagnosis.explain(exc, tracker, composite)


def _choose(attempts: Sequence[Attempt], select: str) -> Optional[Attempt]:
    """``select="first"``: the first working attempt. ``"fastest"``: the first (in priority order) whose time is
    within :data:`_PREFERENCE_MARGIN` of the fastest's, so that timing noise does not decide between equals.
    An attempt whose ``vmap`` fell back to a per-example loop (:attr:`Attempt.fallback`) is left out when the
    same strategy works without one (with the other kernels): the probe times a few examples, where such a
    loop costs little, but its cost grows with the batch (on a 109k-parameter transformer, CPU flash
    attention's fallback: 18 against 21 ms on 16 examples, 576 against 385 ms on 256)."""
    working = [a for a in attempts if a.works]
    if select == "first" or not working:
        return working[0] if working else None
    batched = {a.strategy for a in working if not a.fallback}
    working = [a for a in working if not (a.fallback and a.strategy in batched)]
    times = [a.seconds for a in working if a.seconds is not None]
    if not times:
        return working[0]
    fastest = min(times)
    return next(a for a in working if a.seconds is not None and a.seconds <= fastest * (1.0 + _PREFERENCE_MARGIN))


class _CallRecorder(TorchFunctionMode):
    """Notes whether ``F.embedding_bag`` was called."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding_bag = False

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        if func is F.embedding_bag:
            self.embedding_bag = True
        return func(*args, **(kwargs or {}))


def _first_look(loss: PerExampleLoss, space: ParamSpace, theta: Tensor, batch: Any) -> bool:
    """One forward: refuse a random loss; whether it calls ``F.embedding_bag``."""
    before = _rng_states(theta.device)
    with torch.no_grad(), _CallRecorder() as calls:
        loss(space.unflatten(theta), batch)
    if not _same_states(before, _rng_states(theta.device)):
        raise RandomLossError(
            "the loss draws random numbers (dropout or another random layer in train mode?), so its derivatives "
            "differ between calls and no strategy can be checked. Put the model in eval mode and probe the "
            "deterministic training loss."
        )
    return calls.embedding_bag


@dataclass
class _Probe:
    """What every trial shares: the problem, the batches and the plan the trials vary."""

    loss: PerExampleLoss
    space: ParamSpace
    theta: Tensor
    batch: Any
    timing_batch: Any
    diagnosis: _Diagnosis
    template: Differentiation
    select: str

    def attempt(self, path: str, key: Tuple[str, bool], status: str, call: Callable[[Differentiation, Any], Tensor],
                err: Optional[float] = None, ref: Optional[str] = None, time_it: bool = True) -> Attempt:
        """An attempt that ran, timed (``select="fastest"`` and ``time_it``) unless it is wrong, on the timing
        batch (the probe batch if that fails)."""
        plan = self.plan(path, key)
        seconds, fallback = None, None
        if status != "wrong" and self.select == "fastest" and time_it:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    call(plan, self.timing_batch)
                    seconds = _timed(lambda: call(plan, self.timing_batch), self.theta.device)
                except Exception:  # noqa: BLE001 - e.g. a batch that cannot be tiled
                    seconds = _timed(lambda: call(plan, self.batch), self.theta.device)
            fallback = _vmap_fallbacks(caught)
        return Attempt(path, key[0], key[1], status, seconds=seconds, rel_error=err, reference=ref, fallback=fallback)

    def plan(self, path: str, key: Tuple[str, bool]) -> Differentiation:
        if path == "grads":
            return replace(self.template, hvp=None, grads=key[0], grads_composite=key[1])
        return replace(self.template, hvp=key[0], hvp_composite=key[1])

    def run_all(self, path: str, call: Callable[[Differentiation, Any], Tensor]) -> Dict[Tuple[str, bool], Outcome]:
        """Every strategy of ``path``, plain then composite, on the probe batch."""
        strategies = GRAD_STRATEGIES if path == "grads" else HVP_STRATEGIES
        return {(s, c): _run(lambda: call(self.plan(path, (s, c)), self.batch), self.diagnosis, c)
                for s in strategies for c in (False, True)}


def _raised(path: str, key: Tuple[str, bool], failure: Optional[_Failure]) -> Attempt:
    assert failure is not None
    return Attempt(path, key[0], key[1], "raised", error=failure.error, op=failure.op, layer=failure.layer)


def _probe_grads(pr: _Probe) -> Tuple[List[Attempt], Optional[Attempt]]:
    """Try every per-example gradient strategy against a loop of single-example gradients."""

    def call(plan: Differentiation, batch: Any) -> Tensor:
        return per_sample_grads(plan, pr.loss, pr.space, pr.theta, batch)

    results = pr.run_all("grads", call)
    ref_key = next((k for k in (("loop", False), ("loop", True)) if results[k][0] is not None), None)
    verified = ref_key is not None
    if ref_key is None:  # no loop works: the first that does is compared with, unverified
        ref_key = next((k for k, r in results.items() if r[0] is not None), None)
    tol = _agreement_tol(pr.theta.dtype)
    attempts = []
    for key, (out, failure) in results.items():
        if out is None:
            attempts.append(_raised("grads", key, failure))
            continue
        assert ref_key is not None
        err, ref = None, None
        if key != ref_key:
            err, ref = _relative_error(out, results[ref_key][0]), _label(ref_key)  # type: ignore[arg-type]
        status = "wrong" if err is not None and err > tol else ("ok" if verified else "unverified")
        attempts.append(pr.attempt("grads", key, status, call, err, ref))
    return attempts, _choose(attempts, pr.select)


def _label(key: Tuple[str, bool]) -> str:
    return f"{key[0]} ({_kind(key[1])} kernels)"


def _fd_spread_limit(dtype: torch.dtype) -> float:
    """How far finite differences at steps ``ε`` and ``ε/2`` may differ for them to referee exact HVPs."""
    return _FD_SPREAD_FLOAT64 if dtype == torch.float64 else _FD_SPREAD_FLOAT32


def _fd_threshold(spread: float, dtype: torch.dtype) -> float:
    """An exact HVP further than this from reliable finite differences is wrong: ten times the finite
    differences' own error estimate (their spread between ``ε`` and ``ε/2``), and at least ``100·√u``
    (``1.5e-6`` in float64, ``3.5e-2`` in float32)."""
    return max(10.0 * spread, 100.0 * math.sqrt(torch.finfo(dtype).eps))


Verdict = Tuple[str, Optional[float], Optional[str]]


def _verify_exact(results: Mapping[Tuple[str, bool], Tensor], fd_ref: Optional[Tensor], fd_spread: float,
                  dtype: torch.dtype, notes: List[str]) -> Dict[Tuple[str, bool], Verdict]:
    """``(status, rel_error, reference)`` for each exact HVP that ran.

    Two *different* strategies (forward over reverse, reverse over reverse) that agree to ``10·√u`` confirm
    each other: the one agreeing with the most is the reference and every result must agree with it. (The
    kernel variants of one strategy are not independent: a backward that is not differentiable, say one
    that detaches what it saved, gives the same wrong reverse-over-reverse HVP with both.) Without such a
    pair, finite differences referee when reliable (``fd_ref`` not ``None``): a result further from them
    than :func:`_fd_threshold` is wrong. Otherwise the results are unverified."""
    keys = list(results)
    tol = _agreement_tol(dtype)
    agree = {k: [j for j in keys if j[0] != k[0] and _relative_error(results[k], results[j]) <= tol] for k in keys}
    consensus = max(keys, key=lambda k: len(agree[k])) if keys else None
    verdict: Dict[Tuple[str, bool], Verdict] = {}
    if consensus is not None and agree[consensus]:
        for k in keys:
            ref = consensus if k != consensus else agree[consensus][0]
            err = _relative_error(results[k], results[ref])
            verdict[k] = ("ok" if err <= tol else "wrong", err, _label(ref))
        return verdict
    if fd_ref is None:
        return {k: ("unverified", None, None) for k in keys}
    limit = _fd_threshold(fd_spread, dtype)
    for k in keys:
        err = _relative_error(results[k], fd_ref)
        verdict[k] = ("ok" if err <= limit else "wrong", err, "finite differences")
        if err > limit:
            notes.append(f"{_label(k)} disagrees with finite differences by {err:.1e} (they agree with themselves at "
                         f"half the step to {fd_spread:.1e}): is a backward not differentiable (detached or "
                         "once_differentiable)?")
    return verdict


def _probe_hvp(pr: _Probe, num_vectors: int, timing_vectors: int, seed: int, finite_differences: bool,
               prefer: Sequence[str] = ("forward_over_reverse", "reverse_over_reverse"),
               ) -> Tuple[List[Attempt], Optional[Attempt], List[str]]:
    """Try every HVP strategy on ``num_vectors`` seeded random vectors; see :func:`_verify_exact`. Finite
    differences serve as a reference only when those at two steps (``ε`` and ``ε/2``) agree: they do not
    where a step crosses a kink (ReLU)."""
    theta = pr.theta
    gen = torch.Generator(device="cpu").manual_seed(seed)
    vectors = torch.randn(max(num_vectors, timing_vectors), pr.space.num_params, generator=gen, dtype=torch.float64)
    vectors = vectors.to(device=theta.device, dtype=theta.dtype)
    checked, timed = vectors[:num_vectors], vectors[:timing_vectors]

    def call(plan: Differentiation, batch: Any) -> Tensor:
        rhs = checked if batch is pr.batch else timed
        return batch_hvp(plan, pr.loss, pr.space, theta, batch, rhs)

    notes: List[str] = []
    results = pr.run_all("hvp", call)
    ran = {k: out for k, (out, _) in results.items() if out is not None}
    exact = {k: out for k, out in ran.items() if k[0] != "finite_difference"}
    fd_keys = [k for k in ran if k[0] == "finite_difference"]
    fd_ref: Optional[Tensor] = None
    spread = float("inf")
    if fd_keys:
        with kernels(fd_keys[0][1], pr.template.embedding_bag):
            half = _hvp_finite_difference(pr.loss, pr.space, theta, pr.batch, checked, None, scale=FD_STEP_SCALE / 2)
        spread = _relative_error(ran[fd_keys[0]], half)
        if spread <= _fd_spread_limit(theta.dtype):
            fd_ref = ran[fd_keys[0]]
        else:
            notes.append(f"finite differences at steps ε and ε/2 differ by {spread:.1e} (a step crosses a kink, or "
                         "float32 round-off), so they could not check the exact HVPs")
    verdict = _verify_exact(exact, fd_ref, spread, theta.dtype, notes)
    trusted = [k for k in exact if verdict[k][0] == "ok"] or [k for k in exact if verdict[k][0] != "wrong"]
    for k in fd_keys:  # checked against an exact result, or else their own error estimate is recorded
        verdict[k] = (("ok", _relative_error(ran[k], exact[trusted[0]]), _label(trusted[0])) if trusted
                      else ("unverified", spread, "finite differences at half the step"))
    attempts = []
    exact_works = any(verdict[k][0] != "wrong" for k in exact)
    for key, (out, failure) in results.items():
        if out is None:
            attempts.append(_raised("hvp", key, failure))
            continue
        status, err, ref = verdict[key]
        # finite differences are timed only when they may be chosen
        time_it = key[0] != "finite_difference" or not exact_works
        attempts.append(pr.attempt("hvp", key, status, call, err, ref, time_it))
    order = {name: i for i, name in enumerate(prefer)}
    exact_attempts = sorted((a for a in attempts if a.strategy != "finite_difference"),
                            key=lambda a: (order.get(a.strategy, len(order)), a.composite))
    chosen = _choose(exact_attempts, pr.select)
    if chosen is None and finite_differences:
        chosen = _choose([a for a in attempts if a.strategy == "finite_difference"], pr.select)
        if chosen is not None:
            notes.append("no exact HVP works, so finite differences are used (measured relative error 3e-11 to "
                         "5e-10 in float64; 1e-4 to 3e-4 in float32, but 0.2 to 0.9 on a transformer)")
    return attempts, chosen, notes


def _blocker(attempts: Sequence[Attempt]) -> Attempt:
    """The failure to name: the most general strategy's (the last tried) that names an op or layer."""
    failed = [a for a in attempts if a.status == "raised"]
    named = [a for a in failed if a.op or a.layer]
    return (named or failed or list(attempts))[-1]


def _unsupported(path: str, attempts: Sequence[Attempt], grads: Optional[Attempt],
                 finite_differences: bool = True) -> UnsupportedModelError:
    block = _blocker(attempts)
    what = {"hvp": "Hessian-vector product" if finite_differences else "exact Hessian-vector product",
            "grads": "per-example gradient"}[path]
    where = "".join([f" op `{block.op}`" if block.op else " an op", f" in layer {block.layer}" if block.layer else ""])
    tried = "; ".join(a.line() for a in attempts)
    if path == "hvp" and grads is not None:
        works = (f"Per-example gradients work (grads={grads.strategy!r}), so solver='ekfac' or solver='kfac' can "
                 "still run" + ("." if finite_differences else
                                ", and probe(finite_differences=True) allows approximate HVPs."))
    else:
        works = "Nothing else can run without gradients."
    fix = ("Give it a differentiable implementation: a custom torch.autograd.Function needs a backward (and one "
           "built from differentiable ops, with setup_context, for torch.func), or replace the layer.")
    return UnsupportedModelError(f"no {what} strategy works for this model: the failing one is{where}. {works} "
                                 f"{fix} Tried: {tried}.")


def probe(
    loss: PerExampleLoss,
    space: ParamSpace,
    theta: Tensor,
    batch: Any,
    *,
    need_hvp: Union[bool, str] = True,
    select: str = "fastest",
    num_vectors: int = 2,
    seed: int = 0,
    jacobian_chunk: int = 8,
    timing_examples: int = 16,
    timing_vectors: int = 8,
    finite_differences: bool = True,
    prefer: Optional[Sequence[str]] = None,
) -> Tuple[Differentiation, ProbeReport]:
    """Choose how to differentiate one problem, once, on a few of its real examples.

    Every strategy runs on ``batch`` with plain kernels and inside :func:`composite_kernels`:

    1. Per-example gradients: ``vmap``, ``jacobian``, ``loop``. Each result is compared with the loop of
       single-example gradients (eager autograd, the reference) and rejected beyond ``10·√u`` relative
       (``u`` the unit round-off).
    2. HVPs (when ``need_hvp``) of ``num_vectors`` seeded random vectors: forward over reverse, reverse over
       reverse, finite differences. Exact strategies are compared with each other (the one agreeing with the
       most others is the reference; ``10·√u``); when fewer than two agree, with finite differences if
       those are reliable (two steps agree), 1e-5 relative in float64 (0.1 in float32, where a
       disagreement only marks the result unverified).

    A strategy that raises or disagrees is rejected and recorded with the exception's op (an aten op, or a
    custom ``autograd.Function``) and its layer (the modules executing when it was raised, or for a failure
    in a backward pass the module that ran the op in a recorded forward pass). With ``select="fastest"``
    those that work are timed on ``timing_examples`` examples (the probe batch repeated: a few examples
    would favour the loop and the jacobian, whose cost per example does not shrink with the batch) and
    ``timing_vectors`` right-hand sides, best of three calls after a warm one, and the fastest is chosen;
    one earlier in the order above (plain before composite) wins if it is within
    :data:`_PREFERENCE_MARGIN` (10 %) of the fastest, so that timing noise does not decide between equals.
    ``select="first"`` takes the first that works, in that order, without timing. Finite differences are
    chosen only when no exact HVP works (and never with ``finite_differences=False``).

    Args:
        loss: the deterministic per-example loss ``loss(params, batch) -> Tensor[B]`` (the model in eval
            mode). A loss that samples (the Fisher's) uses the plan chosen for its deterministic version.
        space: the flat parameter layout.
        theta: parameters ``[P]``.
        batch: a few (4–8) real examples, as the loss takes them.
        need_hvp: probe HVPs too (``False``: the plan's ``hvp`` is ``None``, for solvers that use per-example
            gradients only, e.g. EK-FAC; ``"optional"``: probe them, and keep ``hvp=None`` instead of raising
            when none works, for solvers that use them when they exist, e.g. EK-FAC's magnitude calibration).
        select: ``"fastest"`` or ``"first"``.
        num_vectors: random right-hand sides of the HVP check.
        seed: seeds them.
        jacobian_chunk: examples per ``vjp`` of the ``"jacobian"`` strategy.
        timing_examples: examples the timed calls run on (at least the probe batch's).
        timing_vectors: right-hand sides of the timed HVPs.
        finite_differences: allow finite-difference HVPs when no exact strategy works (``False``: raise).

    Returns:
        ``(plan, report)``; ``str(report)`` lists every attempt, its time, error or disagreement.

    Raises:
        RandomLossError: if the loss draws random numbers.
        UnsupportedModelError: if no per-example gradient strategy works, or (with ``need_hvp``) no HVP
            strategy, naming the failing op and layer, and what still works.
    """
    if select not in ("fastest", "first"):
        raise InfluenceConfigError(f"probe(select={select!r}) must be 'fastest' or 'first'.")
    for name, value in (("num_vectors", num_vectors), ("timing_examples", timing_examples),
                        ("timing_vectors", timing_vectors)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InfluenceConfigError(f"probe({name}={value!r}) must be a positive integer.")
    uses_bag = _first_look(loss, space, theta, batch)
    template = Differentiation(jacobian_chunk=jacobian_chunk, embedding_bag=uses_bag)
    n = batch_size_of(batch)
    pr = _Probe(loss, space, theta, batch, _tile(batch, max(n, timing_examples)) if select == "fastest" else batch,
                _Diagnosis(loss, space, theta, batch), template, select)
    attempts, grads = _probe_grads(pr)
    notes: List[str] = []
    hvp: Optional[Attempt] = None
    if prefer is None:
        prefer = (("reverse_over_reverse", "forward_over_reverse") if theta.device.type == "cpu"
                  else ("forward_over_reverse", "reverse_over_reverse"))
    if need_hvp:
        hvp_attempts, hvp, notes = _probe_hvp(pr, num_vectors, timing_vectors, seed, finite_differences, prefer)
        attempts = attempts + hvp_attempts
    if grads is None:
        raise _unsupported("grads", [a for a in attempts if a.path == "grads"], None)
    if need_hvp and need_hvp != "optional" and hvp is None:
        raise _unsupported("hvp", [a for a in attempts if a.path == "hvp"], grads, finite_differences)
    plan = replace(
        template,
        hvp=hvp.strategy if hvp is not None else None,
        grads=grads.strategy,
        hvp_composite=hvp.composite if hvp is not None else False,
        grads_composite=grads.composite,
    )
    return plan, ProbeReport(plan, tuple(attempts), tuple(notes))
