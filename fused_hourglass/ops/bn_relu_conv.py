"""`bn_relu_conv2d`: conv2d(relu(batch_norm(u))) whose autograd saves u, not r.

Eager PyTorch keeps both u (for BatchNorm's backward) and r (for ReLU's and the convolution's). Here the
convolution's input r = relu(u·scale + shift) is written once in forward, used, and dropped; backward recomputes
it from u with one `bn_relu_apply` pass before the convolution's weight gradient. The convolution itself is
ATen's (oneDNN on the CPU, cuDNN on CUDA). The op, `torch.ops.fused_hourglass.bn_relu_conv2d`, and its autograd
kernel are C++ (csrc/ops/bn_relu_conv.cpp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from ..reference import ops as reference
from ._checks import check_4d_float, check_same_dtype_device
from .bn_relu import _check_bn_relu

__all__ = ["bn_relu_conv2d"]


def bn_relu_conv2d(u: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
                   momentum: float, eps: float, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                   padding: int = 0) -> torch.Tensor:
    """conv2d(relu(F.batch_norm(u, running_mean, running_var, weight, bias, training, momentum, eps)),
    conv_weight, conv_bias, stride 1, padding) — the pre-activation step of the hourglass Residual.

    Batch-norm arguments as `bn_relu` (running statistics updated in place when training); conv_weight
    [C_out, C, k, k] of u's dtype, conv_bias [C_out] or None. Returns [N, C_out, H', W']. Saves u and
    per-channel vectors for backward, not the activation r.
    """
    batch_stats = training or running_mean is None
    op = "bn_relu_conv2d"
    _check_bn_relu(u, weight, bias, running_mean, running_var, batch_stats, op)
    check_4d_float(conv_weight, op, "conv_weight")
    check_same_dtype_device(u, "u", conv_weight, "conv_weight", op)
    if conv_weight.shape[1] != u.shape[1]:
        raise ValueError(f"{op}: conv_weight must have {u.shape[1]} input channels (the channels of u), "
                         f"got shape {list(conv_weight.shape)}")
    if not _ext.use_kernel("bn_relu_forward", u.device):
        r = reference.bn_relu(u, weight, bias, running_mean, running_var, training, momentum, eps)
        return F.conv2d(r, conv_weight, conv_bias, padding=padding)
    return torch.ops.fused_hourglass.bn_relu_conv2d.default(u, weight, bias, running_mean, running_var, training,
                                                            momentum, eps, conv_weight, conv_bias, padding)
