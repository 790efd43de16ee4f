"""Plain-PyTorch twins of the fused ops, used as the fallback path and by tests and benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample_add(low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """skip + nearest_upsample_2x(low)."""
    return skip + F.interpolate(low, scale_factor=2, mode="nearest")


def nearest_upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2× upsampling by integer indexing (no float scale factor, so symbolic shapes trace)."""
    n, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


def sum_pool2x2(grad: torch.Tensor) -> torch.Tensor:
    """2×2, stride-2 sum pool: the gradient of `upsample_add` with respect to `low`."""
    n, c, h, w = grad.shape
    return grad.reshape(n, c, h // 2, 2, w // 2, 2).sum(dim=(3, 5))
