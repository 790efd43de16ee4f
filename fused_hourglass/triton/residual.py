"""The fused residual block: the reference `Residual` (DESIGN.md §1.2) as three BN-ReLU-prologue convs.

Forward, training mode (M = N·H·W):
    stats(x) [or the previous block's conv3 epilogue statistics] → bn1 → conv1 1×1 [epilogue: stats(y1)] → bn2 →
    conv2 3×3 [stats(y2)] → bn3 → conv3 1×1 [epilogue: + skip (+ up2x(low)), stats(out) for the next block's bn1]
where each "bnK" is only a finalize of per-tile partials into scale/shift (and the running-stats update); the
normalised, rectified tensors are never written. Saved for backward: x, y1, y2 (conv outputs before their BN)
and per-channel vectors. Backward runs, per conv from the last: dgrad (ReLU mask and BN reductions in its
epilogue) and wgrad (prologue recomputed), then one elementwise pass for the BN input gradient; only the kernels
`needs_input_grad` asks for (no wgrad for a frozen conv, no dgrad into an input or a stage that needs no gradient).
"""

from __future__ import annotations

import torch
from torch import nn

from ..reference.model import Residual
from . import conv_kernels as ck

__all__ = ["FusedResidualFunction", "FusedResidual", "fused_residual"]

_ops = torch.ops.fused_hourglass


def _bn_affine(bn: nn.BatchNorm2d, batch_stats: tuple[torch.Tensor, torch.Tensor] | None, m: int):
    """(scale, shift, mean, invstd) of a BN: from batch partials (and a running-stats update) when given, else
    from the running statistics (eval)."""
    if batch_stats is not None:
        return ck.finalize_stats(*batch_stats, m, bn)
    return ck.affine_from_stats(bn.running_mean, bn.running_var, bn)


def _uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or bn.running_mean is None


