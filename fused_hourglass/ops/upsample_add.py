"""`upsample_add(low, skip) = skip + nearest_upsample_2x(low)`: the hourglass merge `up1 + up2(low3)`.

Forward reads skip and low once and writes the output once (2.25 bytes moved per output byte, against 3.25
for interpolate-then-add). Backward saves nothing: grad_skip is the incoming gradient and grad_low its 2×2
sum-pool, itself a compiled op (`sum_pool2x2`).
"""

from __future__ import annotations

import torch

from .. import _ext
from ..reference import ops as reference
from ._checks import check_4d_float, check_same_dtype_device

__all__ = ["upsample_add", "sum_pool2x2"]


def _check_upsample_add(low: torch.Tensor, skip: torch.Tensor) -> None:
    op = "upsample_add"
    check_4d_float(low, op, "low")
    check_4d_float(skip, op, "skip")
    check_same_dtype_device(low, "low", skip, "skip", op)
    if low.shape[0] != skip.shape[0] or low.shape[1] != skip.shape[1]:
        raise ValueError(f"{op}: low and skip must have the same batch size and channel count, "
                         f"got skip {list(skip.shape)} and low {list(low.shape)}")
    if skip.shape[2] != 2 * low.shape[2] or skip.shape[3] != 2 * low.shape[3]:
        raise ValueError(f"{op}: skip must be exactly 2× low in H and W, "
                         f"got skip {list(skip.shape)} and low {list(low.shape)}")


def _check_sum_pool2x2(grad: torch.Tensor) -> None:
    check_4d_float(grad, "sum_pool2x2", "grad")
    if grad.shape[2] % 2 or grad.shape[3] % 2:
        raise ValueError(f"sum_pool2x2: grad must have even H and W, got shape {list(grad.shape)}")


def upsample_add(low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """skip + nearest_upsample_2x(low).

    Args:
        low: [N, C, h, w] floating tensor.
        skip: [N, C, 2h, 2w], same dtype and device as `low`.
    Returns:
        [N, C, 2h, 2w] in skip's memory format (channels_last if skip is channels_last).
    """
    tensors = isinstance(low, torch.Tensor) and isinstance(skip, torch.Tensor)
    if tensors and _ext.use_kernel("upsample_add", skip.device):
        return torch.ops.fused_hourglass.upsample_add.default(low, skip)  # checks its arguments itself
    _check_upsample_add(low, skip)
    return reference.upsample_add(low, skip)


def sum_pool2x2(grad: torch.Tensor) -> torch.Tensor:
    """2×2, stride-2 sum pool of [N, C, H, W] (H, W even) → [N, C, H/2, W/2]; the gradient of upsample_add
    with respect to `low`."""
    if isinstance(grad, torch.Tensor) and _ext.use_kernel("sum_pool2x2", grad.device):
        return torch.ops.fused_hourglass.sum_pool2x2.default(grad)  # checks its arguments itself
    _check_sum_pool2x2(grad)
    return reference.sum_pool2x2(grad)


if _ext.HAS_EXTENSION:

    @torch.library.register_fake("fused_hourglass::upsample_add")
    def _upsample_add_fake(low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        _check_upsample_add(low, skip)
        return torch.empty(skip.shape, dtype=skip.dtype, device=skip.device,
                           memory_format=_ext.memory_format_of(skip))

    @torch.library.register_fake("fused_hourglass::sum_pool2x2")
    def _sum_pool2x2_fake(grad: torch.Tensor) -> torch.Tensor:
        _check_sum_pool2x2(grad)
        n, c, h, w = grad.shape
        return torch.empty((n, c, h // 2, w // 2), dtype=grad.dtype, device=grad.device,
                           memory_format=_ext.memory_format_of(grad))

    def _upsample_add_setup(ctx, inputs, output) -> None:
        pass  # nothing to save: both gradients are functions of the incoming gradient alone

    def _upsample_add_backward(ctx, grad: torch.Tensor):
        grad_low = torch.ops.fused_hourglass.sum_pool2x2.default(grad) if ctx.needs_input_grad[0] else None
        return grad_low, grad if ctx.needs_input_grad[1] else None

    def _sum_pool2x2_setup(ctx, inputs, output) -> None:
        pass

    def _sum_pool2x2_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return reference.nearest_upsample2x(grad)

    torch.library.register_autograd("fused_hourglass::upsample_add", _upsample_add_backward,
                                    setup_context=_upsample_add_setup)
    torch.library.register_autograd("fused_hourglass::sum_pool2x2", _sum_pool2x2_backward,
                                    setup_context=_sum_pool2x2_setup)
