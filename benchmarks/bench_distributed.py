"""Distributed training on the CPU: the step time of DistributedDataParallel over 2 gloo processes (one thread each)
with and without synchronised BatchNorm, against one process (two threads) on the same global batch, and what
synchronised BatchNorm sends per step — from the model's structure, per-channel vectors only — beside the activation
bytes a gather of the BatchNorm inputs would move.

    pytest benchmarks --benchmark-only -k distributed -s

Prints a table; the same figures are in each row's extra_info.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import pytest
import torch
import torch.distributed as dist

from fused_hourglass import HeatmapLoss, StackedHourglass
from fused_hourglass.engine.distributed import freeze_unused_skips
from fused_hourglass.ops.sync_bn import collective_bytes

MODEL = (2, 64)  # nstack, inp_dim
RES = 128
GLOBAL_BATCH = 8
WARMUP, STEPS = 2, 8


def _setup(sync_bn: bool):
    torch.manual_seed(0)
    model = StackedHourglass(*MODEL, 16, backend="fused", sync_bn=sync_bn).to(memory_format=torch.channels_last)
    freeze_unused_skips(model)
    return model


def _steps(net, model, batch: int) -> list[float]:
    x = torch.randn(batch, 3, RES, RES).contiguous(memory_format=torch.channels_last)
    target = torch.rand(batch, 16, RES // 4, RES // 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # as the training loop's (build_optimizer)
    loss_fn = HeatmapLoss()
    times = []
    for i in range(WARMUP + STEPS):
        if dist.is_initialized():
            dist.barrier()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), target).backward()
        opt.step()
        if i >= WARMUP:
            times.append(time.perf_counter() - t)
    return times


def _worker(rank: int, init: str, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    result = {}
    for sync in (False, True):
        model = _setup(sync)
        ddp = DistributedDataParallel(model, find_unused_parameters=False, broadcast_buffers=not sync)
        result[sync] = _steps(ddp, model, GLOBAL_BATCH // 2)
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def _bn_input_bytes(nstack: int, inp_dim: int, res: int, batch: int) -> int:
    """Bytes of every BatchNorm input of one forward (float32): what gathering the activations would move."""
    model = StackedHourglass(nstack, inp_dim, 16, backend="reference").to("meta")
    total = [0]
    hooks = [m.register_forward_pre_hook(lambda m, a: total.__setitem__(0, total[0] + a[0].numel() * 4))
             for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model(torch.empty(batch, 3, res, res, device="meta"))
    for h in hooks:
        h.remove()
    return total[0]


def test_distributed_step_and_collectives(benchmark):
    benchmark.group = "distributed: 2 gloo processes vs one"
    structure = collective_bytes(_setup(False))
    big = collective_bytes(StackedHourglass(8, 256, 16, backend="reference"))
    assert big["collectives"] == 2 * big["layers"] and big["bytes"] > 0
    activations = _bn_input_bytes(8, 256, 256, 16)
    print(f"\nsync-bn at (8, 256, 16), 256 px, batch 16 per process: {big['collectives']} all-reduces, "
          f"{big['bytes'] / 2**10:.0f} KiB per step per process; the BatchNorm inputs it does not move: "
          f"{activations / 2**20:.0f} MiB ({activations / big['bytes']:.0f}×)")
    if benchmark.disabled:  # the test suite: the structure above, and the fixture used once as pytest expects
        assert benchmark(lambda: collective_bytes(_setup(True)))["forward_bytes"] == structure["forward_bytes"]
        return
    import torch.multiprocessing as mp

    def run():
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "times.pt")
            mp.start_processes(_worker, args=(os.path.join(d, "init"), out), nprocs=2, start_method="spawn")
            return torch.load(out)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = _setup(False)
        single = _steps(model, model, GLOBAL_BATCH)
    finally:
        torch.set_num_threads(threads)
    times = benchmark.pedantic(run, rounds=1, iterations=1)
    base = statistics.median(single)
    grads = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    rows = [("one process, 2 threads", base, 0, 0),
            ("DDP, 2 processes", statistics.median(times[False]), 1, grads),
            ("DDP + sync-bn, 2 processes", statistics.median(times[True]), 1 + structure["collectives"],
             grads + structure["bytes"])]
    print(f"\n({MODEL[0]}, {MODEL[1]}, 16) at {RES} px, global batch {GLOBAL_BATCH}, fused backend, median of {STEPS}")
    print(f"{'':28s} {'step ms':>8s} {'× one':>6s} {'collectives':>12s} {'KiB sent':>9s}")
    for name, t, count, nbytes in rows:
        print(f"{name:28s} {1e3 * t:8.1f} {t / base:6.2f} {count if count else '-':>12} "
              f"{nbytes / 2**10 if nbytes else 0:9.0f}")
    print("(DDP's gradient all-reduce counted as one collective: its buckets; sync-bn adds one all-reduce per "
          "BatchNorm per direction)")
    benchmark.extra_info.update({name: round(1e3 * t, 2) for name, t, _, _ in rows})
    benchmark.extra_info["sync_bn_bytes_8_256"] = big["bytes"]
    benchmark.extra_info["bn_input_bytes_8_256_batch16"] = activations
    assert all(t > 0 for _, t, _, _ in rows)


if not dist.is_available():  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="torch.distributed is not available")
