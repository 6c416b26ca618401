"""The random projection of the compressed index: a Gaussian ``R [k, P]`` with entries ``N(0, 1/k)``
(so ``E[RᵀR] = I`` and ``(R x)·(R y)`` is an unbiased estimate of ``x·y``), generated from a seed in
blocks of :data:`ROW_BLOCK` rows, so that ``R`` is never held whole and the same seed gives the same
matrix whatever the chunk sizes of the passes that use it."""

from __future__ import annotations

import math
from typing import Iterator, Tuple

import torch
from torch import Tensor

from ..seeds import derive_seed

__all__ = ["ROW_BLOCK", "projection_blocks"]

#: rows of ``R`` generated together (fixed: block ``b`` is rows ``b·ROW_BLOCK …`` from seed ``(seed, b)``)
ROW_BLOCK = 64
#: the stream name of the projection's blocks under the index's seed (see :mod:`lightning_influence.seeds`)
_STREAM = 0x50524F4A  # "PROJ"


def projection_blocks(dim: int, num_params: int, seed: int, dtype: torch.dtype,
                      device: torch.device) -> Iterator[Tuple[int, Tensor]]:
    """``(first_row, R[first_row : first_row + b])`` for every block of :data:`ROW_BLOCK` rows of the
    ``[dim, num_params]`` projection, in order; each block is drawn on the CPU from its own seed
    ``derive_seed(seed, stream, block)`` (device-independent), scaled by ``1/√dim``, then moved to
    ``device``. Memory: one block, ``ROW_BLOCK × num_params`` numbers."""
    scale = 1.0 / math.sqrt(dim)
    for b, first in enumerate(range(0, dim, ROW_BLOCK)):
        rows = min(ROW_BLOCK, dim - first)
        gen = torch.Generator().manual_seed(derive_seed(seed, _STREAM, b))
        block = torch.randn(rows, num_params, generator=gen, dtype=torch.float64).mul_(scale)
        yield first, block.to(dtype=dtype, device=device)
