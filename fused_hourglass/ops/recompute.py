"""`bn_relu_conv_chain`: several `bn_relu_conv2d` steps in a row whose autograd saves only the first step's input.

    h_0 = u;  h_{i+1} = conv2d(relu(batch_norm_i(h_i)), conv_weight_i, conv_bias_i, padding_i)

A chain of `bn_relu_conv2d` calls saves every h_i; this one keeps u and each step's per-channel vectors (scale,
shift, mean, invstd: the batch statistics the forward normalised with) and, in backward, recomputes h_1 … h_{k−1}
from u with one `bn_relu_apply` and one convolution per step. The recompute never touches the running statistics
(they are updated once, in forward) and normalises with the forward's own statistics, so the gradients are those
of the saved-everything chain. The Residual's memory policies (`StackedHourglass(recompute=...)`) are built from it:
"conv1" runs steps 1–2 as a chain (conv1's output recomputed), "block" all three.

The steps run the compiled ops (`bn_relu_forward`, `bn_relu_apply`, `bn_relu_backward`, …) around ATen's
convolution, from a Python `torch.autograd.Function`. Mixed precision as `bn_relu_conv2d`: BatchNorm in h_i's dtype,
each convolution in its weight's dtype (the autocast dtype under autocast; r rounded to it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import _ext
from ..reference import ops as reference
from ._checks import check_4d_float, conv_dtype
from .bn_relu import _check_bn_relu

__all__ = ["ConvStep", "bn_relu_conv_chain"]

_fh = torch.ops.fused_hourglass
_aten = torch.ops.aten


class ConvStep(NamedTuple):
    """One BN-ReLU-conv step: the arguments of `bn_relu_conv2d` after u."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    training: bool
    momentum: float
    eps: float
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    padding: int = 0


_TENSORS = 6  # per step, in Function.apply's arguments: weight, bias, running_mean, running_var, conv_w, conv_b


