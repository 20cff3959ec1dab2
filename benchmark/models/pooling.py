"""Adaptive pooling to a fixed output size, computed by a cheaper kernel where that gives the same numbers.

PyTorch's adaptive pooling kernels cost several times a plain pooling on the small maps of the CPU-sized nets: on
2 threads, an SDN pool head's max + average pooling of a (128, 16, 4, 4) map, forward and backward, took 1.7 ms
against 0.12 ms for the identity it amounts to there (issue 19). Two cases are exact, bit for bit, forward and
backward (`tests/test_pooling.py`):
- the map already has the output size: the pooling is the identity (each window is one element);
- each side divides by its output side: the adaptive windows are then the plain windows of kernel = stride =
  side // output, and the plain kernels sum (average) and pick the first maximum (max) in the same order. The
  adaptive average divides the window's sum by its height, then by its width; the plain one by their product, which
  rounds alike only where at most one of the two is not a power of two (a 3x3 window does not: 9 != 3 * 3 in
  rounding), so other windows stay adaptive for the average.
Any other size goes to the adaptive kernel, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ADAPTIVE = {("max", 1): F.adaptive_max_pool1d, ("max", 2): F.adaptive_max_pool2d,
             ("avg", 1): F.adaptive_avg_pool1d, ("avg", 2): F.adaptive_avg_pool2d}
_PLAIN = {("max", 1): F.max_pool1d, ("max", 2): F.max_pool2d,
          ("avg", 1): F.avg_pool1d, ("avg", 2): F.avg_pool2d}


def pool_to(x: torch.Tensor, size: tuple[int, ...], kind: str) -> torch.Tensor:
    """``adaptive_{kind}_pool{1,2}d(x, size)`` (kind "max" or "avg") for (B, C, L) or (B, C, H, W) maps, by the
    identity or a plain pooling where those are exact (module docstring)."""
    spatial = tuple(x.shape[2:])
    if spatial == tuple(size):
        return x
    key = (kind, len(spatial))
    if all(side % out == 0 for side, out in zip(spatial, size)):
        kernel = tuple(side // out for side, out in zip(spatial, size))
        if kind == "max" or sum(k & (k - 1) != 0 for k in kernel) <= 1:
            return _PLAIN[key](x, kernel, kernel)
    return _ADAPTIVE[key](x, size)


class AvgPoolTo(nn.Module):
    """``nn.AdaptiveAvgPool{1,2}d(size)`` through `pool_to`."""

    def __init__(self, size: int | tuple[int, ...], dims: int):
        super().__init__()
        self.size = (size,) * dims if isinstance(size, int) else tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_to(x, self.size, "avg")

    def extra_repr(self) -> str:
        return f"size={self.size}"
