"""CPU throughput of bn_relu (training) and max_pool2x2 against eager PyTorch, torch.compile of it, and a plain
copy of the input (`u.clone()`, the memory-traffic yardstick: one read and one write of u).

Each configuration's rows share a pytest-benchmark group, and the terminal summary gives every row as a ratio to
the group's copy. Default: N = 4, C ∈ {128, 256}, 16 and 64 px, both layouts, warm, cold and dram cache (see
benchmarks/conftest.py: warm rows run back to back; cold rows start with everything in DRAM, code included; dram
rows with only their input tensors in DRAM; at 64 px the warm copy runs largely from L3 while a training step's
four tensors cannot). FH_BENCH_FULL=1 sweeps 8/16/32/64 px.
The torch.compile rows only run when timing (--benchmark-only): compiling takes far longer than the smoke mode
(--benchmark-disable) should.

    pytest benchmarks/bench_bn_relu.py --benchmark-only -k "C256-64px"
    pytest benchmarks/bench_bn_relu.py --benchmark-only -k "cold and not compiled"
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_hourglass.ops import BatchNormReLU2d, max_pool2x2

N = 4
CHANNELS = (128, 256)
SIDES = (8, 16, 32, 64) if os.environ.get("FH_BENCH_FULL") == "1" else (16, 64)
LAYOUTS = ("nchw", "channels_last")
CACHES = ("warm", "cold", "dram")

config = pytest.mark.parametrize(("c", "side", "layout", "cache"), [
    pytest.param(c, s, lay, cache, id=f"C{c}-{s}px-{lay}-{cache}")
    for c in CHANNELS for s in SIDES for lay in LAYOUTS for cache in CACHES])


def make_u(c: int, side: int, layout: str, requires_grad: bool = False) -> torch.Tensor:
    u = torch.randn(N, c, side, side, generator=torch.Generator().manual_seed(0))
    if layout == "channels_last":
        u = u.contiguous(memory_format=torch.channels_last)
    return u.requires_grad_(requires_grad)


def copy_into(t: torch.Tensor):
    """The paired yardstick of the cold rows: t copied into a tensor allocated once, so that it times the
    memory traffic alone, whatever state the allocator is in."""
    src = t.detach()
    dst = src.clone()  # written once here, so no round pays its first-touch page faults

    def copy():
        return dst.copy_(src)

    copy.tensors = (src, dst)  # the dram rows flush both: a copy from DRAM to DRAM
    return copy


def eager_bn_relu(c: int) -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())


def bn_relu_impl(impl: str, c: int, benchmark):
    if impl == "fused":
        return BatchNormReLU2d(c)
    if impl == "eager":
        return eager_bn_relu(c)
    if impl == "compiled":
        if benchmark.disabled:
            pytest.skip("torch.compile rows are timed only with --benchmark-only")
        return torch.compile(eager_bn_relu(c), dynamic=False)
    return torch.clone


IMPLS = ("fused", "eager", "compiled", "clone")


@config
@pytest.mark.parametrize("impl", IMPLS)
def test_bn_relu_forward(benchmark, timed, impl, c, side, layout, cache):
    benchmark.group = f"bn_relu training forward, C={c} {side}px {layout}, {cache} cache"
    fn = bn_relu_impl(impl, c, benchmark)
    u = make_u(c, side, layout)
    fn(u)  # warm-up (and compilation)
    out = timed(lambda: fn(u), cache, yardstick=copy_into(u), tensors=(u,))
    assert out.shape == u.shape


@config
@pytest.mark.parametrize("impl", IMPLS)
def test_bn_relu_forward_backward(benchmark, timed, impl, c, side, layout, cache):
    benchmark.group = f"bn_relu training forward+backward, C={c} {side}px {layout}, {cache} cache"
    fn = bn_relu_impl(impl, c, benchmark)
    u = make_u(c, side, layout, requires_grad=impl != "clone")
    grad = torch.randn_like(u)

    def step():
        if impl == "clone":
            return fn(u)
        u.grad = None
        y = fn(u)
        y.backward(grad)
        return y

    step()
    out = timed(step, cache, yardstick=copy_into(u), tensors=(u, grad))
    assert out.shape == u.shape


@config
@pytest.mark.parametrize("impl", ("fused", "eager", "clone"))
def test_max_pool_forward_backward(benchmark, timed, impl, c, side, layout, cache):
    benchmark.group = f"max_pool2x2 forward+backward, C={c} {side}px {layout}, {cache} cache"
    x = make_u(c, side, layout, requires_grad=impl != "clone")
    pool = max_pool2x2 if impl == "fused" else (lambda t: F.max_pool2d(t, 2, 2))
    grad = torch.randn(N, c, side // 2, side // 2)
    if layout == "channels_last":  # the gradient arrives in the layout of the pool's output
        grad = grad.contiguous(memory_format=torch.channels_last)

    def step():
        if impl == "clone":
            return x.clone()
        x.grad = None
        y = pool(x)
        y.backward(grad)
        return x.grad

    step()
    out = timed(step, cache, yardstick=copy_into(x), tensors=(x, grad))
    assert out.shape == x.shape