def _conv(r: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    if r.dtype != conv_weight.dtype:
        r = r.to(conv_weight.dtype)
    return _aten.convolution.default(r, conv_weight, conv_bias, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1)


class _BnReLUConvChain(torch.autograd.Function):
    """apply(u, meta, first_padding, first_weight, first_bias, *6 tensors per step): see `bn_relu_conv_chain`."""

    @staticmethod
    def forward(ctx, u, meta, first_padding, first_weight, first_bias, *tensors):
        vectors = []
        with torch.autocast(u.device.type, enabled=False):
            h = u if first_weight is None else _conv(u, first_weight, first_bias, first_padding)
            for i, (training, momentum, eps, padding) in enumerate(meta):
                weight, bias, running_mean, running_var, conv_weight, conv_bias = tensors[_TENSORS * i:
                                                                                          _TENSORS * (i + 1)]
                r, scale, shift, mean, invstd = _fh.bn_relu_forward.default(h, weight, bias, running_mean,
                                                                           running_var, training, momentum, eps)
                h = _conv(r, conv_weight, conv_bias, padding)
                del r
                vectors += [scale, shift, mean, invstd]
        conv_params = [t for i in range(len(meta)) for t in tensors[_TENSORS * i + 4:_TENSORS * (i + 1)]]
        ctx.save_for_backward(u, first_weight, first_bias, *vectors, *conv_params)
        ctx.meta, ctx.first_padding = meta, first_padding
        # per step: whether it normalised with batch statistics, and the dtypes of its weight and bias
        ctx.forms = [(training or tensors[_TENSORS * i + 2] is None,
                      None if tensors[_TENSORS * i] is None else tensors[_TENSORS * i].dtype,
                      None if tensors[_TENSORS * i + 1] is None else tensors[_TENSORS * i + 1].dtype)
                     for i, (training, *_) in enumerate(meta)]
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        k = len(ctx.meta)
        u, first_weight, first_bias, *rest = ctx.saved_tensors
        vectors, conv_params = rest[:4 * k], rest[4 * k:]
        needs = ctx.needs_input_grad
        grads: list[torch.Tensor | None] = [None] * (5 + _TENSORS * k)
        need_first = first_weight is not None and (needs[0] or needs[3] or needs[4])
        need_h0 = needs[0] if first_weight is None else need_first
        with torch.autocast(u.device.type, enabled=False):
            # Recompute the BatchNorm inputs h_0 … h_{k−1} and every convolution's input r_i, with the forward's
            # scale and shift (its batch statistics); the last convolution's output is not needed.
            hs, rs = [u if first_weight is None else _conv(u, first_weight, first_bias, ctx.first_padding)], []
            for i, (_, _, _, padding) in enumerate(ctx.meta):
                conv_weight, conv_bias = conv_params[2 * i], conv_params[2 * i + 1]
                r = _fh.bn_relu_apply.default(hs[i], vectors[4 * i], vectors[4 * i + 1])
                rs.append(r if r.dtype == conv_weight.dtype else r.to(conv_weight.dtype))
                del r
                if i < k - 1:
                    hs.append(_conv(rs[i], conv_weight, conv_bias, padding))
            for i in reversed(range(k)):
                base = 5 + _TENSORS * i
                conv_weight, conv_bias = conv_params[2 * i], conv_params[2 * i + 1]
                need_w, need_b = needs[base], needs[base + 1]
                need_u = need_h0 if i == 0 else True
                need_bn = need_u or need_w or need_b
                r = rs.pop()
                dr, grads[base + 4], grads[base + 5] = _conv_backward(grad, r, conv_weight, conv_bias,
                                                                      ctx.meta[i][3], need_bn, needs[base + 4],
                                                                      needs[base + 5])
                del r
                if not need_bn:
                    break
                h = hs.pop()
                dr = dr.to(h.dtype)
                scale, shift, mean, invstd = vectors[4 * i:4 * i + 4]
                batch_stats, weight_dtype, bias_dtype = ctx.forms[i]
                sum_dz = sum_dz_xhat = None
                if need_u and batch_stats:
                    grad, sum_dz, sum_dz_xhat = _fh.bn_relu_backward.default(dr, h, scale, shift, mean, invstd)
                else:
                    if need_w or need_b:
                        sum_dz, sum_dz_xhat = _fh.bn_relu_backward_reduce.default(dr, h, scale, shift, mean, invstd)
                    if need_u:
                        grad = _fh.bn_relu_backward_apply.default(dr, h, scale, shift, None, None, None, None)
                del dr, h
                if need_w:
                    grads[base] = sum_dz_xhat.to(weight_dtype)
                if need_b:
                    grads[base + 1] = sum_dz.to(bias_dtype)
            if need_first:
                x = u if u.dtype == first_weight.dtype else u.to(first_weight.dtype)
                du, grads[3], grads[4] = _conv_backward(grad, x, first_weight, first_bias, ctx.first_padding,
                                                        needs[0], needs[3], needs[4])
                grads[0] = None if du is None else du.to(u.dtype)
            elif needs[0]:
                grads[0] = grad
        return tuple(grads)


def _conv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int,
                   need_x: bool, need_w: bool, need_b: bool):
    """(dx, dweight, dbias) of conv2d(x, weight, bias, stride 1, padding); None where not needed."""
    # the convolution's gradients want the output gradient in the layout its forward produced (x's)
    grad = grad.to(weight.dtype).contiguous(memory_format=_ext.memory_format_of(x))
    bias_sizes = None if bias is None else [weight.shape[0]]
    return _aten.convolution_backward.default(grad, x, weight, bias_sizes, [1, 1], [padding, padding], [1, 1], False,
                                              [0, 0], 1, [need_x, need_w, bias is not None and need_b])


