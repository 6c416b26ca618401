"""Layer adapters: how each layer type's per-example weight gradient factors into Kronecker statistics.

For a layer whose weight gradient for example ``i`` can be written

    G_i = Σ_t g_{i,t} a_{i,t}ᵀ    [rows, cols]   (flat parameters: ``weight.reshape(rows, cols)`` row-major),

with one pair of vectors per *position* ``t`` (a token, an output pixel, …), K-FAC and EK-FAC keep the
factors ``S = E[g gᵀ]`` (``rows × rows``) and ``A = E[a aᵀ]`` (``cols × cols``). An adapter says, for
one module type, what ``rows``/``cols`` are and how to read ``g`` and ``a`` from what a forward hook sees
(the module's inputs) and from the gradient of the loss with respect to its output. The bias, when
attributed, is handled by the caller: a constant ``1`` appended to ``a`` (its gradient is ``Σ_t g_t``).

Adapters register themselves by subclassing, keyed by module type (the most derived registered base of a
module's class wins)::

    class MyLayerAdapter(LayerAdapter, module_type=MyLayer):
        @classmethod
        def dims(cls, module): ...
        @classmethod
        def factors(cls, module, inputs, grad_output, batch_size): ...

Built in: ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (``groups=1``), ``nn.Embedding`` (rows are the
vocabulary: ``g`` is the one-hot token, ``a`` the gradient of the embedding output) and
``nn.MultiheadAttention``'s packed in-projection (``_qkv_same_embed_dim``; its ``out_proj`` is then called as
a module and served by the ``Linear`` adapter). Parameters of layers without an adapter are handled
diagonally by the solvers (see :mod:`.capture`).

Layers that do not call their weight through a module (``nn.MultiheadAttention`` runs
``F.multi_head_attention_forward`` on its raw parameters) set :attr:`LayerAdapter.reroutes` and implement
:meth:`LayerAdapter.recompute`: a forward hook replaces the module's output by the same value computed
through an exposed projection, whose output is the tensor the capture differentiates.

Example:
    >>> import torch
    >>> adapter_for(torch.nn.Linear(3, 2)).__name__, adapter_for(torch.nn.ReLU()) is None
    ('LinearAdapter', True)
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import InfluenceConfigError

__all__ = ["LayerAdapter", "LinearAdapter", "Conv1dAdapter", "Conv2dAdapter", "EmbeddingAdapter",
           "MultiheadAttentionAdapter", "adapter_for", "registered_adapters"]

_ADAPTERS: Dict[Type[nn.Module], Type["LayerAdapter"]] = {}


class LayerAdapter:
    """Base of the per-layer-type adapters (see the module docstring). Subclass with ``module_type=``."""

    #: the module type this adapter serves (subclasses of it too, unless a more specific adapter exists)
    module_type: ClassVar[Type[nn.Module]]
    #: names of the weight and bias parameters in the module
    weight_name: ClassVar[str] = "weight"
    bias_name: ClassVar[str] = "bias"
    #: ``True``: the output factor ``S = E[g gᵀ]`` is diagonal by construction (``g`` one-hot), so its
    #: eigenbasis is taken to be the identity (no eigendecomposition; ties between equal entries then
    #: never mix coordinates)
    diagonal_rows: ClassVar[bool] = False
    #: ``True``: the capture replaces the module's output by :meth:`recompute` (see the module docstring)
    reroutes: ClassVar[bool] = False
    #: ``True``: every axis but the batch is a position, so sequence-first inputs ``[T, B, ...]`` (e.g. inside
    #: ``nn.TransformerEncoderLayer(batch_first=False)`` or ``nn.LSTM`` without ``batch_first``) are taken
    #: batch-first by moving their axis 1 in front, with the output gradient alike
    sequence_first: ClassVar[bool] = False

    def __init_subclass__(cls, module_type: Optional[Type[nn.Module]] = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if module_type is not None:
            cls.module_type = module_type
            _ADAPTERS[module_type] = cls

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this instance of the type can be factored (e.g. a grouped convolution cannot)."""
        return True

    @classmethod
    def dims(cls, module: nn.Module) -> Tuple[int, int]:
        """``(rows, cols)`` of the weight gradient ``G`` (without the bias column)."""
        raise NotImplementedError

    @classmethod
    def factors(cls, module: nn.Module, inputs: Tuple[Any, ...], grad_output: Tensor,
                batch_size: int) -> Tuple[Tensor, Tensor]:
        """``(g [B, T, rows], a [B, T, cols])`` for one batch: ``G_i = Σ_t g_{i,t} a_{i,t}ᵀ``.

        Args:
            inputs: the positional inputs of the module's forward call, as a forward hook sees them.
            grad_output: the gradient of the summed per-example losses with respect to the output.
            batch_size: ``B``; the leading dimension of batch-first inputs and outputs.
        """
        raise NotImplementedError

    @classmethod
    def recompute(cls, module: nn.Module, args: Tuple[Any, ...],
                  kwargs: Mapping[str, Any]) -> Tuple[Any, Tensor, Tuple[Any, ...]]:
        """For :attr:`reroutes` adapters: ``(output, target, inputs)``, the module's output recomputed (equal
        to the module's own to round-off) through ``target``, the tensor whose gradient :meth:`factors`
        receives as ``grad_output``, and the ``inputs`` it receives. Called by a forward hook with the
        module's call arguments."""
        raise NotImplementedError


