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

``nn.Linear`` and ``nn.Conv2d`` (``groups=1``) are the built-in ones. Parameters of layers without an
adapter are handled diagonally by the solvers (see :mod:`.capture`).

Example:
    >>> import torch
    >>> adapter_for(torch.nn.Linear(3, 2)).__name__, adapter_for(torch.nn.ReLU()) is None
    ('LinearAdapter', True)
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional, Tuple, Type

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerAdapter", "LinearAdapter", "Conv2dAdapter", "adapter_for", "registered_adapters"]

_ADAPTERS: Dict[Type[nn.Module], Type["LayerAdapter"]] = {}


class LayerAdapter:
    """Base of the per-layer-type adapters (see the module docstring). Subclass with ``module_type=``."""

    #: the module type this adapter serves (subclasses of it too, unless a more specific adapter exists)
    module_type: ClassVar[Type[nn.Module]]
    #: names of the weight and bias parameters in the module
    weight_name: ClassVar[str] = "weight"
    bias_name: ClassVar[str] = "bias"

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


class LinearAdapter(LayerAdapter, module_type=nn.Linear):
    """``nn.Linear`` on ``[B, *, in]``: every leading position after the batch is a position ``t``."""

    @classmethod
    def dims(cls, module: nn.Module) -> Tuple[int, int]:
        return int(module.out_features), int(module.in_features)

    @classmethod
    def factors(cls, module: nn.Module, inputs: Tuple[Any, ...], grad_output: Tensor,
                batch_size: int) -> Tuple[Tensor, Tensor]:
        x = inputs[0]
        return (grad_output.reshape(batch_size, -1, module.out_features),
                x.reshape(batch_size, -1, module.in_features))


class Conv2dAdapter(LayerAdapter, module_type=nn.Conv2d):
    """``nn.Conv2d`` with ``groups=1``: each output location is a position, ``a`` its receptive-field
    patch (``F.unfold``, ordered as ``weight.reshape(out, -1)``), so ``cols = C_in·kh·kw`` (KFC, Grosse &
    Martens 2016)."""

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return module.groups == 1

    @classmethod
    def dims(cls, module: nn.Module) -> Tuple[int, int]:
        return int(module.out_channels), int(module.weight[0].numel())

    @classmethod
    def factors(cls, module: nn.Module, inputs: Tuple[Any, ...], grad_output: Tensor,
                batch_size: int) -> Tuple[Tensor, Tensor]:
        a = conv2d_patches(module, inputs[0])
        g = grad_output.reshape(batch_size, module.out_channels, -1).transpose(1, 2)
        return g, a


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
