"""Fused Triton residual block and hourglass level vs eager PyTorch (channels_last, bf16 autocast) and
torch.compile(mode="max-autotune"), forward and forward+backward, at N=32, C=256 and sides 64, 32, 16, 8, 4; plus
each Triton kernel on its own. Every benchmark records bytes moved (from the shapes, `bytes_moved`) and the achieved
TB/s (and TFLOP/s for convs) in `extra_info`. GPU benchmarks skip without CUDA; the analytic traffic table runs
everywhere.

    pytest benchmarks/bench_triton_residual.py --benchmark-only
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fused_hourglass.triton as ft
from fused_hourglass.reference.model import Hourglass, Residual
from fused_hourglass.triton.bytes_moved import bytes_moved_table, conv_bytes, conv_flops, main

N, C = 32, 256
SIDES = [64, 32, 16, 8, 4]
requires_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and ft.AVAILABLE),
                                  reason=f"needs a CUDA device and Triton ({ft.UNAVAILABLE_REASON or 'no CUDA'})")


@pytest.mark.parametrize("n, c, side, dtype_bytes", [(32, 256, 64, 2), (32, 256, 4, 2), (1, 64, 8, 4)])
def test_bytes_moved_table(n, c, side, dtype_bytes, capsys):
    """The analytic table: fused moves fewer bytes than eager in every pass, and the printed summary (captured;
    `python -m fused_hourglass.triton.bytes_moved` shows it) says the same."""
    table = bytes_moved_table(n, c, side, side, dtype_bytes)
    main([str(v) for v in (n, c, side, side, dtype_bytes)])
    printed = {fields[0]: fields[1:] for line in capsys.readouterr().out.splitlines()
               if len(fields := line.split()) == 4 and fields[0] in table}
    for pass_, row in table.items():
        assert 0 < row["fused"] < row["unfused"], pass_
        unfused_mb, fused_mb, _ = (float(v) for v in printed[pass_])
        assert abs(unfused_mb - row["unfused"] / 1e6) <= 0.05 and abs(fused_mb - row["fused"] / 1e6) <= 0.05, pass_
    act = n * side * side * c * dtype_bytes
    assert table["forward"]["fused"] == 6 * act and table["forward"]["unfused"] == 17 * act


def _record(benchmark, nbytes: int, flops: int | None = None) -> None:
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info["bytes_moved"] = nbytes
    benchmark.extra_info["TB/s"] = round(nbytes / seconds / 1e12, 3)
    if flops is not None:
        benchmark.extra_info["TFLOP/s"] = round(flops / seconds / 1e12, 2)


def _sync_call(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _block_runner(impl: str, block: Residual, x: torch.Tensor, backward: bool):
    """A callable running one step of `impl` on x (bf16 activations, fp32 parameters)."""
    if impl == "fused":
        def forward(inp):
            return ft.fused_residual(block, inp.to(torch.bfloat16))
    else:
        module = torch.compile(block, mode="max-autotune") if impl == "compile" else block

        def forward(inp):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return module(inp)

    def step():
        inp = x.detach().requires_grad_(backward)
        out = forward(inp)
        if backward:
            out.float().sum().backward()
        return out

    return step


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("impl", ["eager", "compile", "fused"])
@pytest.mark.benchmark(group="residual block")
@pytest.mark.gpu
@requires_gpu
def test_residual_block(benchmark, impl, side, backward):
    block = Residual(C, C).cuda().train()
    x = torch.randn(N, C, side, side, device="cuda").to(memory_format=torch.channels_last)
    step = _block_runner(impl, block, x, backward)
    step()  # compile / autotune outside the timing
    benchmark(_sync_call(step))
    table = bytes_moved_table(N, C, side, side, 2)
    kind = "fused" if impl == "fused" else "unfused"
    nbytes = table["total" if backward else "forward"][kind]
    # conv1 and conv3 (C ↔ C/2, 1×1) and conv2 (3×3); backward adds a dgrad and a wgrad of the same cost.
    flops = (2 * conv_flops(N, side, side, C, C // 2, 1) + conv_flops(N, side, side, C // 2, C // 2, 3))
    flops *= 3 if backward else 1
    _record(benchmark, nbytes, flops)


def _fused_level(hg: Hourglass, x: torch.Tensor) -> torch.Tensor:
    """One hourglass level (n = 1) through the fused blocks; the merge is up1's conv3 epilogue."""
    low = F.max_pool2d(x, 2, 2)
    low = ft.fused_residual(hg.low1, low)
    low = ft.fused_residual(hg.low2, low)
    low = ft.fused_residual(hg.low3, low)
    return ft.fused_residual(hg.up1, x, low)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("side", [64, 16])