class LinearAdapter(LayerAdapter, module_type=nn.Linear):
    """``nn.Linear`` on ``[B, *, in]``: every leading position after the batch is a position ``t``
    (``[T, B, in]`` is taken as ``[B, T, in]``)."""

    sequence_first = True

    @classmethod
    def dims(cls, module: nn.Module) -> Tuple[int, int]:
        return int(module.out_features), int(module.in_features)

    @classmethod
    def factors(cls, module: nn.Module, inputs: Tuple[Any, ...], grad_output: Tensor,
                batch_size: int) -> Tuple[Tensor, Tensor]:
        x = inputs[0]
        return (grad_output.reshape(batch_size, -1, module.out_features),
                x.reshape(batch_size, -1, module.in_features))


class _ConvAdapter(LayerAdapter):
    """Convolutions with ``groups=1``: each output location is a position, ``a`` its receptive-field patch
    ordered as ``weight.reshape(out, -1)``, so ``cols = C_in·∏kernel``; subclasses say how to cut patches."""

    @staticmethod
    def patches(module: nn.Module, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return module.groups == 1

    @classmethod
    def dims(cls, module: nn.Module) -> Tuple[int, int]:
        return int(module.out_channels), int(module.weight[0].numel())

    @classmethod
    def factors(cls, module: nn.Module, inputs: Tuple[Any, ...], grad_output: Tensor,
                batch_size: int) -> Tuple[Tensor, Tensor]:
        a = cls.patches(module, inputs[0])
        g = grad_output.reshape(batch_size, module.out_channels, -1).transpose(1, 2)
        return g, a


class Conv2dAdapter(_ConvAdapter, module_type=nn.Conv2d):
    """``nn.Conv2d`` with ``groups=1``: each output location is a position, ``a`` its receptive-field
    patch (``F.unfold``, ordered as ``weight.reshape(out, -1)``), so ``cols = C_in·kh·kw`` (KFC, Grosse &
    Martens 2016)."""

    @staticmethod
    def patches(module: nn.Module, x: Tensor) -> Tensor:
        return conv2d_patches(module, x)


class Conv1dAdapter(_ConvAdapter, module_type=nn.Conv1d):
    """``nn.Conv1d`` with ``groups=1`` on ``[B, C, L]``: each output time step is a position, ``a`` its
    receptive-field window ordered as ``weight.reshape(out, -1)`` (channel-major), ``cols = C_in·k``."""

    @staticmethod
    def patches(module: nn.Module, x: Tensor) -> Tensor:
        return conv1d_patches(module, x)


class EmbeddingAdapter(LayerAdapter, module_type=nn.Embedding):
    """``nn.Embedding`` (weight ``[V, E]``): each token is a position; ``G_i = Σ_t onehot(x_{i,t})
    g_{i,t}ᵀ`` ``[V, E]``, so here the *row* vector is the one-hot token (``S`` = token frequencies, diagonal)
    and the *column* vector ``a`` is the gradient of the embedding output ``[E]``. Tokens equal to
    ``padding_idx`` get a zero one-hot (their row receives no gradient).

    Memory: the row factor and its (identity) eigenbasis are dense ``V × V``, and one chunk's one-hot
    tokens ``[B, T, V]``; layers with more than :attr:`max_vocab` rows therefore stay diagonal (reported
    as such). ``scale_grad_by_freq`` (a gradient that depends on the whole batch) is not supported."""

    diagonal_rows = True
    sequence_first = True
    #: the largest ``num_embeddings`` factored (``V²`` numbers per factor: 4,096 rows are 128 MiB in float64)
    max_vocab: ClassVar[int] = 4096

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return not module.scale_grad_by_freq and module.num_embeddings <= cls.max_vocab

    @classmethod
    def dims(cls, module: nn.Module) -> Tuple[int, int]:
        return int(module.num_embeddings), int(module.embedding_dim)

    @classmethod
    def factors(cls, module: nn.Module, inputs: Tuple[Any, ...], grad_output: Tensor,
                batch_size: int) -> Tuple[Tensor, Tensor]:
        tokens = inputs[0].reshape(batch_size, -1)
        onehot = F.one_hot(tokens, module.num_embeddings).to(grad_output.dtype)
        if module.padding_idx is not None:
            onehot[..., module.padding_idx] = 0
        return onehot, grad_output.reshape(batch_size, -1, module.embedding_dim)


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


class MultiheadAttentionAdapter(LayerAdapter, module_type=nn.MultiheadAttention):
    """The packed in-projection ``in_proj_weight [3E, E]`` (and ``in_proj_bias``) of
    ``nn.MultiheadAttention`` with ``_qkv_same_embed_dim`` and batched (3-d) inputs.

    Positions: with self-attention (``query is key is value``) each token ``x_t`` is one position and
    ``g_t = [∂q_t; ∂k_t; ∂v_t]`` ``[3E]``; otherwise query, key and value tokens are all positions of the same
    map, stacked along time (``a`` the token, ``g`` its projection's gradient, zero outside its own third).
    Both give ``G_i = Σ_t g_t a_tᵀ`` exactly.

    Capture (:meth:`recompute`): ``F.multi_head_attention_forward`` is re-run on projections computed
    outside it (identity in- and out-projections inside), and ``out_proj`` is then called as a module, so
    its forward hooks fire and the ``Linear`` adapter serves it. The fast path never hooks anything; the
    recomputation always takes the slow one.
    """

    weight_name = "in_proj_weight"
    bias_name = "in_proj_bias"
    reroutes = True

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return bool(module._qkv_same_embed_dim) and module.in_proj_weight is not None

    @classmethod
    def dims(cls, module: nn.Module) -> Tuple[int, int]:
        return 3 * int(module.embed_dim), int(module.embed_dim)

    @classmethod
    def factors(cls, module: nn.Module, inputs: Tuple[Any, ...], grad_output: Tensor,
                batch_size: int) -> Tuple[Tensor, Tensor]:
        e = module.embed_dim
        return grad_output.reshape(batch_size, -1, 3 * e), inputs[0].reshape(batch_size, -1, e)

    @classmethod
    def recompute(cls, module: nn.Module, args: Tuple[Any, ...],
                  kwargs: Mapping[str, Any]) -> Tuple[Any, Tensor, Tuple[Any, ...]]:
        """The attention output through ``target = x W_inᵀ + b_in`` (batch-first ``[B, T, 3E]``, ``x`` the
        self-attention input, or query, key and value stacked along time), with inputs ``(x,)``."""
        call = _MHA_SIGNATURE.bind(module, *args, **kwargs)
        call.apply_defaults()
        c = call.arguments
        q, k, v = c["query"], c["key"], c["value"]
        if q.dim() != 3:
            raise InfluenceConfigError(
                f"MultiheadAttention got an unbatched query of shape {tuple(q.shape)}; K-FAC/EK-FAC need batched "
                "(3-d) inputs. Add a batch dimension or use solver='lissa' or 'cg'."
            )
        if not module.batch_first:  # work batch-first; F.multi_head_attention_forward wants [T, B, E]
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        e = module.embed_dim
        w, b = module.in_proj_weight, module.in_proj_bias
        self_attention = c["query"] is c["key"] and c["key"] is c["value"]
        x = q if self_attention else torch.cat([q, k, v], dim=1)
        target = F.linear(x, w, b)  # [B, T, 3E] (stacked: [B, Lq + Lk + Lv, 3E])
        if self_attention:
            pq, pk, pv = target.split(e, dim=2)
        else:
            lq, lk = q.shape[1], k.shape[1]
            pq, pk, pv = target[:, :lq, :e], target[:, lq : lq + lk, e : 2 * e], target[:, lq + lk :, 2 * e :]
        eye = torch.eye(e, dtype=target.dtype, device=target.device)
        ctx, weights = F.multi_head_attention_forward(
            pq.transpose(0, 1), pk.transpose(0, 1), pv.transpose(0, 1), e, module.num_heads,
            eye.repeat(3, 1), None, module.bias_k, module.bias_v, module.add_zero_attn, module.dropout,
            eye, None, training=module.training, key_padding_mask=c["key_padding_mask"],
            need_weights=c["need_weights"], attn_mask=c["attn_mask"],
            average_attn_weights=c["average_attn_weights"], is_causal=c["is_causal"])
        out = module.out_proj(ctx.transpose(0, 1))  # batch-first, called as a module
        if not module.batch_first:
            out = out.transpose(0, 1)
        return (out, weights), target, (x,)


def conv1d_patches(mod: nn.Conv1d, x: Tensor) -> Tensor:
    """Receptive-field windows of a ``Conv1d`` input ``[B, C, L]`` as ``[B, T, C·k]``, ordered as
    ``weight.reshape(out, -1)``: the 2-d patches of ``x`` as a ``[B, C, 1, L]`` image with a ``1 × k``
    kernel (padding as the layer does it)."""
    if mod.padding_mode != "zeros":
        x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
        pad = 0
    elif isinstance(mod.padding, str):
        total = mod.dilation[0] * (mod.kernel_size[0] - 1) if mod.padding == "same" else 0
        x = F.pad(x, [total // 2, total - total // 2])
        pad = 0
    else:
        pad = mod.padding[0]
    cols = F.unfold(x.unsqueeze(2), (1, mod.kernel_size[0]), dilation=(1, mod.dilation[0]),
                    padding=(0, pad), stride=(1, mod.stride[0]))  # [B, C·k, T]
    return cols.transpose(1, 2)


def conv2d_patches(mod: nn.Conv2d, x: Tensor) -> Tensor:
    """Receptive-field patches of a ``Conv2d`` input ``[B, C, H, W]`` as ``[B, T, C·kh·kw]``, ordered as
    ``weight.reshape(out, -1)`` (zero padding, ``"same"``/``"valid"`` and other padding modes as the layer
    does it)."""
    if mod.padding_mode != "zeros":
        x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
        pad: Any = 0
    elif isinstance(mod.padding, str):
        pads = []
        for d, k in zip(reversed(mod.dilation), reversed(mod.kernel_size)):
            total = d * (k - 1) if mod.padding == "same" else 0
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
        pad = 0
    else:
        pad = mod.padding
    cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=pad, stride=mod.stride)  # [B, CK, T]
    return cols.transpose(1, 2)


def registered_adapters() -> Dict[Type[nn.Module], Type[LayerAdapter]]:
    """``{module type: adapter}`` of every registered adapter."""
    return dict(_ADAPTERS)


def adapter_for(module: nn.Module) -> Optional[Type[LayerAdapter]]:
    """The adapter of ``module``'s most specific registered type that supports it, or ``None``."""
    for cls in type(module).__mro__:
        adapter = _ADAPTERS.get(cls)
        if adapter is not None:
            return adapter if adapter.supports(module) else None
    return None
