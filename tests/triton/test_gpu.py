"""Equivalence on a real GPU: bigger shapes, fp16/bf16, opcheck and torch.compile. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fused_hourglass.reference import conv_bnrelu as ref
from fused_hourglass.reference.model import Residual

from .conftest import SKIP_REASON

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

if SKIP_REASON is None:
    from fused_hourglass.triton import fused_residual

ops = torch.ops.fused_hourglass


def _err(got, exact):
    return (got.double() - exact).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ksize, cin, cout", [(1, 256, 128), (3, 128, 128), (1, 128, 256)])
def test_conv_ops_low_precision(dtype, ksize, cin, cout):
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", generator=g)
    u = torch.randn(4, 32, 32, cin, **kw).to(dtype)
    scale, shift = torch.rand(cin, **kw) + 0.5, torch.randn(cin, **kw)
    weight = (torch.randn(cout, cin, ksize, ksize, **kw) / (cin * ksize * ksize) ** 0.5).to(dtype)
    bias = torch.randn(cout, **kw)
    res = torch.randn(4, 32, 32, cout, **kw).to(dtype)
    low = torch.randn(4, 16, 16, cout, **kw).to(dtype)
    conv = ops.conv1x1_bnrelu if ksize == 1 else ops.conv3x3_bnrelu
    y, _, _ = conv(u, scale, shift, weight, bias, res, low, True)
    exact = ref.conv_bnrelu(u.double(), scale.double(), shift.double(), weight.double(), bias.double(),
                            res.double(), low.double())
    same_precision = ref.conv_bnrelu(u, scale, shift, weight, bias, res, low)
    assert _err(y, exact) <= 2 * _err(same_precision, exact) + 1e-3

    dy = torch.randn(4, 32, 32, cout, **kw).to(dtype)
    mean, invstd = torch.randn(cin, **kw), torch.rand(cin, **kw) + 0.5
    dz, _, _ = ops.conv_bnrelu_dgrad(dy, weight, u, scale, shift, mean, invstd)
    z = (u.double() * scale.double() + shift.double()).requires_grad_()
    y64 = ref.conv_bnrelu(z, torch.ones_like(scale).double(), torch.zeros_like(shift).double(), weight.double(),
                          bias.double())
    (dz64,) = torch.autograd.grad(y64, z, dy.double())
    zl = (u * scale.to(dtype) + shift.to(dtype)).requires_grad_()
    yl = ref.conv_bnrelu(zl, torch.ones_like(scale), torch.zeros_like(shift), weight, bias)
    (dzl,) = torch.autograd.grad(yl, zl, dy)
    assert _err(dz, dz64) <= 2 * _err(dzl, dz64) + 1e-3

    dw, _ = ops.conv_bnrelu_wgrad(u, scale, shift, dy, ksize)
    w64 = weight.double().requires_grad_()
    (dw64,) = torch.autograd.grad(ref.conv_bnrelu(u.double(), scale.double(), shift.double(), w64, bias.double()),
                                  w64, dy.double())
    wl = weight.clone().requires_grad_()
    (dwl,) = torch.autograd.grad(ref.conv_bnrelu(u, scale, shift, wl, bias), wl, dy)
    assert _err(dw, dw64) <= 2 * _err(dwl, dw64) + 1e-2


@pytest.mark.parametrize("cin, cout", [(128, 128), (128, 256)])
def test_fused_residual_bf16_vs_autocast_reference(cin, cout):
    torch.manual_seed(0)
    block64 = Residual(cin, cout).cuda().double().train()
    block_ref = copy.deepcopy(block64).float()
    block_fused = copy.deepcopy(block64).float()
    x = torch.randn(8, cin, 32, 32, device="cuda", dtype=torch.float64).to(memory_format=torch.channels_last)
    low = torch.randn(8, cout, 16, 16, device="cuda", dtype=torch.float64)
    g = torch.randn(8, cout, 32, 32, device="cuda", dtype=torch.float64)

    def run(block, inp, fused):
        inp = inp.detach().requires_grad_()
        if fused:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fused_residual(block, inp, low.float())
        elif inp.dtype == torch.float64:
            out = block(inp) + F.interpolate(low, scale_factor=2)
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = block(inp) + F.interpolate(low.float(), scale_factor=2)
        (dx,) = torch.autograd.grad(out, inp, g.to(out.dtype))
        return out, dx

    out64, dx64 = run(block64, x, False)
    out_ref, dx_ref = run(block_ref, x.float(), False)
    out, dx = run(block_fused, x.float(), True)
    assert _err(out, out64) <= 2 * _err(out_ref, out64) + 1e-2
    assert _err(dx, dx64) <= 2 * _err(dx_ref, dx64) + 1e-2
    for (name, want), got in zip(block_ref.named_buffers(), block_fused.buffers(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2, msg=lambda m, n=name: f"{n}: {m}")


def test_opcheck_conv_ops():
    kw = dict(device="cuda")
    u = torch.randn(2, 8, 8, 32, dtype=torch.bfloat16, **kw)
    vec = torch.rand(32, **kw) + 0.5
    w1 = torch.randn(16, 32, 1, 1, dtype=torch.bfloat16, **kw)
    w3 = torch.randn(16, 32, 3, 3, dtype=torch.bfloat16, **kw)
    b = torch.randn(16, **kw)
    dy = torch.randn(2, 8, 8, 16, dtype=torch.bfloat16, **kw)
    torch.library.opcheck(ops.conv1x1_bnrelu, (u, vec, vec, w1, b, None, None, True))
    torch.library.opcheck(ops.conv3x3_bnrelu, (u, vec, vec, w3, b, None, None, True))
    torch.library.opcheck(ops.conv_bnrelu_dgrad, (dy, w3, u, vec, vec, vec, vec))
    torch.library.opcheck(ops.conv_bnrelu_wgrad, (u, vec, vec, dy, 3))
    torch.library.opcheck(ops.channel_stats, (u,))
    torch.library.opcheck(ops.sum_pool2x2_nhwc, (u,))


def test_torch_compile_traces_fused_block():
    block = Residual(64, 128).cuda().eval()
    x = torch.randn(4, 64, 16, 16, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    compiled = torch.compile(lambda inp: fused_residual(block, inp), fullgraph=True)
    torch.testing.assert_close(compiled(x), fused_residual(block, x), atol=0, rtol=0)