@pytest.mark.parametrize("impl", ["eager", "compile", "fused"])
@pytest.mark.benchmark(group="hourglass level")
@pytest.mark.gpu
@requires_gpu
def test_hourglass_level(benchmark, impl, side, backward):
    hg = Hourglass(1, C).cuda().train()
    x = torch.randn(N, C, side, side, device="cuda").to(memory_format=torch.channels_last)
    if impl == "fused":
        def forward(inp):
            return _fused_level(hg, inp.to(torch.bfloat16))
    else:
        module = torch.compile(copy.deepcopy(hg), mode="max-autotune") if impl == "compile" else hg

        def forward(inp):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return module(inp)

    def step():
        inp = x.detach().requires_grad_(backward)
        out = forward(inp)
        if backward:
            out.float().sum().backward()
        return out

    step()
    benchmark(_sync_call(step))
    kind = "fused" if impl == "fused" else "unfused"
    pass_ = "total" if backward else "forward"
    full, half = bytes_moved_table(N, C, side, side, 2), bytes_moved_table(N, C, side // 2, side // 2, 2)
    _record(benchmark, full[pass_][kind] + 3 * half[pass_][kind])


KERNEL_CASES = [
    # (name, cin, cout, ksize, residual, low)
    ("conv1 1x1 256→128 +stats", 256, 128, 1, False, False),
    ("conv2 3x3 128→128 +stats", 128, 128, 3, False, False),
    ("conv3 1x1 128→256 +res +low", 128, 256, 1, True, True),
]


@pytest.mark.parametrize("side", [64, 16])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
@pytest.mark.parametrize("kernel", ["forward", "dgrad", "wgrad"])
@pytest.mark.benchmark(group="triton kernels")
@pytest.mark.gpu
@requires_gpu
def test_conv_kernel(benchmark, kernel, case, side):
    _, cin, cout, ksize, residual, low = case
    ops = torch.ops.fused_hourglass
    dev = dict(device="cuda")
    u = torch.randn(N, side, side, cin, dtype=torch.bfloat16, **dev)
    dy = torch.randn(N, side, side, cout, dtype=torch.bfloat16, **dev)
    scale, shift, mean, invstd = (torch.rand(cin, **dev) + 0.5 for _ in range(4))
    weight = torch.randn(cout, cin, ksize, ksize, dtype=torch.bfloat16, **dev)
    bias = torch.randn(cout, **dev)
    res = dy.clone() if residual else None
    low_t = torch.randn(N, side // 2, side // 2, cout, dtype=torch.bfloat16, **dev) if low else None
    act = N * side * side * 2
    if kernel == "forward":
        conv = ops.conv1x1_bnrelu if ksize == 1 else ops.conv3x3_bnrelu
        fn = _sync_call(lambda: conv(u, scale, shift, weight, bias, res, low_t, not residual))
        nbytes = conv_bytes(N, side, side, cin, cout, ksize, 2, residual, low)
    elif kernel == "dgrad":
        fn = _sync_call(lambda: ops.conv_bnrelu_dgrad(dy, weight, u, scale, shift, mean, invstd))
        nbytes = act * (cout + 2 * cin)  # dy, u (ReLU mask, x̂) → dz
    else:
        fn = _sync_call(lambda: ops.conv_bnrelu_wgrad(u, scale, shift, dy, ksize))
        nbytes = act * (cin + cout)
    fn()
    benchmark(fn)
    _record(benchmark, nbytes, conv_flops(N, side, side, cin, cout, ksize))
