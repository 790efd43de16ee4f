"""BatchNorm + ReLU (and the convolution after it) with the batch statistics of every process in a group, as
torch.nn.SyncBatchNorm computes them, for training with torch.distributed; on CPU (gloo) as well as CUDA (NCCL).

Only per-channel partials travel, never activations:

- forward, one all-reduce per layer: each process computes its statistics with the compiled `bn_stats` kernel (or
  torch.var_mean on the reference path) and contributes the float64 vector [M, Σu, M2 + M·mean²] of 2C + 1
  elements (M: its values per channel, 0 for an empty share); the sum gives the global count, mean and biased
  variance (M2 = Σ(M2 + M·mean²) − (Σu)²/M_total, exact in float64 for any |mean|/std a float32 activation can
  show). The counts travel with the partials, so uneven shares (3 and 1 images) are weighted correctly.
- backward, one all-reduce per layer: the [Σdz, Σdz·x̂] partials of `bn_relu_backward_reduce` (2C float32 or float64
  elements); the input gradient uses the global sums, the BatchNorm weight and bias gradients are the local sums
  (DistributedDataParallel's gradient average then gives the gradient of the mean loss, as with SyncBatchNorm).

Collectives are issued in the same order on every process (forward order, then reverse order in backward), on the
group given, so they interleave safely with DistributedDataParallel's own gradient all-reduces. In eval mode, or
with a group of one process, these ops are plain `bn_relu` / `bn_relu_conv2d`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .. import _ext
from ._checks import check_4d_float

__all__ = ["sync_active", "sync_bn_relu", "sync_bn_relu_conv2d", "collective_bytes"]


def sync_active(process_group: Any, training: bool) -> bool:
    """Whether a training-mode BatchNorm over `process_group` must reduce across processes: a group is given (or
    the default one, `dist.group.WORLD`), torch.distributed is initialised, and the group has more than one
    process."""
    if process_group is None or not training or not dist.is_available() or not dist.is_initialized():
        return False
    return dist.get_world_size(process_group) > 1


def _stats_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _kernels(u: torch.Tensor, use_kernels: bool) -> bool:
    return use_kernels and _ext.has_kernel("bn_stats", u.device.type) and _ext.has_kernel("bn_relu_apply",
                                                                                            u.device.type)


def _bcast(v: torch.Tensor) -> torch.Tensor:
    return v[None, :, None, None]


class _SyncBnReLUConv(torch.autograd.Function):
    """r = relu(batch_norm(u) with the group's statistics); out = conv2d(r) when conv_weight is given, else r.
    Saves u and per-channel vectors; r is recomputed in backward for the convolution's weight gradient."""

    @staticmethod
    def forward(ctx, u, weight, bias, running_mean, running_var, momentum, eps, conv_weight, conv_bias, padding,
                group, use_kernels):
        sd = _stats_dtype(u)
        channels = u.shape[1]
        m_local = u.numel() // channels if channels else 0
        kernels = _kernels(u, use_kernels)
        if m_local == 0:
            mean = torch.zeros(channels, dtype=sd, device=u.device)
            var = torch.zeros_like(mean)
        elif kernels:
            mean, var, _ = torch.ops.fused_hourglass.bn_stats.default(u, eps)
        else:
            # accumulated in float64, as ATen's CPU batch_norm accumulates float32
            var, mean = torch.var_mean(u.double(), dim=(0, 2, 3), correction=0)
        m = float(m_local)
        partials = torch.cat([torch.full((1,), m, dtype=torch.float64, device=u.device), mean.double() * m,
                              (var.double() + mean.double() ** 2) * m])
        dist.all_reduce(partials, group=group)
        m_total = float(partials[0].item())
        if m_total <= 1:
            # F.batch_norm's own message and exception type, for the group's batch.
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {u.size()} on "
                             f"this process and {int(m_total)} values per channel over the process group")
        s1, s2 = partials[1:1 + channels], partials[1 + channels:]
        g_mean = s1 / m_total
        g_var = ((s2 - s1 * g_mean) / m_total).clamp_min(0.0)
        mean, var = g_mean.to(sd), g_var.to(sd)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else weight.to(sd) * invstd
        shift = -mean * scale if bias is None else bias.to(sd) - mean * scale
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = g_var * (m_total / (m_total - 1.0))
                running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        r = _apply(u, scale, shift, kernels)
        if conv_weight is None:
            out = r
        else:
            # the convolution in conv_weight's dtype (the wrapper cast it to autocast's), r rounded to it
            with torch.autocast(u.device.type, enabled=False):
                out = torch.nn.functional.conv2d(r.to(conv_weight.dtype), conv_weight, conv_bias, padding=padding)
        ctx.save_for_backward(u, scale, shift, mean, invstd, conv_weight)
        ctx.meta = (m_local, m_total, group, kernels, padding, conv_bias is not None,
                    None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        u, scale, shift, mean, invstd, conv_weight = ctx.saved_tensors
        m_local, m_total, group, kernels, padding, has_conv_bias, weight_dtype, bias_dtype = ctx.meta
        need_u, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dcw = dcb = None
        if conv_weight is not None:
            r = _apply(u, scale, shift, kernels).to(conv_weight.dtype)
            grad = grad.to(conv_weight.dtype).contiguous(memory_format=_ext.memory_format_of(r))
            bias_sizes = [conv_weight.shape[0]] if has_conv_bias else None
            mask = [need_u or need_w or need_b, ctx.needs_input_grad[7], has_conv_bias and ctx.needs_input_grad[8]]
            dr, dcw, dcb = torch.ops.aten.convolution_backward(grad, r, conv_weight, bias_sizes, [1, 1],
                                                               [padding, padding], [1, 1], False, [0, 0], 1, mask)
            del r
            dr = dr.to(u.dtype) if dr is not None else dr
        else:
            dr = grad
        du = dw = db = None
        if need_u or need_w or need_b:
            if kernels and m_local:
                sum_dz, sum_dz_xhat = torch.ops.fused_hourglass.bn_relu_backward_reduce.default(
                    dr, u, scale, shift, mean, invstd)
            else:
                dz, xhat = _dz_xhat(dr, u, scale, shift, mean, invstd)
                sum_dz = dz.sum(dim=(0, 2, 3)).to(scale.dtype)
                sum_dz_xhat = (dz * xhat).sum(dim=(0, 2, 3)).to(scale.dtype)
            dw = None if not need_w else sum_dz_xhat.to(weight_dtype)
            db = None if not need_b else sum_dz.to(bias_dtype)
            if need_u:
                sums = torch.cat([sum_dz, sum_dz_xhat])
                dist.all_reduce(sums, group=group)
                g_dz, g_dz_xhat = sums.chunk(2)
                if m_local == 0:
                    du = torch.zeros_like(u)
                elif kernels:
                    # the kernel divides by its own M: hand it the global sums scaled by M_local / M_total
                    f = m_local / m_total
                    du = torch.ops.fused_hourglass.bn_relu_backward_apply.default(dr, u, scale, shift, mean, invstd,
                                                                                  g_dz * f, g_dz_xhat * f)
                else:
                    dz, xhat = _dz_xhat(dr, u, scale, shift, mean, invstd)
                    g_dz, g_dz_xhat = g_dz.double(), g_dz_xhat.double()
                    du = (_bcast(scale.double()) * (dz - _bcast(g_dz / m_total) - xhat * _bcast(g_dz_xhat / m_total)))
                    du = du.to(u.dtype).contiguous(memory_format=_ext.memory_format_of(u))
        return du, dw, db, None, None, None, None, dcw, dcb, None, None, None


def _apply(u: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, kernels: bool) -> torch.Tensor:
    if kernels and u.numel():
        return torch.ops.fused_hourglass.bn_relu_apply.default(u, scale, shift)
    r = torch.relu(u.to(scale.dtype) * _bcast(scale) + _bcast(shift)).to(u.dtype)
    return r.contiguous(memory_format=_ext.memory_format_of(u))


def _dz_xhat(dr, u, scale, shift, mean, invstd):
    """dz = dr·[r > 0] (r = relu(u·scale + shift), formed as the forward formed it) and x̂, in float64: the
    reference path accumulates as ATen's CPU batch_norm does for float32 (in double)."""
    r = _apply(u, scale, shift, False)
    dz = torch.where(r > 0, dr.double(), torch.zeros((), dtype=torch.float64, device=u.device))
    return dz, (u.double() - _bcast(mean.double())) * _bcast(invstd.double())


def _check(u, weight, bias, running_mean, running_var, op):
    from .bn_relu import _check_parameter

    check_4d_float(u, op, "u")
    for name, p in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if p is not None:
            _check_parameter(p, u, name, op)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must be both given or both None")


def sync_bn_relu(u: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float = 0.1,
                 eps: float = 1e-5, *, process_group: Any = None, use_kernels: bool = True) -> torch.Tensor:
    """Training-mode relu(batch_norm(u)) with the statistics of every process of `process_group` (None: the
    default group). Arguments as `bn_relu`; `use_kernels=False` computes the same with plain PyTorch ops (the
    reference backend's path). Every process of the group must call it, in the same order."""
    _check(u, weight, bias, running_mean, running_var, "sync_bn_relu")
    group = dist.group.WORLD if process_group is None else process_group
    return _SyncBnReLUConv.apply(u, weight, bias, running_mean, running_var, momentum, eps, None, None, 0, group,
                                 use_kernels)


def sync_bn_relu_conv2d(u: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float,
                        eps: float, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, padding: int = 0, *,
                        process_group: Any = None, use_kernels: bool = True) -> torch.Tensor:
    """conv2d(sync_bn_relu(u, ...)): the pre-activation step of the Residual with synchronised statistics, saving
    u (not the convolution's input) as `bn_relu_conv2d` does."""
    op = "sync_bn_relu_conv2d"
    _check(u, weight, bias, running_mean, running_var, op)
    check_4d_float(conv_weight, op, "conv_weight")
    if conv_weight.shape[1] != u.shape[1]:
        raise ValueError(f"{op}: conv_weight must have {u.shape[1]} input channels (the channels of u), "
                         f"got shape {list(conv_weight.shape)}")
    group = dist.group.WORLD if process_group is None else process_group
    device = u.device.type
    if torch.is_autocast_enabled(device):
        # as autocast's conv2d: the convolution in the low precision, BatchNorm in u's dtype
        low = torch.get_autocast_dtype(device)
        conv_weight = conv_weight.to(low)
        conv_bias = None if conv_bias is None else conv_bias.to(low)
    return _SyncBnReLUConv.apply(u, weight, bias, running_mean, running_var, momentum, eps, conv_weight, conv_bias,
                                 padding, group, use_kernels)


def collective_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Collectives and bytes per training step that synchronised BatchNorm adds to `model` (per process, from the
    module structure alone): one all-reduce of (2C + 1) float64 values per BatchNorm in the forward, one of 2C
    statistics-dtype values in the backward."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    stats_bytes = 8 if next(model.parameters()).dtype == torch.float64 else 4
    forward = sum((2 * m.num_features + 1) * 8 for m in layers)
    backward = sum(2 * m.num_features * stats_bytes for m in layers)
    return {"layers": len(layers), "collectives": 2 * len(layers), "forward_bytes": forward,
            "backward_bytes": backward, "bytes": forward + backward}
