"""`max_pool2x2(x)`: the hourglass's 2×2, stride-2 max pool, whose backward recomputes each window's argmax
from the saved input instead of saving int64 indices (which are 2× the bytes of a float32 output, 4× of a
bfloat16 one). Window choice, NaN handling and gradient routing are exactly `F.max_pool2d`'s.
"""

from __future__ import annotations

import torch

from .. import _ext
from ..reference import ops as reference
from ._checks import check_4d_float, check_same_dtype_device

__all__ = ["max_pool2x2"]


def _check_max_pool2x2(x: torch.Tensor, op: str = "max_pool2x2") -> None:
    check_4d_float(x, op, "x")
    if x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"{op}: x must have even H and W (the network never pools odd sides), "
                         f"got shape {list(x.shape)}")


def _check_max_pool2x2_backward(grad: torch.Tensor, x: torch.Tensor) -> None:
    op = "max_pool2x2_backward"
    _check_max_pool2x2(x, op)
    check_4d_float(grad, op, "grad")
    check_same_dtype_device(grad, "grad", x, "x", op)
    n, c, h, w = x.shape
    if tuple(grad.shape) != (n, c, h // 2, w // 2):
        raise ValueError(f"{op}: grad must be [N, C, H/2, W/2] of x, got grad {list(grad.shape)} and x {list(x.shape)}")


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """2×2, stride-2 max pool.

    Args:
        x: [N, C, H, W] floating tensor, H and W even.
    Returns:
        [N, C, H/2, W/2] in x's memory format. Differentiable; the backward saves only x.
    """
    _check_max_pool2x2(x)
    if _ext.use_kernel("max_pool2x2", x.device):
        return torch.ops.fused_hourglass.max_pool2x2.default(x)
    return reference.max_pool2x2(x)


if _ext.HAS_EXTENSION:

    @torch.library.register_fake("fused_hourglass::max_pool2x2")
    def _max_pool2x2_fake(x: torch.Tensor) -> torch.Tensor:
        _check_max_pool2x2(x)
        n, c, h, w = x.shape
        return torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, device=x.device,
                           memory_format=_ext.memory_format_of(x))

    @torch.library.register_fake("fused_hourglass::max_pool2x2_backward")
    def _max_pool2x2_backward_fake(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        _check_max_pool2x2_backward(grad, x)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_ext.memory_format_of(x))

    # Autograd: registered in C++ (csrc/ops/max_pool.cpp), saving x and calling max_pool2x2_backward.
