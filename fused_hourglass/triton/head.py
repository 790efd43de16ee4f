"""A stack's head on the Triton chain: the feature convolution, its BatchNorm-ReLU, the prediction and the merge
(DESIGN.md §1.5), with the feature tensor r = relu(bn(conv(h))) never written.

Forward, training mode (M = N·H·W; h is the features Residual's output, x the stack's input):
    y      = conv_f 1×1 (h)                          [epilogue: stats(y) → bn's scale/shift, running stats]
    preds  = outs 1×1 (relu(bn(y)))                  [bn prologue]
    t      = merge_preds 1×1 (preds) + x             [residual epilogue]
    x_next = merge_features 1×1 (relu(bn(y))) + t    [bn prologue, residual epilogue, stats(x_next) for the next
                                                      hourglass's up1]
the last stack stops after preds. Saved for backward: h, y (before its BN), preds and per-channel vectors.
Backward: the gradients reaching r from outs and merge_features are one dgrad of their concatenated weights over the
concatenated output gradients (ReLU mask and BN reductions in its epilogue) and one wgrad (r recomputed from y),
then the BN apply pass and conv_f's dgrad and wgrad; merge_preds' dgrad joins the prediction's own gradient. The
stack input's gradient is the merge's identity.
"""

from __future__ import annotations

import torch

from ..reference.model import Conv
from . import conv_kernels as ck
from .residual import _bn_affine, _check_device, _uses_batch_stats, stash_stats

__all__ = ["FusedHeadFunction", "fused_head"]

_ops = torch.ops.fused_hourglass


