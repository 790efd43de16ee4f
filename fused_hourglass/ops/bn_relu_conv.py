"""`bn_relu_conv2d`: conv2d(relu(batch_norm(u))) whose autograd saves u, not r.

Eager PyTorch keeps both u (for BatchNorm's backward) and r (for ReLU's and the convolution's). Here the
convolution's input r = relu(u·scale + shift) is written once in forward, used, and dropped; backward recomputes
it from u with one `bn_relu_apply` pass before the convolution's weight gradient. The convolution itself is
ATen's (oneDNN on the CPU, cuDNN on CUDA). The op, `torch.ops.fused_hourglass.bn_relu_conv2d`, and its autograd
and autocast kernels are C++ (csrc/ops/bn_relu_conv.cpp).

Mixed precision, as the reference under `torch.autocast`: BatchNorm runs in u's dtype (statistics accumulated in
float32; BN parameters and running statistics keep theirs) and the convolution in the low precision, on r rounded
to it. Under autocast the op casts conv_weight and conv_bias to the autocast dtype itself, as `F.conv2d` does: its
Autocast kernel passes the compiled op `conv_dtype` (the schema's last, optional argument), and the op casts them
inside, so that the weight gradient comes back in the weight's dtype with no autograd node per cast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from ..reference import ops as reference
from ._checks import check_4d_float, check_conv_operand, check_tensor, conv_dtype
from .bn_relu import _check_bn_relu
from .sync_bn import sync_active, sync_bn_relu_conv2d

__all__ = ["bn_relu_conv2d"]


def bn_relu_conv2d(u: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
                   momentum: float, eps: float, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                   padding: int = 0, *, process_group=None) -> torch.Tensor:
    """conv2d(relu(F.batch_norm(u, running_mean, running_var, weight, bias, training, momentum, eps)),
    conv_weight, conv_bias, stride 1, padding) — the pre-activation step of the hourglass Residual.

    Batch-norm arguments as `bn_relu` (running statistics updated in place when training); conv_weight
    [C_out, C, k, k] of u's dtype or float16/bfloat16 (the convolution's dtype: r is rounded to it), conv_bias
    [C_out] of conv_weight's dtype or None; under autocast both are cast to the autocast dtype. Returns
    [N, C_out, H', W'] in the convolution's dtype. Saves u and per-channel vectors for backward, not the
    activation r. `process_group`: as `bn_relu`'s (statistics over the
    group's processes in training, through `sync_bn_relu_conv2d`).
    """
    if process_group is not None and sync_active(process_group, training):
        return sync_bn_relu_conv2d(u, weight, bias, running_mean, running_var, momentum, eps, conv_weight, conv_bias,
                                   padding, process_group=process_group)
    batch_stats = training or running_mean is None
    op = "bn_relu_conv2d"
    _check_bn_relu(u, weight, bias, running_mean, running_var, batch_stats, op)
    check_4d_float(conv_weight, op, "conv_weight")
    check_conv_operand(conv_weight, "conv_weight", u, None, op)
    if conv_weight.shape[1] != u.shape[1]:
        raise ValueError(f"{op}: conv_weight must have {u.shape[1]} input channels (the channels of u), "
                         f"got shape {list(conv_weight.shape)}")
    # Checked here because the convolution only runs after the running statistics have been updated.
    if conv_bias is not None:
        check_tensor(conv_bias, op, "conv_bias")
        check_conv_operand(conv_bias, "conv_bias", u, conv_dtype(conv_weight, u)[0], op)
        if conv_bias.shape != (conv_weight.shape[0],):
            raise ValueError(f"{op}: conv_bias must be 1-D with {conv_weight.shape[0]} elements (conv_weight's "
                             f"output channels), got shape {list(conv_bias.shape)}")
    if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
        raise ValueError(f"{op}: padding must be an int >= 0, got {padding!r}")
    kh, kw = conv_weight.shape[2], conv_weight.shape[3]
    if u.shape[2] + 2 * padding < kh or u.shape[3] + 2 * padding < kw:
        raise ValueError(f"{op}: the {kh}x{kw} conv_weight does not fit u's {u.shape[2]}x{u.shape[3]} planes with "
                         f"padding {padding}")
    if not _ext.use_kernel("bn_relu_forward", u.device):
        r = reference.bn_relu(u, weight, bias, running_mean, running_var, training, momentum, eps)
        return F.conv2d(r.to(conv_dtype(conv_weight, u)[0]), conv_weight, conv_bias, padding=padding)
    return torch.ops.fused_hourglass.bn_relu_conv2d.default(u, weight, bias, running_mean, running_var, training,
                                                            momentum, eps, conv_weight, conv_bias, padding)