def bn_relu_conv_chain(u: torch.Tensor, steps: Sequence[ConvStep], *,
                       first_conv: tuple[torch.Tensor, torch.Tensor | None, int] | None = None) -> torch.Tensor:
    """h_k of the chain h_{i+1} = bn_relu_conv2d(h_i, *steps[i]), h_0 = u (or conv2d(u, *first_conv)), saving only u
    (and per-channel vectors) for backward; h_0 … h_{k−1} are recomputed there from u with the forward's batch
    statistics.

    Args:
        u: [N, C, H, W] float64, float32, float16 or bfloat16.
        steps: one or more `ConvStep`s, each with the arguments of `bn_relu_conv2d` (BatchNorm parameters and
            running statistics of h_i's C_i channels, updated in place once, in forward, when training; conv_weight
            [C_{i+1}, C_i, k, k] of h_i's dtype or float16/bfloat16, cast to the autocast dtype under autocast).
        first_conv: (weight [C_0, C, k, k], bias [C_0] or None, padding): a stride-1 convolution before the first
            BatchNorm, h_0 = conv2d(u, weight, bias, padding=padding); None (default): h_0 = u.
    Returns:
        h_k: [N, C_k, H', W'] in the last convolution's dtype. Differentiable in u, first_conv's weight and bias and
        every step's weight, bias, conv_weight and conv_bias (once: double backward raises).
    """
    op = "bn_relu_conv_chain"
    if len(steps) == 0:
        raise ValueError(f"{op}: steps must hold at least one ConvStep, got none")
    check_4d_float(u, op, "u")
    for i, step in enumerate(steps):
        if not isinstance(step, ConvStep):
            raise TypeError(f"{op}: steps[{i}] must be a ConvStep, got {type(step).__name__}")
    first_weight, first_bias, first_padding = (None, None, 0) if first_conv is None else first_conv
    convs = [("first_conv[0]", first_weight)] if first_weight is not None else []
    convs += [(f"steps[{i}].conv_weight", s.conv_weight) for i, s in enumerate(steps)]
    channels = [u.shape[1]]
    for name, weight in convs:
        check_4d_float(weight, op, name)
        if weight.shape[1] != channels[-1]:
            raise ValueError(f"{op}: {name} must have {channels[-1]} input channels (the channels of its input), "
                             f"got shape {list(weight.shape)}")
        channels.append(weight.shape[0])
    if first_weight is None:
        _check_bn_relu(u, *steps[0][:4], steps[0].training or steps[0].running_mean is None, op)
    bn_channels = channels[1:-1] if first_weight is not None else channels[:-1]
    for i, (s, c) in enumerate(zip(steps, bn_channels, strict=True)):
        for name in ("weight", "bias", "running_mean", "running_var"):
            p = getattr(s, name)
            if p is not None and p.shape != (c,):
                raise ValueError(f"{op}: steps[{i}].{name} must be 1-D with {c} elements (the channels of its "
                                 f"BatchNorm's input), got shape {list(p.shape)}")
    device = u.device.type
    if torch.is_autocast_enabled(device):
        # as the Autocast kernel of bn_relu_conv2d: the convolutions in the low precision, BatchNorm in h_i's dtype
        def cast(t):
            return None if t is None else t.to(conv_dtype(t, u)[0])

        steps = [s._replace(conv_weight=cast(s.conv_weight), conv_bias=cast(s.conv_bias)) for s in steps]
        first_weight, first_bias = cast(first_weight), cast(first_bias)
    if not _ext.use_kernel("bn_relu_forward", u.device):
        h = u if first_weight is None else F.conv2d(u.to(first_weight.dtype), first_weight, first_bias,
                                                     padding=first_padding)
        for s in steps:
            r = reference.bn_relu(h, s.weight, s.bias, s.running_mean, s.running_var, s.training, s.momentum, s.eps)
            h = F.conv2d(r.to(s.conv_weight.dtype), s.conv_weight, s.conv_bias, padding=s.padding)
        return h
    meta = tuple((bool(s.training), float(s.momentum), float(s.eps), int(s.padding)) for s in steps)
    tensors = [t for s in steps for t in (s.weight, s.bias, s.running_mean, s.running_var, s.conv_weight, s.conv_bias)]
    return _BnReLUConvChain.apply(u, meta, int(first_padding), first_weight, first_bias, *tensors)
