"""Model-level distributed scenarios, run by tests/test_distributed.py in processes it spawns (gloo, CPU) and, for
the single-process twins, in the test process itself. Not a test module (no test_ prefix)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from fused_hourglass import HeatmapLoss, StackedHourglass
from fused_hourglass.engine.distributed import freeze_unused_skips

BATCH = 4
STEPS = 3
LR = 0.02
RES = 128  # the lowest hourglass level at 2×2: a 1×1 level would make BatchNorm over two values ill-conditioned


def fixed_batch(dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, RES, RES, generator=g, dtype=torch.float64)
    target = torch.rand(BATCH, 4, RES // 4, RES // 4, generator=g, dtype=torch.float64)
    return x.to(device, dtype), target.to(device, dtype)


def make_model(backend: str, dtype: torch.dtype, sync_bn: bool, device: str = "cpu") -> StackedHourglass:
    torch.manual_seed(0)
    model = StackedHourglass(1, 16, 4, backend=backend, sync_bn=sync_bn).to(device, dtype)
    freeze_unused_skips(model)
    return model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_distributed(backend: str, shares: list[int], sync_bn: bool, dtype: torch.dtype, rank: int,
                    world: int, device: str = "cpu") -> dict:
    """STEPS SGD steps of DDP over the default group, rank r on its share of the fixed batch. Each rank's loss is
    its samples' summed per-sample loss over the global batch size, times the world size, so that DDP's gradient
    average is the gradient of the mean loss over the whole batch for any shares."""
    from torch.nn.parallel import DistributedDataParallel

    model = make_model(backend, dtype, sync_bn, device)
    ddp = DistributedDataParallel(model, device_ids=[torch.device(device).index] if device != "cpu" else None,
                                  find_unused_parameters=False, broadcast_buffers=not sync_bn)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    x, target = fixed_batch(dtype, device)
    lo = sum(shares[:rank])
    x, target = x[lo:lo + shares[rank]], target[lo:lo + shares[rank]]
    loss_fn = HeatmapLoss("none")
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        per_sample = loss_fn(ddp(x), target).sum()
        (per_sample * (world / BATCH)).backward()
        opt.step()
        total = per_sample.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / BATCH)
    return {"losses": losses, "state": {k: v.cpu() for k, v in _state(model).items()}}


def run_single(backend: str, shares: list[int], sync_bn: bool, dtype: torch.dtype, device: str = "cpu") -> dict:
    """The one-process twin: with sync_bn the whole batch in one forward; without, each share normalised by its own
    statistics (one forward per share) and the gradients summed, the running statistics those of share 0 (DDP
    broadcasts rank 0's buffers before every forward)."""
    model = make_model(backend, dtype, False, device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    x, target = fixed_batch(dtype, device)
    loss_fn = HeatmapLoss("none")
    buffers = [b for b in model.buffers()]
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        if sync_bn:
            loss = loss_fn(model(x), target).sum() / BATCH
            loss.backward()
            total = float(loss.detach())
        else:
            total, lo = 0.0, 0
            for i, n in enumerate(shares):
                saved = [b.clone() for b in buffers]
                loss = loss_fn(model(x[lo:lo + n]), target[lo:lo + n]).sum() / BATCH
                loss.backward()
                total += float(loss.detach())
                if i > 0:
                    for b, s in zip(buffers, saved, strict=True):
                        b.copy_(s)
                lo += n
        opt.step()
        losses.append(total)
    return {"losses": losses, "state": {k: v.cpu() for k, v in _state(model).items()}}


def autocast_step(backend: str, sync_bn: bool, rank: int | None, world: int, enabled: bool = True) -> dict:
    """One training forward and backward under CPU bfloat16 autocast (unless not `enabled`), on rank's half (rank
    None: the whole batch in one process): the output, the first convolution's weight gradient, a running
    variance."""
    model = make_model(backend, torch.float32, sync_bn)
    x, target = fixed_batch(torch.float32)
    if rank is not None:
        from torch.nn.parallel import DistributedDataParallel

        x, target = x[2 * rank:2 * rank + 2], target[2 * rank:2 * rank + 2]
        net = DistributedDataParallel(model, find_unused_parameters=False, broadcast_buffers=False)
    else:
        net = model
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
        y = net(x)
    (HeatmapLoss("none")(y.float(), target).sum() * (world / BATCH)).backward()
    return {"y": y.detach().float(), "dtype": y.dtype, "grad": model.pre[0].conv.weight.grad.clone(),
            "running_var": model.pre[1].bn2.running_var.clone()}


def worker(rank: int, world: int, init_file: str, backend: str,
           scenarios: list[tuple[list[int], bool, torch.dtype]], out_dir: str, comm: str = "gloo") -> None:
    torch.set_num_threads(1)
    device = "cpu"
    if comm == "nccl":
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(comm, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = [run_distributed(backend, shares, sync, dtype, rank, world, device)
                   for shares, sync, dtype in scenarios]
        if comm == "gloo":
            results.append(autocast_step(backend, True, rank, world))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
