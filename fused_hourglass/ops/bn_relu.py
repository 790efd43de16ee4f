"""`bn_relu(u, ...) = relu(batch_norm(u, ...))` as compiled ops, and the `BatchNormReLU2d` module.

Forward: one `bn_relu_forward` call computes the batch statistics in training (Welford partials merged with
Chan's formula, fp32 even for fp16/bf16 u), updates the running statistics in place, forms the per-channel
scale and shift, and writes r = relu(u·scale + shift). Its autograd kernel is C++ (csrc/ops/bn_relu.cpp), so a
training step runs no Python beyond this wrapper's argument checks. Backward recomputes r's mask from u instead
of saving r: `bn_relu_backward` gives the input gradient and the per-channel sums Σdz and Σdz·x̂ (the bias and
weight gradients) in one call. The parts are also ops of their own (`bn_stats`, `bn_relu_apply`,
`bn_relu_backward_reduce`, `bn_relu_backward_apply`), used where only some of the gradients are needed. Only u
and per-channel vectors are saved, about half of what eager BatchNorm2d + ReLU keep (u and r).

Per-channel vectors (mean, invstd, scale, shift, sums) are in the statistics dtype: float64 for float64 u,
float32 otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import _ext
from ..reference import ops as reference
from ._checks import check_4d_float, check_same_dtype_device, check_tensor
from .sync_bn import sync_active, sync_bn_relu

__all__ = ["bn_relu", "BatchNormReLU2d"]


def _stats_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _check_channel_vector(v: torch.Tensor, u: torch.Tensor, op: str, name: str) -> None:
    """The per-channel operands of the compiled ops (messages as ops/bn_relu.h's check_channel_vector)."""
    check_tensor(v, op, name)
    if v.dim() != 1 or v.shape[0] != u.shape[1]:
        raise ValueError(f"{op}: {name} must be 1-D with {u.shape[1]} elements (the channels of u), "
                         f"got shape {list(v.shape)}")
    if v.dtype != _stats_dtype(u):
        raise TypeError(f"{op}: {name} must be {_stats_dtype(u)} (the statistics dtype of {u.dtype} u), got {v.dtype}")
    if v.device != u.device:
        raise ValueError(f"{op}: {name} and u must be on the same device, got {name} on {v.device} and u on {u.device}")


def _check_backward(op: str, grad: torch.Tensor, u: torch.Tensor, **vectors: torch.Tensor) -> None:
    check_4d_float(grad, op, "grad")
    check_4d_float(u, op, "u")
    check_same_dtype_device(grad, "grad", u, "u", op)
    if grad.shape != u.shape:
        raise ValueError(f"{op}: grad and u must have the same shape, "
                         f"got grad {list(grad.shape)} and u {list(u.shape)}")
    for name, v in vectors.items():
        _check_channel_vector(v, u, op, name)


def _check_parameter(p: object, u: torch.Tensor, name: str, op: str) -> None:
    """weight, bias and the running statistics of `bn_relu`: a C-vector of u's dtype, or float32 for float16
    and bfloat16 u (the usual mixed-precision module; F.batch_norm accepts no other mix), on u's device."""
    check_tensor(p, op, name)
    if p.dim() != 1 or p.shape[0] != u.shape[1]:
        raise ValueError(f"{op}: {name} must be 1-D with {u.shape[1]} elements (the channels of u), "
                         f"got shape {list(p.shape)}")
    low_precision = u.dtype in (torch.float16, torch.bfloat16)
    if p.dtype != u.dtype and not (low_precision and p.dtype == torch.float32):
        raise TypeError(f"{op}: {name} must be {u.dtype} (u's dtype){' or torch.float32' if low_precision else ''}, "
                        f"got {p.dtype}")
    if p.device != u.device:
        raise ValueError(f"{op}: {name} and u must be on the same device, got {name} on {p.device} and u on {u.device}")


def _check_bn_relu(u: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   running_mean: torch.Tensor | None, running_var: torch.Tensor | None, batch_stats: bool,
                   op: str = "bn_relu") -> None:
    """The arguments of `bn_relu` (and, with op="bn_relu_forward", of the compiled op, with its messages)."""
    check_4d_float(u, op, "u")
    for name, p in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if p is not None:
            _check_parameter(p, u, name, op)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must be both given or both None, got "
                         f"running_mean {'None' if running_mean is None else 'a tensor'} and "
                         f"running_var {'None' if running_var is None else 'a tensor'}")
    if batch_stats and u.shape[0] * u.shape[2] * u.shape[3] == 1:
        # F.batch_norm's own message and exception type.
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {u.size()}")