class FusedHeadFunction(torch.autograd.Function):
    """(preds, x_next, Σ, M2) on NHWC-contiguous tensors, or (preds,) for the last stack (x None); differentiable in
    h, x and every parameter. emit_stats: also return x_next's statistics partials from merge_features' epilogue
    (else two empty tensors); they are not differentiable. Inputs after the non-tensor ones are the parameters in
    `_params` order."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, x: torch.Tensor | None, emit_stats: bool, feature: Conv, outs: Conv,
                merge_preds: Conv | None, merge_features: Conv | None, *params: torch.Tensor):
        n, hh, ww, _ = h.shape
        m = n * hh * ww
        dt = h.dtype
        convs = [feature.conv, outs.conv] + ([merge_preds.conv, merge_features.conv] if x is not None else [])
        weights = [c.weight.detach().to(dt) for c in convs]
        biases = [c.bias.detach().float() for c in convs]
        bn = feature.bn
        batch = _uses_batch_stats(bn)
        y, psum, pm2 = _ops.conv1x1_bnrelu(h, None, None, weights[0], biases[0], None, None, batch)
        s = _bn_affine(bn, (psum, pm2) if batch else None, m)
        preds = _ops.conv1x1_bnrelu(y, s[0], s[1], weights[1], biases[1], None, None, False)[0]
        gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(s[0])
        ctx.save_for_backward(h, y, preds, *weights, *s, gamma)
        ctx.batch = batch
        ctx.param_dtypes = [p.dtype for p in params]
        if x is None:
            return (preds,)
        t = _ops.conv1x1_bnrelu(preds, None, None, weights[2], biases[2], x, None, False)[0]
        x_next, out_sum, out_m2 = _ops.conv1x1_bnrelu(y, s[0], s[1], weights[3], biases[3], t, None, emit_stats)
        ctx.mark_non_differentiable(out_sum, out_m2)
        return preds, x_next, out_sum, out_m2

    @staticmethod
    def backward(ctx, g_preds: torch.Tensor, *rest: torch.Tensor):
        h, y, preds, *weights = ctx.saved_tensors
        weights, (scale, shift, mean, invstd, gamma) = weights[:-5], weights[-5:]
        merge = len(weights) == 4
        needs = ctx.needs_input_grad
        # needs: h, x, emit_stats, the four modules, then conv_f (w, b), bn (γ, β), outs (w, b) and, with the merge,
        # merge_preds (w, b), merge_features (w, b)
        flags = needs[7:] + (False,) * (10 - len(needs[7:]))
        want = dict(zip(("wf", "bf", "gamma", "beta", "wo", "bo", "wmp", "bmp", "wmf", "bmf"), flags, strict=True))
        n, hh, ww, _ = h.shape
        m = n * hh * ww
        dy = g_preds.contiguous()
        w_heads = weights[1]
        dwmp = dbmp = None
        g_x = rest[0].contiguous() if merge else None
        if merge:
            if want["wmp"] or want["bmp"]:
                dwmp, dbmp = _ops.conv_bnrelu_wgrad(preds, None, None, g_x, 1)
            dy = dy + _ops.conv_bnrelu_dgrad(g_x, weights[2], preds, None, None, None, None)[0]
            # outs and merge_features both read r: one dgrad / wgrad over their concatenated output channels.
            dy = torch.cat([dy, g_x], dim=3)
            w_heads = torch.cat([weights[1], weights[3]])
        dwo = dbo = dwmf = dbmf = None
        if any(want[k] for k in ("wo", "bo", "wmf", "bmf")):
            dw, db = _ops.conv_bnrelu_wgrad(y, scale, shift, dy, 1)
            oup = weights[1].shape[0]
            dwo, dbo, dwmf, dbmf = dw[:oup], db[:oup], dw[oup:], db[oup:]
        dgamma = dbeta = dwf = dbf = dh = None
        if needs[0] or want["wf"] or want["bf"] or want["gamma"] or want["beta"]:
            dz, psum, pdot = _ops.conv_bnrelu_dgrad(dy, w_heads, y, scale, shift, mean, invstd)
            dbeta, dgamma = psum.sum(0), pdot.sum(0)
            if needs[0] or want["wf"] or want["bf"]:
                a, b, c = ck.bn_backward_coefficients(gamma, mean, invstd, dbeta, dgamma, m, ctx.batch)
                du = _ops.bn_backward_apply(dz, y, mean, a, b, c, None)
                if needs[0]:
                    dh = _ops.conv_bnrelu_dgrad(du, weights[0], h, None, None, None, None)[0]
                if want["wf"] or want["bf"]:
                    dwf, dbf = _ops.conv_bnrelu_wgrad(h, None, None, du, 1)
        grads = [dwf, dbf, dgamma, dbeta, dwo, dbo] + ([dwmp, dbmp, dwmf, dbmf] if merge else [])
        grads = [None if gr is None or not wanted else gr.to(dtype)
                 for gr, dtype, wanted in zip(grads, ctx.param_dtypes, needs[7:], strict=True)]
        dx = g_x if merge and needs[1] else None
        return (dh, dx, None, None, None, None, None, *grads)


def _params(feature: Conv, outs: Conv, merge_preds: Conv | None, merge_features: Conv | None) -> list[torch.Tensor]:
    bn = feature.bn
    if bn is None or feature.relu is None or bn.weight is None:
        raise ValueError("fused_head: the feature Conv must have an affine BatchNorm and a ReLU")
    out = [feature.conv.weight, feature.conv.bias, bn.weight, bn.bias, outs.conv.weight, outs.conv.bias]
    if merge_preds is not None:
        out += [merge_preds.conv.weight, merge_preds.conv.bias, merge_features.conv.weight, merge_features.conv.bias]
    return out


def fused_head(h: torch.Tensor, feature: Conv, outs: Conv, x: torch.Tensor | None = None,
               merge_preds: Conv | None = None, merge_features: Conv | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(preds, x_next) of one stack through the fused Triton kernels: preds = outs(feature(h)) and, when x is given,
    x_next = x + merge_preds(preds) + merge_features(feature(h)); same values, running-statistics updates and
    gradients as the reference modules.

    Args:
        h: [N, C, H, W], the stack's features Residual output; channels_last avoids a copy. Under autocast the head
            runs in the autocast dtype.
        feature: the stack's `Conv(C, C, 1, bn=True, relu=True)`; outs: its `Conv(C, P, 1, relu=False)`.
        x: [N, C, H, W], the stack's input, or None for the last stack (then x_next is None).
        merge_preds, merge_features: the merges' 1×1 `Conv`s (`Merge.conv`), with x.
    Returns:
        preds [N, P, H, W] and x_next [N, C, H, W] (or None), channels_last. In training x_next carries its
        statistics for the next hourglass's first block, as a fused Residual's output does.
    """
    _check_device(h)
    if (x is None) != (merge_preds is None) or (x is None) != (merge_features is None):
        raise ValueError("fused_head: x, merge_preds and merge_features must be given together or all omitted")
    c = feature.conv.in_channels
    for name, t in (("h", h), ("x", x)):
        if t is not None and (t.dim() != 4 or t.shape[1] != c or t.shape != h.shape):
            raise ValueError(f"fused_head: {name} must be [N, {c}, H, W] like h {list(h.shape)}, got {list(t.shape)}")
    if torch.is_autocast_enabled(h.device.type):
        dt = torch.get_autocast_dtype(h.device.type)
        h = h.to(dt)
        x = None if x is None else x.to(dt)
    elif x is not None:
        x = x.to(h.dtype)
    h_nhwc = h.permute(0, 2, 3, 1).contiguous()
    x_nhwc = None if x is None else x.permute(0, 2, 3, 1).contiguous()
    emit = (x is not None and _uses_batch_stats(feature.bn) and not torch.compiler.is_compiling()
            and not torch.is_inference_mode_enabled())
    out = FusedHeadFunction.apply(h_nhwc, x_nhwc, emit, feature, outs, merge_preds, merge_features,
                                  *_params(feature, outs, merge_preds, merge_features))
    preds = out[0].permute(0, 3, 1, 2)
    if x is None:
        return preds, None
    x_next = out[1].permute(0, 3, 1, 2)
    if emit:
        stash_stats(x_next, out[2], out[3])
    return preds, x_next
