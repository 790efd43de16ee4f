"""Argument checks shared by op wrappers and fake implementations; messages match the C++ ones."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_tensor(t: object, op: str, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_4d_float(t: torch.Tensor, op: str, name: str) -> None:
    check_tensor(t, op, name)
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D [N, C, H, W], got shape {list(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float64, float32, float16 or bfloat16, got {t.dtype}")


def check_same_dtype_device(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str, op: str) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: {a_name} and {b_name} must have the same dtype, got {a_name} {a.dtype} "
                        f"and {b_name} {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{op}: {a_name} and {b_name} must be on the same device, got {a_name} on {a.device} "
                         f"and {b_name} on {b.device}")


def conv_dtype(t: torch.Tensor, u: torch.Tensor) -> tuple[torch.dtype, str]:
    """The dtype a convolution operand `t` (weight or bias) reaches the convolution in when applied to the output
    of a BatchNorm of `u`, and how to name it in errors: the autocast dtype when autocast is on for u's device and
    would cast t (a float tensor on that device, not float64), as the ops' Autocast kernels do; else t's own."""
    device_type = u.device.type
    if (torch.is_autocast_enabled(device_type) and t.device.type == device_type and t.dtype in FLOAT_DTYPES
            and t.dtype != torch.float64):
        dtype = torch.get_autocast_dtype(device_type)
        return dtype, f"{dtype} ({t.dtype} under autocast)"
    return t.dtype, str(t.dtype)


def check_conv_operand(t: torch.Tensor, name: str, u: torch.Tensor, weight_dtype: torch.dtype | None, op: str) -> None:
    """A convolution weight (weight_dtype None) of u's dtype or, for a convolution in lower precision than its
    BatchNorm, float16/bfloat16 (u not float64); a convolution bias of the weight's dtype (`weight_dtype`); both on
    u's device. Dtypes as `conv_dtype` gives them; messages as csrc/ops/bn_relu_conv.cpp's check_conv_dtypes."""
    if t.device != u.device:
        raise ValueError(f"{op}: u and {name} must be on the same device, got u on {u.device} and {name} on "
                         f"{t.device}")
    dtype, described = conv_dtype(t, u)
    low_precision = dtype in (torch.float16, torch.bfloat16) and u.dtype != torch.float64
    if weight_dtype is None and dtype != u.dtype and not low_precision:
        raise TypeError(f"{op}: {name} must be {u.dtype} (u's dtype), or float16/bfloat16 for a lower-precision "
                        f"convolution, got {described}")
    if weight_dtype is not None and dtype != weight_dtype:
        raise TypeError(f"{op}: {name} must have conv_weight's dtype {weight_dtype}, got {described}")
