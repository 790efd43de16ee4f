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