class FusedResidualFunction(torch.autograd.Function):
    """(out, Σ, M2) with out = Residual(x) [+ up2x(low)] on NHWC-contiguous tensors; differentiable in x, low and
    every parameter.

    x_stats: bn1's statistics partials of x (`channel_stats(x)`, e.g. from the conv3 epilogue of the block that
    wrote x), or None to compute them. emit_stats: also return out's partials from this conv3's epilogue (else
    two empty tensors); they are not differentiable. Inputs after the non-tensor ones are the parameters in
    `_params(block)` order.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, low: torch.Tensor | None, x_stats: tuple[torch.Tensor, torch.Tensor] | None,
                emit_stats: bool, block: Residual, *params: torch.Tensor):
        n, h, w, _ = x.shape
        m = n * h * w
        dt = x.dtype
        bn1, bn2, bn3 = block.bn1, block.bn2, block.bn3
        w1, w2, w3, ws = (conv.conv.weight.detach().to(dt) for conv in (block.conv1, block.conv2, block.conv3,
                                                                       block.skip_layer))
        b1, b2, b3, bs = (conv.conv.bias.detach().float() for conv in (block.conv1, block.conv2, block.conv3,
                                                                      block.skip_layer))
        batch = [_uses_batch_stats(bn) for bn in (bn1, bn2, bn3)]

        if batch[0] and x_stats is None:
            x_stats = _ops.channel_stats(x)
        s1 = _bn_affine(bn1, x_stats if batch[0] else None, m)
        y1, psum, pm2 = _ops.conv1x1_bnrelu(x, s1[0], s1[1], w1, b1, None, None, batch[1])
        s2 = _bn_affine(bn2, (psum, pm2) if batch[1] else None, m)
        y2, psum, pm2 = _ops.conv3x3_bnrelu(y1, s2[0], s2[1], w2, b2, None, None, batch[2])
        s3 = _bn_affine(bn3, (psum, pm2) if batch[2] else None, m)
        skip = _ops.conv1x1_bnrelu(x, None, None, ws, bs, None, None, False)[0] if block.need_skip else x
        out, out_sum, out_m2 = _ops.conv1x1_bnrelu(y2, s3[0], s3[1], w3, b3, skip, low, emit_stats)
        ctx.mark_non_differentiable(out_sum, out_m2)

        gammas = [bn.weight.detach().float() if bn.weight is not None else torch.ones_like(s[0])
                  for bn, s in ((bn1, s1), (bn2, s2), (bn3, s3))]
        ctx.save_for_backward(x, y1, y2, w1, w2, w3, ws, *s1, *s2, *s3, *gammas)
        ctx.batch = batch
        ctx.need_skip = block.need_skip
        ctx.has_low = low is not None
        ctx.param_dtypes = [p.dtype for p in params]
        return out, out_sum, out_m2

    @staticmethod
    def backward(ctx, g: torch.Tensor, _sum_grad: None, _m2_grad: None):
        x, y1, y2, w1, w2, w3, ws, *rest = ctx.saved_tensors
        s1, s2, s3, gammas = rest[0:4], rest[4:8], rest[8:12], rest[12:15]
        g = g.contiguous()
        n, h, w, _ = x.shape
        m = n * h * w
        need = _GradsNeeded(ctx.needs_input_grad, ctx.need_skip)

        def bn_conv_backward(dy, weight, u, s, gamma, batch, extra, want_du, want_bn, want_w):
            """Gradients through relu(bn(u)) → conv: (du, dW, dbias, dγ, dβ), each None when not wanted. The dgrad
            runs when du or the BN's parameters are wanted (its epilogue reduces Σdz, Σdz·x̂), the wgrad when the
            conv's weight or bias is, and the apply pass only for du."""
            du = dw = db = dgamma = dbeta = None
            if want_du or want_bn:
                dz, psum, pdot = _ops.conv_bnrelu_dgrad(dy, weight, u, *s)
                dbeta, dgamma = psum.sum(0), pdot.sum(0)
                if want_du:
                    a, b, c = ck.bn_backward_coefficients(gamma, s[2], s[3], dbeta, dgamma, m, batch)
                    du = _ops.bn_backward_apply(dz, u, s[2], a, b, c, extra)
            if want_w:
                dw, db = _ops.conv_bnrelu_wgrad(u, s[0], s[1], dy, weight.shape[-1])
            return du, dw, db, dgamma, dbeta

        dy2, dw3, db3, dg3, dbeta3 = bn_conv_backward(g, w3, y2, s3, gammas[2], ctx.batch[2], None, need.dy2,
                                                      need.bn3, need.conv3)
        dy1, dw2, db2, dg2, dbeta2 = bn_conv_backward(dy2, w2, y1, s2, gammas[1], ctx.batch[1], None, need.dy1,
                                                      need.bn2, need.conv2) if need.dy2 else (None,) * 5
        dx_skip = dws = dbs = None
        if ctx.need_skip:
            if need.x:
                dx_skip = _ops.conv_bnrelu_dgrad(g, ws, x, None, None, None, None)[0]
            if need.skip:
                dws, dbs = _ops.conv_bnrelu_wgrad(x, None, None, g, 1)
        elif need.x:
            dx_skip = g
        dx, dw1, db1, dg1, dbeta1 = bn_conv_backward(dy1, w1, x, s1, gammas[0], ctx.batch[0], dx_skip, need.x,
                                                     need.bn1, need.conv1) if need.dy1 else (None,) * 5
        dlow = _ops.sum_pool2x2_nhwc(g) if ctx.has_low and ctx.needs_input_grad[1] else None
        grads = [dg1, dbeta1, dw1, db1, dg2, dbeta2, dw2, db2, dg3, dbeta3, dw3, db3, dws, dbs]
        grads = [None if gr is None or not wanted else gr.to(dtype)
                 for gr, dtype, wanted in zip(grads, ctx.param_dtypes, ctx.needs_input_grad[5:], strict=True)]
        return (dx, dlow, None, None, None, *grads)


class _GradsNeeded:
    """Which backward kernels a call needs, from `needs_input_grad` of (x, low, x_stats, emit_stats, block, γ1, β1,
    w1, b1, γ2, β2, w2, b2, γ3, β3, w3, b3, w_skip, b_skip): a frozen conv gets no wgrad, an input that needs no
    gradient no dgrad, and a stage whose inputs need nothing upstream is not differentiated at all."""

    def __init__(self, needs: tuple[bool, ...], need_skip: bool) -> None:
        params = needs[5:]
        self.x = needs[0]
        self.bn1, self.conv1 = any(params[0:2]), any(params[2:4])
        self.bn2, self.conv2 = any(params[4:6]), any(params[6:8])
        self.bn3, self.conv3 = any(params[8:10]), any(params[10:12])
        self.skip = need_skip and any(params[12:14])
        self.dy1 = self.x or self.bn1 or self.conv1  # the gradient of conv1's output
        self.dy2 = self.dy1 or self.bn2 or self.conv2  # of conv2's output


