"""Every Triton conv-chain op and constexpr branch against its plain-PyTorch twin (float64), on small odd shapes.

Under the interpreter the kernels use 16-row / 16-channel tiles, so channel counts of 17-33 span two or three
blocks with a ragged edge, and M = N·H·W of 25-128 rows spans several statistics tiles with a short last one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from fused_hourglass.reference import conv_bnrelu as ref

from .conftest import DEVICE, SKIP_REASON

if SKIP_REASON is None:
    from fused_hourglass.triton import conv_kernels as ck

ops = torch.ops.fused_hourglass

# dtype → (atol, rtol) of fused fp32 against the float64 reference; low precision is checked relative to the
# same-precision reference instead (see _assert_low_precision).
FP32_TOL = (2e-5, 2e-5)

SHAPES = [
    (1, 1, 1, 5, 7),  # 1×1 spatial, single tile, channels below one block
    (2, 3, 3, 20, 18),  # K spans two blocks, ragged
    (1, 5, 5, 17, 33),  # C_out spans three blocks; M = 25 is one full tile plus a short one
    (2, 8, 8, 6, 5),  # even side: valid for the upsample-add epilogue; M = 128 is eight full tiles
]


def _inputs(n, h, w, k, c, ksize, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, h, w, k, generator=g) * 2 + 0.5
    scale = torch.rand(k, generator=g) + 0.5
    shift = torch.randn(k, generator=g)  # many shifts < 0 and > 0: relu(shift) ≠ 0, so padding order matters
    weight = torch.randn(c, k, ksize, ksize, generator=g) / (k * ksize) ** 0.5
    bias = torch.randn(c, generator=g)
    residual = torch.randn(n, h, w, c, generator=g)
    low = torch.randn(n, max(h // 2, 1), max(w // 2, 1), c, generator=g)
    to = dict(device=DEVICE)
    return (u.to(dtype=dtype, **to), scale.to(**to), shift.to(**to), weight.to(dtype=dtype, **to), bias.to(**to),
            residual.to(dtype=dtype, **to), low.to(dtype=dtype, **to))


def _d(t):
    return None if t is None else t.detach().double().cpu()


def _close(actual, expected, tol=FP32_TOL):
    torch.testing.assert_close(_d(actual), _d(expected), atol=tol[0], rtol=tol[1])


def _conv_op(ksize):
    return ops.conv1x1_bnrelu if ksize == 1 else ops.conv3x3_bnrelu


FLAGS = [
    (True, False, False, True),  # conv1 / conv2 of the block
    (False, False, False, False),  # skip conv on the raw input
    (True, True, False, True),  # residual epilogue, with statistics
    (True, True, True, False),  # conv3 with residual and the hourglass upsample-add (even sides only)
]


@pytest.mark.parametrize("ksize", [1, 3])
@pytest.mark.parametrize("shape, prologue, has_res, has_low, stats", [
    (shape, *flags) for shape in SHAPES for flags in FLAGS if not (flags[2] and shape[1] % 2)])
def test_conv_forward(shape, ksize, prologue, has_res, has_low, stats):
    n, h, w, k, c = shape
    u, scale, shift, weight, bias, residual, low = _inputs(*shape, ksize)
    scale, shift = (scale, shift) if prologue else (None, None)
    residual = residual if has_res else None
    low = low if has_low else None
    y, psum, pm2 = _conv_op(ksize)(u, scale, shift, weight, bias, residual, low, stats)
    expected = ref.conv_bnrelu(_d(u), _d(scale), _d(shift), _d(weight), _d(bias), _d(residual), _d(low))
    assert y.shape == (n, h, w, c) and y.dtype == u.dtype and y.is_contiguous()
    _close(y, expected)
    if stats:
        mean, var = ck.combine_stats(psum, pm2, n * h * w)
        exp_mean, exp_var = ref.batch_stats(expected)
        _close(mean, exp_mean)
        _close(var, exp_var)
    else:
        assert psum.shape == (0, c)


def test_conv3x3_pads_after_prologue():
    # All-positive shift: relu(0·scale + shift) = shift > 0, so padding u instead of r would change the border.
    u, scale, _, weight, bias, _, _ = _inputs(1, 3, 3, 4, 3, 3)
    shift = torch.full_like(scale, 2.0)
    y, _, _ = ops.conv3x3_bnrelu(u, scale, shift, weight, bias, None, None, False)
    padded_r = ref.conv_bnrelu(_d(u), _d(scale), _d(shift), _d(weight), _d(bias))
    r_of_padded_u = F.conv2d(torch.relu(F.pad(_d(u).permute(0, 3, 1, 2), (1, 1, 1, 1)) * _d(scale)[:, None, None]
                                        + _d(shift)[:, None, None]), _d(weight), _d(bias)).permute(0, 2, 3, 1)
    _close(y, padded_r)
    assert (padded_r - r_of_padded_u).abs().max() > 1.0


@pytest.mark.parametrize("ksize", [1, 3])
def test_stats_epilogue_large_mean_offset(ksize):
    # |mean| ≈ 3000 ≫ std ≈ 1: Σy² − (Σy)²/M in fp32 would lose about all of the variance's digits.
    u, scale, shift, weight, bias, _, _ = _inputs(2, 5, 5, 20, 18, ksize, seed=1)
    bias = bias + 3000.0
    y, psum, pm2 = _conv_op(ksize)(u, scale, shift, weight, bias, None, None, True)
    mean, var = ck.combine_stats(psum, pm2, 50)
    exp_mean, exp_var = ref.batch_stats(y)  # of the stored fp32 output, which the next BN normalises
    torch.testing.assert_close(_d(mean), exp_mean, atol=0, rtol=1e-6)
    torch.testing.assert_close(_d(var), exp_var, atol=1e-5, rtol=2e-4)


def _assert_low_precision(fused, lowp_ref, exact, floor):
    """Fused low-precision error at most 2× the same-precision reference's error against float64 (+ a floor)."""
    err_fused = (_d(fused) - exact).abs().max().item()
    err_ref = (_d(lowp_ref) - exact).abs().max().item()
    assert err_fused <= 2 * err_ref + floor, (err_fused, err_ref)