def bn_relu(u: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
            momentum: float = 0.1, eps: float = 1e-5, *, process_group=None) -> torch.Tensor:
    """relu(F.batch_norm(u, running_mean, running_var, weight, bias, training, momentum, eps)).

    Args:
        u: [N, C, H, W] float64, float32, float16 or bfloat16.
        weight, bias: [C] of u's dtype (or float32 for float16/bfloat16 u), or None for no affine transform.
        running_mean, running_var: [C] buffers, or both None: then the batch statistics are used in both modes
            (nn.BatchNorm2d with track_running_stats=False).
        training: normalise with the batch statistics and update the running ones in place (running_var with
            the unbiased M/(M − 1) variance, M = N·H·W), as nn.BatchNorm2d; otherwise use the running ones.
            An empty batch (M = 0) gives an empty output and leaves the running statistics alone, as
            F.batch_norm does.
        process_group: a torch.distributed process group (`dist.group.WORLD` for the default one) whose processes'
            batches form one batch for the statistics in training (`sync_bn_relu`, as torch.nn.SyncBatchNorm);
            None (default), eval mode, or a group of one process: this process's batch alone.
    Returns:
        r: u's shape and dtype, in u's memory format. Differentiable in u, weight and bias; saves u, never r.
    """
    if process_group is not None and sync_active(process_group, training):
        return sync_bn_relu(u, weight, bias, running_mean, running_var, momentum, eps, process_group=process_group)
    batch_stats = training or running_mean is None
    _check_bn_relu(u, weight, bias, running_mean, running_var, batch_stats)
    if not _ext.use_kernel("bn_relu_forward", u.device):
        return reference.bn_relu(u, weight, bias, running_mean, running_var, training, momentum, eps)
    return torch.ops.fused_hourglass.bn_relu_forward.default(u, weight, bias, running_mean, running_var, training,
                                                             momentum, eps)[0]


class BatchNormReLU2d(nn.BatchNorm2d):
    """nn.BatchNorm2d followed by ReLU, through `bn_relu`. Same constructor, buffers and state_dict keys as
    nn.BatchNorm2d (so its checkpoints load unchanged); num_batches_tracked and momentum=None (cumulative
    average) behave as there."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return bn_relu(input, self.weight, self.bias, *module_statistics_arguments(self), self.eps)


def module_statistics_arguments(bn: nn.BatchNorm2d) -> tuple[torch.Tensor | None, torch.Tensor | None, bool, float]:
    """(running_mean, running_var, training, momentum) to pass to `bn_relu` for one forward of `bn`, counting
    the batch in num_batches_tracked as nn.BatchNorm2d.forward does (momentum=None: cumulative average)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not bn.training or bn.track_running_stats
    return (bn.running_mean if keep_running else None, bn.running_var if keep_running else None, batch_stats,
            factor)


if _ext.HAS_EXTENSION:

    def _vector(u: torch.Tensor) -> torch.Tensor:
        return torch.empty((u.shape[1],), dtype=_stats_dtype(u), device=u.device)

    @torch.library.register_fake("fused_hourglass::bn_stats")
    def _bn_stats_fake(u: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_4d_float(u, "bn_stats", "u")
        return _vector(u), _vector(u), _vector(u)

    @torch.library.register_fake("fused_hourglass::bn_relu_apply")
    def _bn_relu_apply_fake(u: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        op = "bn_relu_apply"
        check_4d_float(u, op, "u")
        _check_channel_vector(scale, u, op, "scale")
        _check_channel_vector(shift, u, op, "shift")
        return torch.empty(u.shape, dtype=u.dtype, device=u.device, memory_format=_ext.memory_format_of(u))

    @torch.library.register_fake("fused_hourglass::bn_relu_forward")
    def _bn_relu_forward_fake(u: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                              running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
                              momentum: float, eps: float):
        _check_bn_relu(u, weight, bias, running_mean, running_var, training or running_mean is None,
                       "bn_relu_forward")
        r = torch.empty(u.shape, dtype=u.dtype, device=u.device, memory_format=_ext.memory_format_of(u))
        return r, _vector(u), _vector(u), _vector(u), _vector(u)

    @torch.library.register_fake("fused_hourglass::bn_relu_backward")
    def _bn_relu_backward_fake(grad: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                               mean: torch.Tensor, invstd: torch.Tensor):
        _check_backward("bn_relu_backward", grad, u, scale=scale, shift=shift, mean=mean, invstd=invstd)
        du = torch.empty(u.shape, dtype=u.dtype, device=u.device, memory_format=_ext.memory_format_of(u))
        return du, _vector(u), _vector(u)

    @torch.library.register_fake("fused_hourglass::bn_relu_backward_reduce")
    def _bn_relu_backward_reduce_fake(grad: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                                      mean: torch.Tensor, invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_backward("bn_relu_backward_reduce", grad, u, scale=scale, shift=shift, mean=mean, invstd=invstd)
        return _vector(u), _vector(u)

    @torch.library.register_fake("fused_hourglass::bn_relu_backward_apply")
    def _bn_relu_backward_apply_fake(grad: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                                     mean: torch.Tensor | None, invstd: torch.Tensor | None,
                                     sum_dz: torch.Tensor | None, sum_dz_xhat: torch.Tensor | None) -> torch.Tensor:
        op = "bn_relu_backward_apply"
        training = {mean is not None, invstd is not None, sum_dz is not None, sum_dz_xhat is not None}
        if len(training) != 1:
            raise ValueError(f"{op}: mean, invstd, sum_dz and sum_dz_xhat must be all given (training) "
                             "or all None (eval)")
        if mean is not None:
            _check_backward(op, grad, u, scale=scale, shift=shift, mean=mean, invstd=invstd, sum_dz=sum_dz,
                            sum_dz_xhat=sum_dz_xhat)
        else:
            _check_backward(op, grad, u, scale=scale, shift=shift)
        return torch.empty(u.shape, dtype=u.dtype, device=u.device, memory_format=_ext.memory_format_of(u))
