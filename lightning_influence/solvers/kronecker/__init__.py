"""Kronecker-factored curvature: per-layer statistics (:mod:`.capture`) from layer adapters (:mod:`.adapters`),
one class per layer type registered by subclassing :class:`~.adapters.LayerAdapter`."""

from .adapters import Conv2dAdapter, LayerAdapter, LinearAdapter, adapter_for, registered_adapters
from .capture import KroneckerLayer, LayerPlan, capture_layers, diagonal_grads, per_example_blocks, plan_layers

__all__ = ["Conv2dAdapter", "KroneckerLayer", "LayerAdapter", "LayerPlan", "LinearAdapter", "adapter_for",
           "capture_layers", "diagonal_grads", "per_example_blocks", "plan_layers", "registered_adapters"]