def _params(block: Residual) -> list[torch.Tensor]:
    """The block's parameters in FusedResidualFunction's order; BN without affine contributes fresh constants."""
    out = []
    for bn, conv in ((block.bn1, block.conv1), (block.bn2, block.conv2), (block.bn3, block.conv3)):
        if bn.weight is None:
            raise ValueError("fused_residual: BatchNorm layers must be affine (weight and bias), as in Residual")
        out += [bn.weight, bn.bias, conv.conv.weight, conv.conv.bias]
    return out + [block.skip_layer.conv.weight, block.skip_layer.conv.bias]


def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not ck.INTERPRET:
        raise RuntimeError(f"fused_residual: the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for CPU "
                           f"tensors), got a tensor on {x.device}")


# A fused block's output carries its conv3 epilogue's statistics partials here, for the next block's bn1: keyed by
# the very tensor object returned, checked against its version counter (no in-place change since), its dtype and
# the statistics tile, and taken (removed) by the first block that reads it.
_STATS_ATTR = "_fused_hourglass_batch_stats"


def _take_stats(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The partials `channel_stats(x)` would give, when x came straight from a fused block's conv3; else None."""
    stashed = x.__dict__.pop(_STATS_ATTR, None)
    if stashed is None or x.is_inference():
        return None
    version, dtype, block_m, psum, pm2 = stashed
    if x._version != version or x.dtype != dtype or block_m != ck.STATS_BLOCK_M or psum.shape[0] != ck.stats_tiles(m):
        return None
    return psum, pm2


def stash_stats(out: torch.Tensor, psum: torch.Tensor, pm2: torch.Tensor) -> None:
    """Attach the statistics partials of `out` (from the epilogue that wrote it) for the next block's bn1."""
    setattr(out, _STATS_ATTR, (out._version, out.dtype, ck.STATS_BLOCK_M, psum, pm2))


def fused_residual(block: Residual, x: torch.Tensor, low: torch.Tensor | None = None) -> torch.Tensor:
    """`block(x)` (+ nearest_up2x(low)) through the fused Triton kernels; same values, running-stat updates and
    gradients as the reference module.

    Args:
        block: a reference `Residual` (its parameters, buffers and train/eval mode are used).
        x: [N, C_in, H, W]; channels_last avoids a copy. Under autocast the block runs in the autocast dtype.
            When x is the unchanged output of another `fused_residual` in training, bn1 takes its statistics
            from that block's conv3 epilogue instead of a pass over x.
        low: optional [N, C_out, H/2, W/2], added nearest-upsampled in conv3's epilogue (the hourglass merge).
    Returns:
        [N, C_out, H, W] in channels_last memory format.
    """
    _check_device(x)
    if x.dim() != 4 or x.shape[1] != block.bn1.num_features:
        raise ValueError(f"fused_residual: x must be [N, {block.bn1.num_features}, H, W], got {list(x.shape)}")
    chain = _uses_batch_stats(block.bn1) and not torch.compiler.is_compiling()
    source = x
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    x_stats = _take_stats(source, x.shape[0] * x.shape[2] * x.shape[3]) if chain and x is source else None
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    low_nhwc = None
    if low is not None:
        low_nhwc = low.to(x.dtype).permute(0, 2, 3, 1).contiguous()
    emit = chain and not torch.is_inference_mode_enabled()
    out, psum, pm2 = FusedResidualFunction.apply(x_nhwc, low_nhwc, x_stats, emit, block, *_params(block))
    out = out.permute(0, 3, 1, 2)
    if emit:
        stash_stats(out, psum, pm2)
    return out


class FusedResidual(Residual):
    """Drop-in `Residual` (same parameters, buffers and state-dict keys) whose forward runs the fused kernels;
    `forward(x, low)` also folds the hourglass merge `+ up2x(low)` into the last conv."""

    def forward(self, x: torch.Tensor, low: torch.Tensor | None = None) -> torch.Tensor:
        return fused_residual(self, x, low)
