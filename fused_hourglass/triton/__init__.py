"""Triton kernels of the fused BN-ReLU-conv chain (DESIGN.md §2-3) and the fused residual block built on them.

Importing this package never fails: without triton (or without `torch.library.triton_op`) `AVAILABLE` is False,
`UNAVAILABLE_REASON` says why, and the public names are absent. The kernels run on CUDA tensors, or on CPU tensors
when `TRITON_INTERPRET=1` was set before triton was first imported (`INTERPRET`).
"""

from __future__ import annotations

try:
    from . import conv_kernels
    from .head import FusedHeadFunction, fused_head
    from .residual import FusedResidual, FusedResidualFunction, fused_residual

    UNAVAILABLE_REASON: str | None = None
except ImportError as exc:  # no triton, or a torch without torch.library.triton_op
    UNAVAILABLE_REASON = str(exc)

AVAILABLE = UNAVAILABLE_REASON is None
INTERPRET = AVAILABLE and conv_kernels.INTERPRET

__all__ = ["AVAILABLE", "INTERPRET", "UNAVAILABLE_REASON"]
if AVAILABLE:
    __all__ += ["FusedHeadFunction", "FusedResidual", "FusedResidualFunction", "fused_head", "fused_residual",
                "conv_kernels"]