@pytest.mark.parametrize("dtype, floor", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_conv_forward_low_precision(dtype, floor):
    u, scale, shift, weight, bias, residual, low = _inputs(2, 4, 4, 20, 18, 3, dtype=dtype)
    y, psum, pm2 = ops.conv3x3_bnrelu(u, scale, shift, weight, bias, residual, low, True)
    exact = ref.conv_bnrelu(_d(u), _d(scale), _d(shift), _d(weight), _d(bias), _d(residual), _d(low))
    lowp = ref.conv_bnrelu(u.cpu(), scale.cpu(), shift.cpu(), weight.cpu(), bias.cpu(), residual.cpu(), low.cpu())
    assert y.dtype == dtype
    _assert_low_precision(y, lowp, exact, floor)
    mean, var = ck.combine_stats(psum, pm2, 32)
    exp_mean, exp_var = ref.batch_stats(y)  # statistics are of the rounded, stored output
    torch.testing.assert_close(_d(mean), exp_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_d(var), exp_var, atol=1e-5, rtol=1e-4)


def _bn_vectors(k, seed=2):
    g = torch.Generator().manual_seed(seed)
    gamma = torch.rand(k, generator=g) + 0.5
    beta = torch.randn(k, generator=g)
    mean = torch.randn(k, generator=g)
    var = torch.rand(k, generator=g) + 0.5
    invstd = torch.rsqrt(var + 1e-5)
    scale = gamma * invstd
    return [t.to(DEVICE) for t in (gamma, mean, invstd, scale, beta - mean * scale)]


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("ksize", [1, 3])
@pytest.mark.parametrize("prologue", [True, False])
def test_conv_dgrad(shape, ksize, prologue):
    n, h, w, k, c = shape
    u, _, _, weight, bias, _, _ = _inputs(*shape, ksize, seed=3)
    gamma, mean, invstd, scale, shift = _bn_vectors(k)
    dy = torch.randn(n, h, w, c, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    bn_args = (scale, shift, mean, invstd) if prologue else (None,) * 4
    dz, psum, pdot = ops.conv_bnrelu_dgrad(dy, weight, u, *bn_args)
    # Reference: autograd through z = u·scale + shift → relu → conv (or the plain conv).
    z = (_d(u) * _d(scale) + _d(shift)) if prologue else _d(u)
    z.requires_grad_()
    y = ref.conv_bnrelu(z, torch.ones(k, dtype=torch.float64) if prologue else None,
                        torch.zeros(k, dtype=torch.float64) if prologue else None, _d(weight), _d(bias))
    (expected,) = torch.autograd.grad(y, z, _d(dy))
    _close(dz, expected)
    if prologue:
        xhat = (_d(u) - _d(mean)) * _d(invstd)
        _close(psum.sum(0), expected.reshape(-1, k).sum(0))
        _close(pdot.sum(0), (expected * xhat).reshape(-1, k).sum(0))
        assert psum.shape == (ck.stats_tiles(n * h * w), k)


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("ksize", [1, 3])
@pytest.mark.parametrize("prologue", [True, False])
def test_conv_wgrad(shape, ksize, prologue):
    n, h, w, k, c = shape
    u, scale, shift, weight, bias, _, _ = _inputs(*shape, ksize, seed=5)
    scale, shift = (scale, shift) if prologue else (None, None)
    dy = torch.randn(n, h, w, c, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    dw, db = ops.conv_bnrelu_wgrad(u, scale, shift, dy, ksize)
    wt, bt = _d(weight).requires_grad_(), _d(bias).requires_grad_()
    y = ref.conv_bnrelu(_d(u), _d(scale), _d(shift), wt, bt)
    exp_dw, exp_db = torch.autograd.grad(y, [wt, bt], _d(dy))
    assert dw.dtype == torch.float32 and dw.shape == weight.shape
    _close(dw, exp_dw, (5e-5, 5e-5))
    _close(db, exp_db, (5e-5, 5e-5))


def test_conv_wgrad_bf16():
    u, scale, shift, weight, bias, _, _ = _inputs(2, 5, 5, 20, 18, 3, dtype=torch.bfloat16, seed=7)
    dy = torch.randn(2, 5, 5, 18, generator=torch.Generator().manual_seed(8)).to(DEVICE, torch.bfloat16)
    dw, _ = ops.conv_bnrelu_wgrad(u, scale, shift, dy, 3)
    # r is computed in fp32 and rounded to bf16 (as the reference's bf16 BN-ReLU output); the products of these
    # bf16 operands are exact in fp32 and accumulate in fp32: compare with the float64 product of the same operands.
    r = torch.relu(u.float().cpu() * scale.cpu() + shift.cpu()).to(torch.bfloat16).double()
    wt = _d(weight).requires_grad_()
    y = F.conv2d(r.permute(0, 3, 1, 2), wt, padding=1)
    (expected,) = torch.autograd.grad(y, wt, _d(dy).permute(0, 3, 1, 2))
    _close(dw, expected, (1e-4, 1e-5))


@pytest.mark.parametrize("offset", [0.0, 1e4])  # 1e4: |mean| ≫ std
def test_channel_stats(offset):
    x = (torch.randn(2, 5, 3, 21, generator=torch.Generator().manual_seed(9)) + offset).to(DEVICE)
    psum, pm2 = ops.channel_stats(x)
    mean, var = ck.combine_stats(psum, pm2, 30)
    exp_mean, exp_var = ref.batch_stats(x)
    torch.testing.assert_close(_d(mean), exp_mean, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(_d(var), exp_var, atol=1e-5, rtol=5e-4)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("has_extra", [True, False])
def test_bn_backward_apply(training, has_extra):
    # The whole BN-ReLU backward: dgrad-style reductions of dz, the coefficients, then the elementwise pass.
    n, h, w, k = 2, 3, 5, 19
    g = torch.Generator().manual_seed(10)
    u = (torch.randn(n, h, w, k, generator=g) * 3 + 1).to(DEVICE)
    dr = torch.randn(n, h, w, k, generator=g).to(DEVICE)
    extra = torch.randn(n, h, w, k, generator=g).to(DEVICE) if has_extra else None
    gamma_t, beta_t = torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g)
    rm, rv = torch.randn(k, generator=g), torch.rand(k, generator=g) + 0.5

    ud = _d(u).permute(0, 3, 1, 2).requires_grad_()
    gamma64, beta64 = gamma_t.double().requires_grad_(), beta_t.double().requires_grad_()
    zr = F.batch_norm(ud, rm.double(), rv.double(), gamma64, beta64, training=training)
    out = torch.relu(zr)
    exp_du, exp_dg, exp_db = torch.autograd.grad(out, [ud, gamma64, beta64], _d(dr).permute(0, 3, 1, 2))

    m = n * h * w
    flat = u.reshape(-1, k).double()
    mean = flat.mean(0).float() if training else rm.to(DEVICE)
    var = flat.var(0, unbiased=False).float() if training else rv.to(DEVICE)
    invstd = torch.rsqrt(var + 1e-5)
    scale = gamma_t.to(DEVICE) * invstd
    shift = beta_t.to(DEVICE) - mean * scale
    dz = torch.where(u * scale + shift > 0, dr, 0.0)
    xhat = (u - mean) * invstd
    sum_dz, sum_dz_xhat = dz.reshape(-1, k).sum(0), (dz * xhat).reshape(-1, k).sum(0)
    a, b, c = ck.bn_backward_coefficients(gamma_t.to(DEVICE), mean, invstd, sum_dz, sum_dz_xhat, m, training)
    du = ops.bn_backward_apply(dz.contiguous(), u, mean, a, b, c, extra)
    expected = exp_du.permute(0, 2, 3, 1) + (_d(extra) if has_extra else 0)
    _close(du, expected, (5e-5, 5e-5))
    _close(sum_dz_xhat, exp_dg, (5e-5, 5e-5))
    _close(sum_dz, exp_db, (5e-5, 5e-5))


def test_sum_pool2x2_nhwc():
    grad = torch.randn(2, 6, 4, 19, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    out = ops.sum_pool2x2_nhwc(grad)
    low = torch.zeros(2, 19, 3, 2, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(F.interpolate(low, scale_factor=2, mode="nearest"), low,
                                      _d(grad).permute(0, 3, 1, 2))
    _close(out, expected.permute(0, 2, 3, 1))


@pytest.mark.parametrize("momentum", [0.1, None])  # None: cumulative average, as nn.BatchNorm2d
def test_finalize_stats_matches_batchnorm(momentum):
    x = torch.randn(3, 7, 4, 5, generator=torch.Generator().manual_seed(12)) * 2 + 5
    bn_ref = torch.nn.BatchNorm2d(7, momentum=momentum)
    bn = torch.nn.BatchNorm2d(7, momentum=momentum)
    for step in range(2):
        xs = x + step
        bn_ref(xs)
        nhwc = xs.permute(0, 2, 3, 1).contiguous().to(DEVICE)
        bn.to(DEVICE)
        scale, shift, mean, invstd = ck.finalize_stats(*ops.channel_stats(nhwc), 60, bn)
        bn.cpu()
        torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(bn.running_var, bn_ref.running_var, atol=1e-6, rtol=1e-5)
        assert bn.num_batches_tracked.item() == bn_ref.num_batches_tracked.item() == step + 1
        normalised = bn_ref.train()(xs).permute(0, 2, 3, 1)
        bn_ref.running_mean.copy_(bn.running_mean)  # undo the extra update of this check's forward
        bn_ref.running_var.copy_(bn.running_var)
        bn_ref.num_batches_tracked.sub_(1)
        torch.testing.assert_close((xs.permute(0, 2, 3, 1).to(DEVICE) * scale + shift).cpu(), normalised,
                                   atol=1e-5, rtol=1e-5)


def test_fake_implementations():
    """The triton_ops trace under FakeTensorMode: shapes, dtypes and contiguity without launching a kernel."""
    with FakeTensorMode():
        u = torch.empty(2, 8, 8, 20, dtype=torch.bfloat16, device=DEVICE)
        vec = torch.empty(20, device=DEVICE)
        w1 = torch.empty(18, 20, 1, 1, dtype=torch.bfloat16, device=DEVICE)
        w3 = torch.empty(18, 20, 3, 3, dtype=torch.bfloat16, device=DEVICE)
        b = torch.empty(18, device=DEVICE)
        res = torch.empty(2, 8, 8, 18, dtype=torch.bfloat16, device=DEVICE)
        low = torch.empty(2, 4, 4, 18, dtype=torch.bfloat16, device=DEVICE)
        tiles = ck.stats_tiles(128)
        y, psum, pm2 = ops.conv1x1_bnrelu(u, vec, vec, w1, b, res, low, True)
        assert (y.shape, y.dtype, psum.shape, pm2.dtype) == ((2, 8, 8, 18), torch.bfloat16, (tiles, 18),
                                                            torch.float32)
        y3, psum3, _ = ops.conv3x3_bnrelu(u, vec, vec, w3, b, None, None, False)
        assert y3.shape == (2, 8, 8, 18) and y3.is_contiguous() and psum3.shape == (0, 18)
        dz, ps, pd = ops.conv_bnrelu_dgrad(y3, w3, u, vec, vec, vec, vec)
        assert dz.shape == u.shape and dz.dtype == torch.bfloat16 and pd.shape == (tiles, 20)
        dw, db = ops.conv_bnrelu_wgrad(u, vec, vec, y3, 3)
        assert dw.shape == (18, 20, 3, 3) and dw.dtype == torch.float32 and db.shape == (18,)
        s, m2 = ops.channel_stats(u)
        assert s.shape == m2.shape == (tiles, 20)
        du = ops.bn_backward_apply(dz, u, vec, vec, vec, vec, u)
        assert du.shape == u.shape and du.dtype == u.dtype
        assert ops.sum_pool2x2_nhwc(u).shape == (2, 4, 4, 20)


def test_argument_errors_name_the_argument():
    u, scale, shift, weight, bias, residual, low = _inputs(1, 4, 4, 6, 5, 1)
    with pytest.raises(ValueError, match="u must be a contiguous 4-D NHWC"):
        ops.conv1x1_bnrelu(u.transpose(1, 2), scale, shift, weight, bias, None, None, False)
    with pytest.raises(ValueError, match="weight must be"):
        ops.conv3x3_bnrelu(u, scale, shift, weight, bias, None, None, False)
    with pytest.raises(ValueError, match="low must be"):
        ops.conv1x1_bnrelu(u, scale, shift, weight, bias, None, residual, False)
    with pytest.raises(ValueError, match="scale and shift must be given together"):
        ops.conv1x1_bnrelu(u, scale, None, weight, bias, None, None, False)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.channel_stats(u.double())


def test_dynamo_traces_ops_without_graph_break():
    """torch.compile sees the triton_ops as single nodes (fullgraph: no break). Lowering the kernels themselves
    needs a GPU (tests/triton/test_gpu.py); the interpreter cannot run under fake-tensor tracing."""
    u, scale, shift, weight, bias, _, _ = _inputs(2, 3, 3, 20, 18, 1)

    def fn(x):
        y, psum, pm2 = ops.conv1x1_bnrelu(x, scale, shift, weight, bias, None, None, True)
        return y * 2, psum

    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    got, want = compiled(u), fn(u)
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
