"""Kronecker-factored curvature: per-layer statistics (:mod:`.capture`) from layer adapters (:mod:`.adapters`),
one class per layer type registered by subclassing :class:`~.adapters.LayerAdapter`."""

from .adapters import (Conv1dAdapter, Conv2dAdapter, EmbeddingAdapter, LayerAdapter, LinearAdapter,
                       MultiheadAttentionAdapter, adapter_for, registered_adapters)
from .capture import KroneckerLayer, LayerPlan, capture_layers, diagonal_grads, per_example_blocks, plan_layers

__all__ = ["Conv1dAdapter", "Conv2dAdapter", "EmbeddingAdapter", "KroneckerLayer", "LayerAdapter", "LayerPlan",
           "LinearAdapter", "MultiheadAttentionAdapter", "adapter_for", "capture_layers", "diagonal_grads",
           "per_example_blocks", "plan_layers", "registered_adapters"]
