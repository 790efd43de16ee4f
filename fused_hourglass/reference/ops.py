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


def bn_relu(u: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
            momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """relu(batch_norm(u)); without running statistics the batch's are used in both modes, as nn.BatchNorm2d
    with track_running_stats=False does."""
    batch_stats = training or running_mean is None
    return F.relu(F.batch_norm(u, running_mean, running_var, weight, bias, batch_stats, momentum, eps))


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """2×2, stride-2 max pool."""
    return F.max_pool2d(x, 2, 2)
