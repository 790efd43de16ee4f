"""Plain-PyTorch twins of the Triton conv-chain ops (`fused_hourglass.triton.conv_kernels`), on the same NHWC
[N, H, W, C] tensors; differentiable, so tests take dgrad/wgrad references from autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_bnrelu(u: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None, weight: torch.Tensor,
                bias: torch.Tensor, residual: torch.Tensor | None = None,
                low: torch.Tensor | None = None) -> torch.Tensor:
    """conv(relu(u·scale + shift)) + bias [+ residual] [+ nearest_up2x(low)], 'same' zero padding of the
    rectified tensor (the reference pads r, not u). Computes in u's dtype."""
    r = u if scale is None else torch.relu(u * scale.to(u.dtype) + shift.to(u.dtype))
    k = weight.shape[-1]
    y = F.conv2d(r.permute(0, 3, 1, 2), weight.to(u.dtype), bias.to(u.dtype), padding=(k - 1) // 2)
    if low is not None:
        y = y + F.interpolate(low.permute(0, 3, 1, 2), scale_factor=2, mode="nearest")
    y = y.permute(0, 2, 3, 1)
    return y if residual is None else y + residual


def batch_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of an NHWC tensor, in float64."""
    flat = y.reshape(-1, y.shape[-1]).double()
    return flat.mean(0), flat.var(0, unbiased=False)
