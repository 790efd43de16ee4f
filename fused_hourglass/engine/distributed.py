"""Multi-process training on torch.distributed: the process group torchrun describes, DistributedDataParallel
around the model, and the few collectives the training loop adds (per-rank RNG states for checkpoints, one
all-reduce per step of the loss and the stop request).

Launch with torchrun (`torchrun --nproc-per-node N -m fused_hourglass train ...`): it sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and this module initialises the default group from them with NCCL on CUDA
and gloo on the CPU. Without those variables (or with WORLD_SIZE=1) training is single-process and nothing here
communicates.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run: rank, world size, local rank, the device it trains on, and the
    collective backend (None when single-process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer (torchrun sets it), got {value!r}") \
            from None


def setup(device: torch.device, timeout_s: float = 600.0) -> DistContext:
    """Join the process group torchrun's environment describes, or stay single-process.

    `device` is the run's device as resolved from --device: with CUDA each process takes cuda:LOCAL_RANK (NCCL);
    on the CPU every process uses the CPU (gloo). `timeout_s` bounds every collective, so a process whose peer died
    outside torchrun's supervision fails with an error instead of waiting for ever."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size}: need 0 <= RANK < WORLD_SIZE")
    if world_size == 1:
        return DistContext(device=device)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this build of torch has no torch.distributed")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                             f"visible: --nproc-per-node must not exceed the GPUs of one machine")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return DistContext(rank, world_size, local_rank, device, backend)


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def freeze_unused_skips(model: nn.Module) -> int:
    """The port builds a skip convolution in every Residual and applies it only when the channel counts differ:
    those parameters never receive a gradient. Marking them requires_grad=False keeps them out of
    DistributedDataParallel's buckets (no `find_unused_parameters=True`, whose graph walk would cost every step)
    and out of the optimizer's work, while the state dict keeps the port's keys and values. Returns the number of
    parameters frozen (7,385,216 for the 8-stack, 256-feature model)."""
    from ..reference.model import Residual

    frozen = 0
    for m in model.modules():
        if isinstance(m, Residual) and not m.need_skip:
            for p in m.skip_layer.parameters():
                if p.requires_grad:
                    p.requires_grad_(False)
                    frozen += p.numel()
    return frozen


def wrap(model: nn.Module, ctx: DistContext, *, sync_bn: bool) -> nn.Module:
    """The model as this process trains it: DistributedDataParallel over the default group when distributed (the
    skip convolutions that never run frozen first), else the model itself. With synchronised BatchNorm the running
    statistics are equal on every process, so DDP's per-step buffer broadcast is turned off."""
    freeze_unused_skips(model)
    if not ctx.enabled:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # Buffers are broadcast from rank 0 once at construction either way; newer torch names the per-forward
    # broadcast forward_sync_buffers (broadcast_buffers is deprecated there), older torch only broadcast_buffers.
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                   find_unused_parameters=False, gradient_as_bucket_view=True,
                                   **{name: not sync_bn})


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (one collective; [obj] when single-process)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def step_reduce(ctx: DistContext, loss_sum: float, count: int, stop: bool) -> tuple[float, int, bool]:
    """One all-reduce per optimizer step: the summed loss and sample count (for the logged global mean), and whether
    any process was asked to stop (SIGINT/SIGTERM may reach the processes at different steps; all stop together at
    the same step boundary)."""
    if not ctx.enabled:
        return loss_sum, count, stop
    t = torch.tensor([loss_sum, float(count), 1.0 if stop else 0.0], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return float(t[0]), int(t[1]), bool(t[2] > 0)


def stream_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s global RNG streams (Python, numpy, torch) after the model is built: the run's seed
    on rank 0, a distinct function of (seed, rank) on the others."""
    return seed if rank == 0 else (seed * 1_000_003 + 7_919 * rank) % (2**63 - 1)
