"""`bn_relu_conv2d`: conv2d(relu(batch_norm(u))) whose autograd saves u, not r.

Eager PyTorch keeps both u (for BatchNorm's backward) and r (for ReLU's and the convolution's). Here the
convolution's input r = relu(u·scale + shift) is written once in forward, used, and dropped; backward recomputes
it from u with one `bn_relu_apply` pass before the convolution's weight gradient. The convolution itself is
ATen's (oneDNN on the CPU, cuDNN on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from ..reference import ops as reference
from ._checks import check_4d_float, check_same_dtype_device
from .bn_relu import _check_bn_relu, bn_relu_backward, save_bn_context

__all__ = ["bn_relu_conv2d"]


class _BnReLUConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
                momentum: float, eps: float, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                padding: int) -> torch.Tensor:
        r, scale, shift, mean, invstd = torch.ops.fused_hourglass.bn_relu_forward.default(
            u, weight, bias, running_mean, running_var, training, momentum, eps)
        save_bn_context(ctx, u, weight, bias, scale, shift, mean, invstd, training or running_mean is None,
                        conv_weight)
        ctx.padding = padding
        ctx.has_conv_bias = conv_bias is not None
        return F.conv2d(r, conv_weight, conv_bias, padding=padding)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, scale, shift, mean, invstd, conv_weight = ctx.saved_tensors
        need_bn = any(ctx.needs_input_grad[:3])
        need_cw, need_cb = ctx.needs_input_grad[8], ctx.needs_input_grad[9] and ctx.has_conv_bias
        r = torch.ops.fused_hourglass.bn_relu_apply.default(u, scale, shift)  # recomputed, never saved
        p = ctx.padding
        # The convolution's gradients need the output gradient in the layout the forward produced.
        grad = grad.contiguous(memory_format=_ext.memory_format_of(r))
        dr, dw, db = torch.ops.aten.convolution_backward(
            grad, r, conv_weight, [conv_weight.shape[0]] if ctx.has_conv_bias else None, [1, 1], [p, p], [1, 1],
            False, [0, 0], 1, [need_bn, need_cw, need_cb])
        del r
        du = grad_w = grad_b = None
        if need_bn:
            du, grad_w, grad_b = bn_relu_backward(ctx, dr, u, scale, shift, mean, invstd)
        return du, grad_w, grad_b, None, None, None, None, None, dw, db, None


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
    if not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (u, weight, bias, conv_weight, conv_bias)):
        # No graph to record (inference): the ops directly, without the autograd function's per-call cost.
        r = torch.ops.fused_hourglass.bn_relu_forward.default(u, weight, bias, running_mean, running_var, training,
                                                              momentum, eps)[0]
        return F.conv2d(r, conv_weight, conv_bias, padding=padding)
    return _BnReLUConvFunction.apply(u, weight, bias, running_mean, running_var, training, momentum, eps, conv_weight,
                                     conv_bias, padding)
