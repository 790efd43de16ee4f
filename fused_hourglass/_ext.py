"""Loading of the compiled ops and the fall-back policy shared by every op wrapper."""

from __future__ import annotations

import warnings

import torch

try:
    from . import _C  # noqa: F401  (importing registers the ops with the dispatcher)

    EXTENSION_ERROR: str | None = None
except ImportError as exc:  # a source checkout without a build, or an ABI mismatch
    EXTENSION_ERROR = str(exc)

HAS_EXTENSION = EXTENSION_ERROR is None
NAMESPACE = "fused_hourglass"

_warned: set[tuple[str, str]] = set()


# A fixed property of the loaded library: torch.compile evaluates it once while tracing instead of breaking the
# graph on the dispatcher query (which returns a bool, not a tensor).
@torch.compiler.assume_constant_result
def has_kernel(op: str, device_type: str) -> bool:
    """Whether `fused_hourglass::op` has a compiled kernel for tensors on `device_type` ('cpu', 'cuda')."""
    found = _has_kernel_cache.get((op, device_type))
    if found is None:
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
        found = (HAS_EXTENSION and key is not None
                 and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key))
        _has_kernel_cache[(op, device_type)] = found
    return found


# has_kernel's answers: the kernels are registered when _C is imported and never change afterwards, and the
# dispatcher query costs microseconds on every op call.
_has_kernel_cache: dict[tuple[str, str], bool] = {}


@torch.compiler.assume_constant_result
def use_kernel(op: str, device: torch.device) -> bool:
    """True when the compiled kernel serves `device`; otherwise warns once per (op, device type) and returns
    False so the caller runs the plain-PyTorch reference. Under torch.compile it is evaluated once, at trace
    time, and the choice is a constant of the graph."""
    if has_kernel(op, device.type):
        return True
    if (op, device.type) not in _warned:
        _warned.add((op, device.type))
        why = EXTENSION_ERROR if not HAS_EXTENSION else f"the extension was built without {device.type} kernels"
        warnings.warn(f"fused_hourglass.ops.{op}: compiled kernel unavailable ({why}); "
                      "using the plain-PyTorch reference instead", RuntimeWarning, stacklevel=3)
    return False


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The output layout rule of every op (kept in step with output_memory_format in csrc/ops/common.h)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def registered_ops() -> list[str]:
    """Names of the compiled ops in the `fused_hourglass` namespace."""
    if not HAS_EXTENSION:
        return []
    prefix = f"{NAMESPACE}::"
    return [name[len(prefix):] for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix)]
